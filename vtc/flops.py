"""Analytic FLOPs and KV-cache bytes of a VLM (pure functions, no torch; used by ``vtc eval`` and the benchmark).

Conventions: 1 multiply-add = 2 FLOPs; only the matrix products are counted (norms, RoPE, softmax and
residual adds are O(N * D) and below 1% at 7B shapes). Per decoder layer processing ``n`` tokens in prefill:

- attention projections: q and o ``2 * n * D * D`` each, k and v ``2 * n * D * D_kv`` each (D_kv = kv heads x
  head dim, so GQA is counted exactly);
- attention scores: ``Q K^T`` and ``A V`` over the causal pairs only, ``2 * h * d * n (n + 1) / 2`` each
  (a causal kernel skips the upper triangle; ``causal=False`` counts all n^2 pairs);
- MLP with SwiGLU (gate, up, down): ``3 * 2 * n * D * F``.

Vision towers (:class:`ViTShape`, :func:`vit_flops`) are bidirectional encoders: every layer attends over all
``T^2`` pairs of a unit (an image, a crop, a video frame group), or over the pairs inside each window for
windowed layers (Qwen2.5-VL; :func:`window_pairs`). Projectors and Qwen's patch merger are plain MLPs
(:func:`mlp_flops`), patch embeddings a linear map of each flattened patch (:func:`patch_embed_flops`).
Decoding one token (:func:`decode_flops`) costs the token-wise terms of one token plus attention over the
layer's cache length (pruned layers hold fewer entries).

Token pruning inside the LLM gives every layer its own ``n``: :func:`prefill_flops` takes one sequence length
per layer. Survivors keep their order, so the causal pair count of a pruned layer is ``n (n + 1) / 2`` again.
The compute attributable to visual tokens (:func:`visual_flops`) is a layer's FLOPs minus what the same layer
would cost on the text tokens alone: every token-wise term of the visual tokens plus every attention pair
that involves a visual token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "LMShape",
    "LLAVA_15_7B",
    "VICUNA_13B",
    "QWEN2_7B",
    "layer_flops",
    "prefill_flops",
    "schedule_seq_lens",
    "visual_flops",
    "ttv_flops",
    "iga_flops",
    "decode_flops",
    "lm_head_flops",
    "ViTShape",
    "vit_layer_flops",
    "vit_flops",
    "patch_embed_flops",
    "mlp_flops",
    "window_pairs",
    "kv_cache_bytes",
]


@dataclass(frozen=True)
class LMShape:
    """Shape of a Llama-style decoder: layers, hidden size D, MLP size F, heads h, key/value heads."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config) -> LMShape:
        """The shape of a transformers text config (or a VLM config holding ``text_config``)."""
        tc = getattr(config, "text_config", None) or config
        if hasattr(tc, "get_text_config"):
            tc = tc.get_text_config()
        heads = int(tc.num_attention_heads)
        kv = getattr(tc, "num_key_value_heads", None) or heads
        return cls(layers=int(tc.num_hidden_layers), hidden=int(tc.hidden_size),
                   intermediate=int(tc.intermediate_size), heads=heads, kv_heads=int(kv))


#: LLaVA-1.5-7B / LLaVA-NeXT-7B (Vicuna-7B): 32 layers, 4096 hidden, 11008 MLP, 32 heads (no GQA)
LLAVA_15_7B = LMShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32)
#: LLaVA-1.5-13B (Vicuna-13B)
VICUNA_13B = LMShape(layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40)
#: Qwen2-VL-7B's language model (Qwen2-7B): 28 layers, GQA with 4 kv heads
QWEN2_7B = LMShape(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4)


def _pairs(n: int, causal: bool) -> int:
    return n * (n + 1) // 2 if causal else n * n


def layer_flops(shape: LMShape, n: int, *, causal: bool = True) -> dict[str, int]:
    """FLOPs of one decoder layer on ``n`` tokens: {'proj', 'attn', 'mlp', 'total'}."""
    D, F = shape.hidden, shape.intermediate
    proj = 2 * n * D * D * 2 + 2 * n * D * shape.kv_dim * 2
    attn = 2 * 2 * shape.heads * shape.head_dim * _pairs(n, causal)
    mlp = 3 * 2 * n * D * F
    return {"proj": proj, "attn": attn, "mlp": mlp, "total": proj + attn + mlp}


def prefill_flops(shape: LMShape, seq_lens: Sequence[int], *, causal: bool = True) -> int:
    """FLOPs of a prefill where decoder layer ``i`` processes ``seq_lens[i]`` tokens (one entry per layer
    listed; pass ``[n] * shape.layers`` for an unpruned prompt)."""
    return sum(layer_flops(shape, n, causal=causal)["total"] for n in seq_lens)


def schedule_seq_lens(num_layers: int, text: int, visual: int, schedule: Sequence[tuple[int, int]]) -> list[int]:
    """Per-layer sequence lengths of a progressive pruning schedule.

    schedule: (layer, visual tokens kept) pairs, where ``layer`` is the 0-indexed decoder layer the survivors
    enter (vtc's convention); before the first entry every layer sees ``text + visual`` tokens.
    """
    lens, cur = [], visual
    stops = dict(schedule)
    for i in range(num_layers):
        cur = stops.get(i, cur)
        lens.append(text + cur)
    return lens


def visual_flops(shape: LMShape, seq_lens: Sequence[int], text: int, *, causal: bool = True) -> int:
    """FLOPs attributable to visual tokens: prefill(seq_lens) minus the same layers on the text tokens alone."""
    return prefill_flops(shape, seq_lens, causal=causal) - prefill_flops(shape, [text] * len(seq_lens), causal=causal)


