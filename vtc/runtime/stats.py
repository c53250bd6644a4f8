"""``run.stats``: what vtc did on the most recent prefill, plus running totals.

- ``stages``: per stage, visual tokens in / out per image (vision side) or per sample (LLM side), and the
  reduction's source maps (for drawing).
- ``seq_len_per_layer``: sequence length (slots, incl. vtc padding) entering each decoder layer >= the first
  LLM-side stage; ``tokens_per_layer``: real tokens per sample (kept on the device per slot set while the
  prefill runs, converted when read: no host sync per decoder layer).
- ``kv_cache_len``: KV-cache entries per layer after prefill, read from the real cache.
- ``image_tokens``: vision side: tokens each image occupies in the rebuilt prompt, including tokens the model
  adds when packing that no stage counts (LLaVA-NeXT's ``image_newline`` tokens).
- ``vtc_time_s``: wall time spent inside vtc's hooks (host time; on a GPU this is launch time unless the
  caller synchronises).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Stats", "StageStats", "cache_lengths"]


@dataclass
class StageStats:
    index: int
    method: str
    side: str
    layer: int | None
    tokens_in: list[int] = field(default_factory=list)
    tokens_out: list[int] = field(default_factory=list)
    #: vision side: one (U, n) source map per unit group; LLM side: (B, n) over the visual candidates
    sources: list[torch.Tensor] = field(default_factory=list, repr=False)
    #: LLM side: (B, M) original sequence positions of the survivors, and their validity
    kept_positions: torch.Tensor | None = field(default=None, repr=False)
    kept_valid: torch.Tensor | None = field(default=None, repr=False)
    #: LLM side: the method's Reduction over the visual candidates (for replay / analysis), and the image id
    #: of each candidate (B, n) (-1: padding)
    reduction: Any = field(default=None, repr=False)
    candidate_image: torch.Tensor | None = field(default=None, repr=False)
    #: vision side: the image index of every unit, per group (parallel to ``sources``)
    unit_images: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def reduction_ratio(self) -> list[float]:
        """Per image / sample: 1 - out / in (content-adaptive methods deliver different ratios)."""
        return [1.0 - o / i if i else 0.0 for i, o in zip(self.tokens_in, self.tokens_out)]

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "method": self.method, "side": self.side, "layer": self.layer,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "reduction_ratio": [round(r, 4) for r in self.reduction_ratio]}


@dataclass
class Stats:
    stages: list[StageStats] = field(default_factory=list)
    seq_len_per_layer: dict[int, int] = field(default_factory=dict)
    kv_cache_len: list[int] = field(default_factory=list)
    prompt_len: int = 0
    image_tokens: list[int] = field(default_factory=list)
    vtc_time_s: float = 0.0
    prefills: int = 0
    #: per decoder layer: the (B,) real-token counts of the slot set in force there (one tensor per slot set)
    _layer_tokens: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    # ---- recording (runtime) ---------------------------------------------------------------------------------
    def begin_prefill(self) -> None:
        self.stages = []
        self.seq_len_per_layer = {}
        self._layer_tokens = {}
        self.kv_cache_len = []
        self.image_tokens = []
        self.prefills += 1

    def add_time(self, seconds: float) -> None:
        self.vtc_time_s += seconds

    def _stage(self, index: int, method, layer: int | None) -> StageStats:
        for s in self.stages:
            if s.index == index and s.layer == layer:
                return s
        s = StageStats(index=index, method=method.method, side=method.side, layer=layer)
        self.stages.append(s)
        self.stages.sort(key=lambda t: (t.side != "vision", t.layer or 0, t.index))
        return s

    def record_vision_stage(self, index: int, method, group, n_in: int, reduction) -> None:
        s = self._stage(index, method, None)
        outs = reduction.num_out.tolist()
        s.tokens_in.extend([n_in] * len(outs))
        s.tokens_out.extend(int(o) for o in outs)
        s.sources.append(reduction.source.detach())
        s.unit_images.append(list(group.unit_image))

    def record_llm_stage(self, index: int, method, layer: int, ctx, gen, reduction=None) -> None:
        s = self._stage(index, method, layer)
        s.reduction = reduction
        s.candidate_image = torch.where(ctx.candidate_valid, ctx.image_id, torch.full_like(ctx.image_id, -1))
        s.tokens_in = ctx.candidate_valid.sum(-1).tolist()
        visual_left = (gen.is_visual & gen.slot_valid & ~gen.protected).sum(-1)
        s.tokens_out = visual_left.tolist()
        s.kept_positions = gen.slots.detach()
        s.kept_valid = gen.slot_valid.detach()

    def record_layer(self, layer: int, seq_len: int, tokens: torch.Tensor) -> None:
        """``tokens``: (B,) real tokens per sample, the same tensor for every layer of one slot set."""
        self.seq_len_per_layer[layer] = int(seq_len)
        self._layer_tokens[layer] = tokens

    def record_cache(self, cache: Any, num_layers: int) -> None:
        lens = cache_lengths(cache, num_layers)
        if lens is not None:
            self.kv_cache_len = lens

    # ---- reading ------------------------------------------------------------------------------------------
    @property
    def tokens_per_layer(self) -> dict[int, list[int]]:
        """Real tokens per sample entering each decoder layer >= the first LLM-side stage (one host sync per
        slot set, here)."""
        lists: dict[int, list[int]] = {}
        out = {}
        for layer, tokens in sorted(self._layer_tokens.items()):
            if id(tokens) not in lists:
                lists[id(tokens)] = tokens.tolist()
            out[layer] = lists[id(tokens)]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "stages": [s.as_dict() for s in self.stages],
            "prompt_len": self.prompt_len,
            "image_tokens": self.image_tokens,
            "seq_len_per_layer": self.seq_len_per_layer,
            "tokens_per_layer": self.tokens_per_layer,
            "kv_cache_len": self.kv_cache_len,
            "vtc_time_s": self.vtc_time_s,
            "prefills": self.prefills,
        }

    def __str__(self) -> str:
        lines = [f"vtc stats (prefills: {self.prefills}, time in vtc: {self.vtc_time_s * 1e3:.1f} ms)"]
        for s in self.stages:
            where = "vision" if s.side == "vision" else f"layer {s.layer}"
            tin = sum(s.tokens_in)
            tout = sum(s.tokens_out)
            lines.append(f"  stage {s.index} {s.method:<12} @ {where:<9} visual tokens {tin} -> {tout} "
                         f"(per unit: {s.tokens_out[:8]}{'...' if len(s.tokens_out) > 8 else ''})")
        if self.kv_cache_len:
            lines.append(f"  KV cache per layer after prefill: {self.kv_cache_len}")
        return "\n".join(lines)


def cache_lengths(cache: Any, num_layers: int) -> list[int] | None:
    """Entries held by each of the ``num_layers`` decoder layers of a transformers cache (None: no cache, or one
    that cannot say). Bytes follow from :func:`vtc.flops.kv_cache_bytes`."""
    if cache is None:
        return None
    try:
        return [int(cache.get_seq_length(i)) for i in range(num_layers)]
    except Exception:  # pragma: no cover - exotic caches
        return None
