"""``cdpruner``: CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", NeurIPS 2025, arXiv:2506.10967). Vision side, after the projector; instruction-conditioned.

Per unit (image; LLaVA-NeXT: every crop), with F the projected tokens and h the feature layer's patch states:

- relevance: Z = visual_projection(post_layernorm(h)) in the CLIP space, T = the instruction's CLIP text
  embeddings (one row per 77-token chunk), ``s_i = mean_m(-cos(Z_i, T_m))`` (**negated**, as the official code:
  ``negate: true``), min-max normalised over all units of the image jointly: ``r = (s - min + 1e-6) / (max - min)``;
- kernel ``L = diag(r) · S · diag(r)`` with ``S_ij = cos(F_i, F_j)`` (fp32);
- greedy MAP of the DPP (fast Cholesky updates): ``j = argmax d²`` (first on ties), ``e = (L_j - Σ c_t[j] c_t) /
  sqrt(d²_j)``, ``d² -= e²``; the k picks, in raster order.

``text_encoder`` (required) names a CLIP checkpoint (``CLIPModel``: text tower + text projection, and the visual
projection and post-LayerNorm applied to h; e.g. ``openai/clip-vit-large-patch14-336`` for LLaVA;
``vtc-tiny-llava-clip`` for the grid demo) with its tokenizer, loaded once per path when the config is attached. The instruction is the user's question: what
``run.set_instruction(...)`` set, else the config's fixed ``instruction``, else the prompt text between the row's
last visual token and the chat template's generation prompt (decoded with the model's tokenizer, or ``tokenizer:
PATH``). The official evaluation
passes the bare question (dataset suffixes such as "Answer the question using a single word or phrase." removed):
call ``run.set_instruction`` to do the same.

Budget: ``budget: k`` keeps exactly k per unit (README: 128 / 64 on LLaVA-1.5; 32 per crop on LLaVA-NeXT = 5 x 32);
a float is a keep fraction, floor(f * n). Needs a CLIP vision tower whose patch width matches the checkpoint's
(LLaVA families with a CLIP tower); the others have no CLIP image space and are refused (docs page: Families).

Official quirks: *fixed*: the DPP stops adding volume instead of producing NaN when the remaining tokens are
linearly dependent (``d² <= 1e-10``: the next pick is the first remaining token of largest ``d²``), so k distinct
tokens always; ``max - min`` is clamped at 1e-12 (constant relevance: no division by zero). *Reproduced*: the
negated cosine, the joint min-max over an image's crops, the 77-token chunking, no theta re-weighting.
Derivation: ``docs/methods/cdpruner.md``.
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar, Literal

import torch

from ..errors import ConfigError
from ..reduction import Reduction, resolve_budget
from . import register_method
from .base import Budget, Method, PromptText, VisionContext
from .divprune import group_units

__all__ = ["CDPruner", "dpp_greedy", "conditional_relevance", "prompt_instructions", "load_clip"]

#: guard of the greedy DPP: below this the remaining tokens add no volume
DPP_EPS = 1e-10


# ---- the maths (pure functions) ---------------------------------------------------------------------------------
def dpp_greedy(kernel: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(R, n) bool: greedy MAP of a DPP with kernel (R, n, n), k[r] picks per row (fast Cholesky updates)."""
    R, n, _ = kernel.shape
    dev = kernel.device
    L = kernel.float()
    d2 = torch.diagonal(L, dim1=1, dim2=2).clone()
    steps = int(k.max()) if k.numel() else 0  # one host sync
    cis = L.new_zeros(R, steps, n)
    chosen = torch.zeros(R, n, dtype=torch.bool, device=dev)
    rows = torch.arange(R, device=dev)
    for i in range(steps):
        j = d2.argmax(-1)  # first index on ties
        dj = d2[rows, j]
        e = (L[rows, j] - torch.einsum("rt,rtn->rn", cis[rows, :i, j], cis[:, :i])) / dj.clamp(min=DPP_EPS).sqrt()[:, None]
        e = torch.where((dj > DPP_EPS)[:, None], e, torch.zeros_like(e))
        active = i < k
        cis[:, i] = torch.where(active[:, None], e, torch.zeros_like(e))
        d2 = d2 - cis[:, i] ** 2
        chosen[rows[active], j[active]] = True
        d2 = d2.masked_fill(chosen, float("-inf"))
    return chosen