def ttv_flops(shape: LMShape, n: int) -> int:
    """Token transition variation of one decoder layer (attention + MLP sub-modules) on ``n`` tokens.

    Per sub-module and token: ||x||, ||y|| and x . y (3 x 2D) plus ~10 scalar ops (ratio, cosine, softmax).
    """
    return 2 * n * (3 * 2 * shape.hidden + 10)


def iga_flops(shape: LMShape, n: int, rows: int) -> int:
    """Instruction-guided attention at one pruning point: input norm of ``n`` tokens, k for all of them, q for
    ``rows`` instruction tokens, RoPE, ``rows x n`` scores per head, softmax and the means."""
    D, h, d = shape.hidden, shape.heads, shape.head_dim
    norm = 4 * n * D
    k = 2 * n * D * shape.kv_dim + 3 * n * shape.kv_dim
    q = 2 * rows * D * D + 3 * rows * D
    scores = 2 * rows * h * d * n + 5 * rows * h * n + rows * h * n
    return norm + k + q + scores


def decode_flops(shape: LMShape, kv_lens: Sequence[int]) -> int:
    """FLOPs of decoding one token when decoder layer ``i`` holds ``kv_lens[i]`` cached entries (the new token
    attends to them and to itself): token-wise projections and MLP of one token, plus ``Q K^T`` and ``A V``
    over ``kv_lens[i] + 1`` keys."""
    one = layer_flops(shape, 1)
    per_token = one["proj"] + one["mlp"]
    return sum(per_token + 2 * 2 * shape.heads * shape.head_dim * (n + 1) for n in kv_lens)


def lm_head_flops(hidden: int, vocab: int, rows: int = 1) -> int:
    """The output projection on ``rows`` positions (prefill computes the last position only:
    ``logits_to_keep=1``, as ``generate`` does)."""
    return 2 * rows * hidden * vocab


@dataclass(frozen=True)
class ViTShape:
    """A ViT encoder: layers, width D, MLP width F, heads; ``gated``: SwiGLU MLP (3 matrices) instead of
    fc1 / fc2 (2 matrices)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    gated: bool = False


def vit_layer_flops(shape: ViTShape, tokens: int, pairs: int | None = None) -> dict[str, int]:
    """One encoder layer on ``tokens`` tokens with ``pairs`` attended (query, key) pairs (default ``tokens^2``:
    full bidirectional attention): q, k, v, o projections ``4 * 2 * T * D^2``, ``Q K^T`` and ``A V``
    ``2 * 2 * D * pairs``, MLP ``(3 if gated else 2) * 2 * T * D * F``."""
    D = shape.hidden
    pairs = tokens * tokens if pairs is None else pairs
    proj = 4 * 2 * tokens * D * D
    attn = 2 * 2 * D * pairs
    mlp = (3 if shape.gated else 2) * 2 * tokens * D * shape.intermediate
    return {"proj": proj, "attn": attn, "mlp": mlp, "total": proj + attn + mlp}


def vit_flops(shape: ViTShape, tokens: int, units: int = 1, *, window_pairs_per_unit: int | None = None,
              full_layers: Sequence[int] | None = None) -> int:
    """All layers of the encoder on ``units`` units of ``tokens`` tokens each (attention within a unit).

    Windowed towers: layers not in ``full_layers`` attend over ``window_pairs_per_unit`` pairs per unit
    (see :func:`window_pairs`); ``full_layers=None`` means every layer is full attention."""
    total = 0
    for i in range(shape.layers):
        windowed = full_layers is not None and i not in full_layers and window_pairs_per_unit is not None
        pairs = window_pairs_per_unit if windowed else None
        total += vit_layer_flops(shape, tokens, pairs)["total"]
    return units * total


def patch_embed_flops(tokens: int, patch_values: int, hidden: int) -> int:
    """A patch embedding (a convolution with stride = kernel) is one ``patch_values x hidden`` matmul per patch
    (``patch_values`` = channels x patch area (x temporal patch))."""
    return 2 * tokens * patch_values * hidden


def mlp_flops(rows: int, dims: Sequence[int]) -> int:
    """A plain MLP ``dims[0] -> dims[1] -> ...`` on ``rows`` rows (e.g. LLaVA's projector 1024 -> 4096 -> 4096)."""
    return sum(2 * rows * a * b for a, b in zip(dims[:-1], dims[1:]))


def window_pairs(grid_h: int, grid_w: int, window: int, merge: int = 1) -> int:
    """Attended pairs of one frame under Qwen2.5-VL window attention.

    The frame has ``grid_h x grid_w`` patches; windows are ``window x window`` *merged* tokens (each merged token
    is ``merge x merge`` patches), aligned at the top-left, the last row / column of windows partial. A window
    of ``r x c`` merged tokens holds ``r c merge^2`` patches and contributes its square."""
    hm, wm = grid_h // merge, grid_w // merge

    def chunks(n: int) -> list[int]:
        return [min(window, n - s) for s in range(0, n, window)]

    return sum((r * c * merge * merge) ** 2 for r in chunks(hm) for c in chunks(wm))


def kv_cache_bytes(shape: LMShape, kv_lens: Sequence[int], bytes_per_value: int = 2) -> int:
    """Bytes of a KV cache where decoder layer ``i`` holds ``kv_lens[i]`` entries: keys and values of
    ``kv_heads x head_dim`` values each (``bytes_per_value``: 2 for fp16 / bf16, 4 for fp32)."""
    return sum(2 * n * shape.kv_dim * bytes_per_value for n in kv_lens)
