"""LLM-side runtime: shorten the sequence entering decoder layer L, keep everything after L consistent.

Per-instance forward pre-hooks on the decoder layers (``with_kwargs=True``):

- Prefill, layer L with a stage: build an :class:`LLMContext`, call the method, apply its Reduction: the slot
  set shrinks to the survivors (original order, original position ids), merged tokens replace their anchor's
  hidden state, token sizes are updated. Rows that keep different counts are left-padded with masked slots.
- Prefill, every layer >= the first stage: the model's loop passes full-length rotary tables, position ids
  and mask; they are sliced to the current slots (memoised, once per stage per tensor).
- Decode: the mask's key axis is re-indexed to [prefill survivors of this layer] + [decoded tokens]; with
  proportional attention the log-size bias of each key is added (sdpa / eager float mask).
Positions: survivors keep their original ids; decoding continues at the original length (layer 0 holds the
full prompt, so transformers' own bookkeeping is unchanged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..methods.base import LLMContext, Method
from ..models.base import ModelAdapter, TokenMap
from ..reduction import compact
from .masks import decode_mask, gather_seq, position_decode_mask, prefill_mask

__all__ = ["LLMRuntime"]


@dataclass
class _SlotSet:
    """The slot set in force from one layer on (after a stage)."""

    start_layer: int
    slots: torch.Tensor  # (B, M) original sequence index of each slot
    slot_valid: torch.Tensor  # (B, M) False: vtc's left padding
    sizes: torch.Tensor  # (B, M) float token sizes
    is_visual: torch.Tensor  # (B, M)
    image_id: torch.Tensor  # (B, M)
    protected: torch.Tensor  # (B, M)
    user_valid: torch.Tensor  # (B, M) not user padding
    identity: bool = False  # slots == arange(N) for every row and nothing padded
    use_bias: bool = False
    memo: dict = field(default_factory=dict)

    @property
    def needs_mask(self) -> bool:
        return self.use_bias or not self.identity and bool((~self.slot_valid).any())

    def select_rows(self, rows: torch.Tensor) -> _SlotSet:
        """The same slot set for batch rows ``rows`` (beam search reordering); memoised masks are dropped."""
        def pick(t):
            return t.index_select(0, rows.to(t.device))

        return _SlotSet(self.start_layer, pick(self.slots), pick(self.slot_valid), pick(self.sizes),
                           pick(self.is_visual), pick(self.image_id), pick(self.protected), pick(self.user_valid),
                           identity=self.identity, use_bias=self.use_bias)


class LLMRuntime:
    def __init__(self, adapter: ModelAdapter, stages: list[tuple[int, Method]], stats: Any, seed: int):
        self.adapter = adapter
        self.stages = stages  # (stage index, method) LLM-side, in layer order
        self.stats = stats
        self.seed = seed
        self.by_layer: dict[int, tuple[int, Method]] = {}
        for idx, m in stages:
            for layer in m.llm_layers():
                self.by_layer[layer] = (idx, m)
        self.capture_at: dict[int, list[int]] = {}
        for idx, m in stages:
            for layer in m.capture_layers():
                self.capture_at.setdefault(layer, []).append(idx)
        self.first_layer = min(self.by_layer) if self.by_layer else None
        self.hook_layers = sorted(set(range(self.first_layer, adapter.num_layers())) | set(self.capture_at)) \
            if self.first_layer is not None else []
        self.attn_impl = adapter.attn_implementation()
        #: per-run state of each stage (stage index -> ``Method.new_state()``), owned by the Run
        self.states: dict[int, Any] = {}
        self.reset()

    # ---- per forward -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.active = False
        self.phase = "idle"
        self.prefill_len = 0
        self.total_len = 0
        self.slot_sets: list[_SlotSet] = []
        self.captured: dict[int, dict[int, LLMContext]] = {}
        self.token_map: TokenMap | None = None
        self.user_mask: torch.Tensor | None = None

    def begin(self, *, is_prefill: bool, seq_len: int, batch: int, token_map: TokenMap | None,
              attention_mask_2d: torch.Tensor | None, device: torch.device) -> None:
        """Called by the model-level pre-hook before every forward."""
        if self.first_layer is None:
            return
        if is_prefill:
            self.reset()
            if token_map is None:
                # nothing to prune (text-only prompt, or inputs_embeds without a token map)
                return
            self.active = True
            self.phase = "prefill"
            self.token_map = token_map
            self.prefill_len = self.total_len = seq_len
            self.user_mask = (attention_mask_2d.bool() if attention_mask_2d is not None
                              else torch.ones(batch, seq_len, dtype=torch.bool, device=device))
            if self.user_mask.shape[1] != seq_len:
                self.user_mask = self.user_mask[:, -seq_len:]
        elif self.active:
            self.phase = "decode"
            self.total_len += seq_len

    def reorder_rows(self, rows: torch.Tensor) -> None:
        """Row i of the batch continues what row ``rows[i]`` held (beam search's ``beam_idx``)."""
        if not self.active:
            return
        self.slot_sets = [g.select_rows(rows) for g in self.slot_sets]
        self.user_mask = self.user_mask.index_select(0, rows.to(self.user_mask.device))

    def end_prefill(self) -> None:
        if self.phase == "prefill":
            self.phase = "decode-ready"
            self.captured.clear()

    def current_slots(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The slot set inside decoder layer ``layer_idx`` of the prefill in progress, or None.

        Returns (slots, valid), both (B, M): the original sequence index of every slot and whether it is a real
        token (not vtc's left padding, not user padding). None outside a prefill with visual tokens. For
        methods that observe the layers between their stages through their own hooks (e.g. TransPrune's
        per-token statistics, kept by original position while the sequence shrinks).
        """
        if not self.active or self.phase != "prefill" or self.user_mask is None:
            return None
        ss = self._current(layer_idx)
        if ss is None:
            B, N = self.user_mask.shape
            return torch.arange(N, device=self.user_mask.device).expand(B, N), self.user_mask
        return ss.slots, ss.slot_valid & ss.user_valid

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            if not self.active:
                return None
            t0 = time.perf_counter()
            try:
                if self.phase == "prefill":
                    return self._prefill_layer(layer_idx, args, kwargs)
                return self._decode_layer(layer_idx, args, kwargs)
            finally:
                self.stats.add_time(time.perf_counter() - t0)

        return hook

    def _hidden(self, args, kwargs) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def _with_hidden(self, args, kwargs, hidden):
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _current(self, layer_idx: int) -> _SlotSet | None:
        cur = None
        for g in self.slot_sets:
            if g.start_layer <= layer_idx:
                cur = g
        return cur

    def _initial_slot_set(self, hidden: torch.Tensor) -> _SlotSet:
        B, N = hidden.shape[:2]
        tm = self.token_map
        dev = hidden.device
        slots = torch.arange(N, device=dev).expand(B, N)
        return _SlotSet(
            start_layer=0, slots=slots, slot_valid=torch.ones(B, N, dtype=torch.bool, device=dev),
            sizes=torch.ones(B, N, dtype=torch.float32, device=dev), is_visual=tm.is_visual.to(dev),
            image_id=tm.image_id.to(dev), protected=tm.protected.to(dev), user_valid=self.user_mask.to(dev),
            identity=True,
        )

    def _prefill_layer(self, layer_idx: int, args, kwargs):
        kwargs = dict(kwargs)
        hidden = self._hidden(args, kwargs)
        ss = self._current(layer_idx)
        if ss is None:
            ss = self._initial_slot_set(hidden)
        if layer_idx in self.by_layer:
            stage_idx, method = self.by_layer[layer_idx]
            ctx = self._context(layer_idx, hidden, ss, self._slice_kwargs(ss, kwargs), stage_idx)
            reduction = method.reduce_llm(ctx)
            ss, hidden = self._apply(layer_idx, ss, hidden, ctx, reduction, method)
            self.slot_sets.append(ss)
            self.stats.record_llm_stage(stage_idx, method, layer_idx, ctx, ss, reduction)
            args, kwargs = self._with_hidden(args, kwargs, hidden)
        if not ss.identity or ss.use_bias:
            kwargs = self._slice_kwargs(ss, kwargs)
        if layer_idx in self.capture_at:
            ctx = self._context(layer_idx, hidden, ss, kwargs, -1)
            self.captured.setdefault(layer_idx, {})
            for idx in self.capture_at[layer_idx]:
                self.captured[layer_idx][idx] = ctx
        if "real" not in ss.memo:  # once per slot set: stats convert it when read
            ss.memo["real"] = (ss.slot_valid & ss.user_valid).sum(-1)
        self.stats.record_layer(layer_idx, ss.slot_valid.shape[1], ss.memo["real"])
        return args, kwargs

    def _context(self, layer_idx, hidden, ss: _SlotSet, kwargs, stage_idx) -> LLMContext:
        cand_mask = ss.is_visual & ~ss.protected & ss.slot_valid
        B = cand_mask.shape[0]
        candidates, cand_valid = compact(cand_mask)
        image_id = torch.where(cand_valid, torch.gather(ss.image_id, 1, candidates), torch.full_like(candidates, -1))
        # per-image candidate counts (B, G): G = number of images in the batch
        G = int(self.token_map.image_id.max()) + 1 if self.token_map.image_id.numel() else 0
        G = max(G, 1)
        counts_img = torch.zeros(B, G, dtype=torch.long, device=hidden.device)
        counts_img.scatter_add_(1, image_id.clamp(min=0), cand_valid.long())
        captured = {layer: d[stage_idx] for layer, d in self.captured.items() if stage_idx in d}
        return LLMContext(
            layer_idx=layer_idx, hidden_states=hidden, candidates=candidates, candidate_valid=cand_valid,
            image_id=image_id, slot_positions=ss.slots, slot_valid=ss.slot_valid,
            token_valid=ss.slot_valid & ss.user_valid, is_visual=ss.is_visual, sizes=ss.sizes,
            position_embeddings=kwargs.get("position_embeddings"), attention_mask=kwargs.get("attention_mask"),
            adapter=self.adapter, captured=captured,
            image_counts=counts_img, seed=self.seed, state=self.states.get(stage_idx),
        )

    def _apply(self, layer_idx, ss: _SlotSet, hidden, ctx: LLMContext, red, method: Method):
        B, M, D = hidden.shape
        dev = hidden.device
        cand = ctx.candidates
        n = cand.shape[1]
        if red.anchor.shape[0] != B or red.source.shape[-1] != n:
            raise RuntimeError(
                f"{method.method}: reduction shape {tuple(red.source.shape)} does not match candidates ({B}, {n})"
            )
        # which candidates survive (anchors of valid outputs)
        kept_cand = torch.zeros(B, n + 1, dtype=torch.bool, device=dev)
        tgt = torch.where(red.valid, red.anchor, torch.full_like(red.anchor, n))
        kept_cand.scatter_(1, tgt, red.valid)
        kept_cand = kept_cand[:, :n] & ctx.candidate_valid
        is_cand = torch.zeros(B, M + 1, dtype=torch.bool, device=dev)
        cand_tgt = torch.where(ctx.candidate_valid, cand, torch.full_like(cand, M))
        is_cand.scatter_(1, cand_tgt, ctx.candidate_valid)
        is_cand = is_cand[:, :M]
        keep = torch.zeros(B, M + 1, dtype=torch.bool, device=dev)
        keep.scatter_(1, cand_tgt, kept_cand)
        keep = (keep[:, :M] | ~is_cand) & ss.slot_valid
        # merged features / sizes replace the anchor's
        new_hidden = hidden
        sizes = ss.sizes
        anchor_slots = torch.gather(cand, 1, red.anchor)
        anchor_tgt = torch.where(red.valid, anchor_slots, torch.full_like(anchor_slots, M))
        if red.features is not None:
            buf = torch.cat([hidden, hidden.new_zeros(B, 1, D)], dim=1)
            buf = buf.scatter(1, anchor_tgt.unsqueeze(-1).expand(-1, -1, D), red.features.to(hidden.dtype))
            new_hidden = buf[:, :M]
        if red.sizes is not None:
            sbuf = torch.cat([sizes, sizes.new_zeros(B, 1)], dim=1)
            sbuf = sbuf.scatter(1, anchor_tgt, red.sizes.to(sizes.dtype))
            sizes = sbuf[:, :M]
        # compact: survivors keep original order; rows with fewer survivors are left-padded
        order, valid = compact(keep, align="right", fill=None)
        M2 = order.shape[1]

        def g(t):
            return torch.gather(t, 1, order)

        out_hidden = torch.gather(new_hidden, 1, order.unsqueeze(-1).expand(-1, -1, D))
        new_set = _SlotSet(
            start_layer=layer_idx, slots=g(ss.slots), slot_valid=valid, sizes=torch.where(valid, g(sizes), 1.0),
            is_visual=g(ss.is_visual) & valid, image_id=g(ss.image_id), protected=g(ss.protected),
            user_valid=g(ss.user_valid), identity=False,
            use_bias=ss.use_bias or (red.sizes is not None and red.proportional),
        )
        # identity: the slots are still arange(N) (a cut that keeps everything after an earlier cut is not one)
        new_set.identity = bool(ss.identity and M2 == M and bool(valid.all()))
        return new_set, out_hidden

    # ---- slicing --------------------------------------------------------------------------------------------
    def _slice_kwargs(self, ss: _SlotSet, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            kwargs["position_embeddings"] = self._memo(ss, pe, lambda: tuple(gather_seq(t, ss.slots, -2)
                                                                              for t in pe))
        pid = kwargs.get("position_ids")
        if isinstance(pid, torch.Tensor) and pid.shape[-1] == self.prefill_len:
            kwargs["position_ids"] = self._memo(ss, pid, lambda: gather_seq(pid, ss.slots, -1))
        if "cache_position" in kwargs and isinstance(kwargs["cache_position"], torch.Tensor):
            kwargs["cache_position"] = torch.arange(ss.slots.shape[1], device=ss.slots.device)
        mask = kwargs.get("attention_mask")
        key = ("mask", id(mask))
        if key not in ss.memo:
            ss.memo[key] = (mask, self._prefill_mask(ss, mask))
        kwargs["attention_mask"] = ss.memo[key][1]
        return kwargs

    def _memo(self, ss: _SlotSet, src, fn):
        key = id(src)
        hit = ss.memo.get(key)
        if hit is not None and hit[0] is src:
            return hit[1]
        val = fn()
        ss.memo[key] = (src, val)
        return val

    def _float_dtype(self) -> torch.dtype:
        return self.adapter.language_model.dtype if hasattr(self.adapter.language_model, "dtype") else torch.float32

    def _float_out(self, mask, ss: _SlotSet) -> bool:
        """Additive float mask (not boolean): the model gave one, eager wants one, or the log-size bias."""
        return (mask is not None and mask.dtype != torch.bool) or self.attn_impl == "eager" or ss.use_bias

    def _prefill_mask(self, ss: _SlotSet, mask):
        if isinstance(mask, dict) or (mask is not None and not isinstance(mask, torch.Tensor)):
            raise ConfigError(f"unsupported attention mask type {type(mask).__name__} for LLM-side stages")
        if mask is None and not ss.needs_mask:
            return None
        if mask is not None and mask.dim() == 2 and ss.use_bias:
            raise ConfigError(
                "proportional attention needs an additive mask; flash_attention_2 cannot take one. "
                "Use attn_implementation='sdpa' (its flash kernel is used when no mask is needed) or "
                "set proportional: false"
            )
        return prefill_mask(mask, ss.slots, ss.slot_valid, ss.sizes if ss.use_bias else None,
                            float_out=self._float_out(mask, ss), dtype=self._float_dtype())

    def _decode_layer(self, layer_idx: int, args, kwargs):
        ss = self._current(layer_idx)
        if ss is None or (ss.identity and not ss.use_bias):
            return None
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        hidden = self._hidden(args, kwargs)
        T = hidden.shape[1]
        window = self.adapter.sliding_window(layer_idx)
        key = ("decode", id(mask), self.total_len, window)
        if key in ss.memo:
            kwargs["attention_mask"] = ss.memo[key]
            return args, kwargs
        if mask is not None and mask.dim() == 2 and ss.use_bias:
            raise ConfigError("proportional attention is not available with flash_attention_2 (use sdpa)")
        if self.adapter.decode_masks_from_positions and (mask is None or mask.dim() == 4):
            out = position_decode_mask(ss.slots, ss.slot_valid & ss.user_valid, ss.sizes if ss.use_bias else None,
                                       prefill_len=self.prefill_len, total_len=self.total_len, new_tokens=T,
                                       window=window, float_out=self._float_out(None, ss), dtype=self._float_dtype())
        else:
            out = decode_mask(mask, ss.slots, ss.slot_valid, ss.sizes if ss.use_bias else None,
                              prefill_len=self.prefill_len, total_len=self.total_len, new_tokens=T,
                              float_out=self._float_out(mask, ss), dtype=self._float_dtype())
        ss.memo = {k: v for k, v in ss.memo.items()
                   if not (isinstance(k, tuple) and k[0] == "decode" and k[2] != self.total_len)}
        ss.memo[key] = out
        kwargs["attention_mask"] = out
        return args, kwargs