def conditional_relevance(z: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, image: torch.Tensor,
                          negate: bool = True) -> torch.Tensor:
    """(U, n) CDPruner relevance in [0, 1] of every token.

    z: (U, n, E) patch embeddings in the CLIP space; text: (U, M, E) instruction embeddings of each unit's sample
    (padded), text_valid (U, M); image: (U,) image index of every unit: the min-max runs over an image's units.
    """
    zn = z.float() / z.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    tn = text.float() / text.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    cos = torch.bmm(zn, tn.transpose(1, 2))  # (U, n, M)
    w = text_valid.float()[:, None, :]
    s = (cos * w).sum(-1) / w.sum(-1).clamp(min=1)
    s = -s if negate else s
    G = int(image.max()) + 1
    lo = torch.full((G,), float("inf"), device=s.device).scatter_reduce(0, image, s.amin(-1), "amin")
    hi = torch.full((G,), float("-inf"), device=s.device).scatter_reduce(0, image, s.amax(-1), "amax")
    lo, hi = lo[image][:, None], hi[image][:, None]
    return (s - lo + 1e-6) / (hi - lo).clamp(min=1e-12)


def cdpruner_select(feats: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """(U, n) bool: the k tokens of every unit chosen by the DPP with kernel diag(r)·cos(F)·diag(r)."""
    f = feats.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sim = torch.bmm(f, f.transpose(1, 2))
    kernel = relevance[:, :, None] * sim * relevance[:, None, :]
    return dpp_greedy(kernel, torch.full((feats.shape[0],), k, dtype=torch.long, device=feats.device))


# ---- the text side ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_clip(path: str) -> tuple[Any, Any]:
    """(CLIPModel in eval mode, tokenizer) of a CLIP checkpoint, once per path; ConfigError naming the field."""
    from ..model_names import BUNDLED_TEXT_ENCODERS

    folder = str(BUNDLED_TEXT_ENCODERS.get(path, path))
    try:
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"cdpruner: text_encoder={path!r} is not a loadable CLIP checkpoint (CLIPModel with its "
                          f"tokenizer, e.g. openai/clip-vit-large-patch14-336): {err}") from None
    model.requires_grad_(False)
    return model, tok


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


_SENTINEL = "\u0001vtc-instruction\u0001"


def _generation_suffix(tokenizer) -> str:
    """The chat template's text after a user message (the generation prompt), '' without a template."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                                             tokenize=False)
    except Exception:  # no / incompatible chat template: nothing to strip
        return ""
    return text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""


def prompt_instructions(prompt: PromptText, tokenizer) -> list[str]:
    """One instruction per batch row: the real tokens after the row's last visual token, decoded, up to the chat
    template's generation prompt (its first occurrence; the whole tail without a template)."""
    # the generation prompt, matched whitespace-insensitively (decoding may space tokens differently)
    suffix = "".join(_generation_suffix(tokenizer).split())
    pattern = re.compile(r"\s*".join(map(re.escape, suffix))) if suffix else None
    B, N = prompt.input_ids.shape
    idx = torch.arange(N, device=prompt.input_ids.device).expand(B, N)
    last = torch.where(prompt.is_visual, idx, torch.full_like(idx, -1)).amax(-1)
    after = prompt.attention_mask.bool() & (idx > last[:, None])
    out = []
    for b in range(B):  # one decode per sample
        text = tokenizer.decode(prompt.input_ids[b][after[b]].tolist(), skip_special_tokens=False).strip()
        hit = pattern.search(text) if pattern is not None else None
        if hit is not None:
            text = text[: hit.start()].strip()
        out.append(text)
    return out


def encode_instructions(clip, tok, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, M, E) text embeddings of each text, one row per ``max_position_embeddings``-token chunk (the official
    right-padding with id 0 to a multiple of 77), and (T, M) validity."""
    width = clip.config.text_config.max_position_embeddings
    ids = [tok(t, truncation=False)["input_ids"] for t in texts]
    chunks = [max(1, (len(i) - 1) // width + 1) for i in ids]
    rows, masks = [], []
    for i, m in zip(ids, chunks):
        row = torch.zeros(m * width, dtype=torch.long)
        row[: len(i)] = torch.tensor(i, dtype=torch.long)
        mask = torch.zeros(m * width, dtype=torch.long)
        mask[: len(i)] = 1
        rows.append(row.view(m, width))
        masks.append(mask.view(m, width))
    clip = clip.to(device)
    with torch.no_grad():
        out = clip.text_projection(clip.text_model(input_ids=torch.cat(rows).to(device),
                                                   attention_mask=torch.cat(masks).to(device)).pooler_output)
    M = max(chunks)
    emb = out.new_zeros(len(texts), M, out.shape[-1])
    valid = torch.zeros(len(texts), M, dtype=torch.bool, device=device)
    start = 0
    for t, m in enumerate(chunks):
        emb[t, :m] = out[start:start + m]
        valid[t, :m] = True
        start += m
    return emb, valid


# ---- the method ---------------------------------------------------------------------------------------------------
@register_method("cdpruner")
class CDPruner(Method):
    sides = ("vision",)

    method: Literal["cdpruner"] = "cdpruner"
    #: tokens kept per unit (image / crop), or a keep fraction
    budget: Budget
    #: path (or hub id) of a CLIP checkpoint with text tower, projections and post-LayerNorm
    text_encoder: str
    #: a fixed instruction (e.g. a benchmark's task prompt), used when ``run.set_instruction`` set none
    instruction: str | None = None
    #: where the LLM tokenizer for reading the instruction off the prompt comes from (default: the model's path)
    tokenizer: str | None = None
    #: the official relevance is the *negated* text-patch cosine (reproduced); false: the paper's sign
    negate: bool = True
    feature_space: Literal["llm"] = "llm"

    #: the runtime passes the batch's prompt (``VisionContext.prompt``) to read the instruction from
    reads_prompt: ClassVar[bool] = True

    @property
    def requires_extras(self) -> tuple[str, ...]:
        """The CLIP image space (the patch states of a CLIP vision tower, which the checkpoint's visual projection maps
        into its text space): adapters that know their tower refuse CDPruner when attached on any other (SigLIP,
        InternViT, Pixtral, Qwen's ViT, ...); the width check on the first call stays for adapters that do not say."""
        return ("clip_patch_states",)

    def attach(self, run: Any, state: Any) -> list[Any]:
        load_clip(self.text_encoder)  # fail at attach time, not mid-generate
        return []

    def _instructions(self, prompt: PromptText | None) -> list[str]:
        if prompt is None:
            raise ConfigError("cdpruner needs the prompt (run it through vtc.compress / vtc.apply; with "
                              "vtc.reduce_embeddings pass extras={'instruction_embeds': (U, M, E)})")
        if isinstance(prompt.instruction, str) or (prompt.instruction is None and self.instruction is not None):
            return [prompt.instruction or self.instruction] * prompt.input_ids.shape[0]
        if prompt.instruction is not None:
            if len(prompt.instruction) != prompt.input_ids.shape[0]:
                raise ConfigError(f"cdpruner: run.set_instruction got {len(prompt.instruction)} instructions for a "
                                  f"batch of {prompt.input_ids.shape[0]}")
            return list(prompt.instruction)
        path = self.tokenizer or prompt.name_or_path
        try:
            tok = _load_tokenizer(path) if path else None
        except (OSError, ValueError) as err:
            raise ConfigError(f"cdpruner: cannot load the tokenizer {path!r} to read the instruction off the prompt "
                              f"({err}); set 'tokenizer' or call run.set_instruction(text)") from None
        if tok is None:
            raise ConfigError("cdpruner: the model has no checkpoint path to load its tokenizer from; set 'tokenizer' "
                              "or call run.set_instruction(text)")
        return prompt_instructions(prompt, tok)

    def reduce_vision(self, ctx: VisionContext) -> Reduction:
        feats = ctx.features
        U, n, _ = feats.shape
        dev = feats.device
        img, _, _, _ = group_units(ctx.unit_image, U, dev)
        ex = ctx.extras
        text = ex.other.get("instruction_embeds")
        if text is not None:  # functional API: precomputed (U, M, E) instruction embeddings, z from 'clip_patches'
            t_emb = text().to(dev)
            t_valid = torch.ones(t_emb.shape[:2], dtype=torch.bool, device=dev)
            z = ex.require("clip_patches", self.method)
        else:
            clip, tok = load_clip(self.text_encoder)
            h = ex.require("tower_features", self.method)
            width = clip.vision_model.post_layernorm.normalized_shape[0]
            if h.shape[:2] != (U, n) or h.shape[-1] != width:
                raise ConfigError(
                    f"cdpruner: the vision tower's patch states are {tuple(h.shape)}, but text_encoder "
                    f"{self.text_encoder!r} projects {width}-wide CLIP patch states of (U={U}, n={n}) tokens; it needs "
                    "the CLIP vision tower the model was built on (LLaVA families; Qwen2-VL has no CLIP image space)"
                )
            clip = clip.to(dev)
            with torch.no_grad():
                z = clip.visual_projection(clip.vision_model.post_layernorm(h.float()))
            texts = self._instructions(ctx.prompt)
            rows = ctx.prompt.image_row[ctx.unit_image.long()] if ctx.unit_image is not None else torch.arange(U)
            uniq = sorted(set(texts))
            emb, valid = encode_instructions(clip, tok, uniq, dev)
            which = torch.tensor([uniq.index(texts[int(r)]) for r in rows.tolist()], device=dev)
            t_emb, t_valid = emb[which], valid[which]
        r = conditional_relevance(z, t_emb, t_valid, img, self.negate)
        return Reduction.from_mask(cdpruner_select(feats, r, resolve_budget(self.budget, n)))
