"""Answers of a (possibly compressed) VLM, one batch at a time, with what each answer cost.

- :func:`load_vlm`: a VLM folder, cached hub id or bundled name (:mod:`vtc.model_names`) -> (model, processor),
  checked to be a model vtc supports.
- :func:`build_prompt`: the chat-formatted single-image prompt of a question.
- :class:`BatchAnswerer`: greedy ``generate`` on a left-padded batch; per question: the visual tokens entering the
  LLM, the last layer and averaged over layers, analytic prefill FLOPs and KV-cache bytes (:mod:`vtc.flops`),
  and the measured prefill time (``generate`` call to the end of its first forward, divided by the batch size).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch

from .options import EvalError

__all__ = ["BatchAnswerer", "load_vlm", "build_prompt"]


# ---- model ------------------------------------------------------------------------------------------------------
def load_vlm(path: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype = "auto",
             attn: str = "sdpa"):
    """:func:`vtc.loading.load_vlm` (the one loader), its errors raised as :class:`EvalError`."""
    from vtc.loading import ModelLoadError
    from vtc.loading import load_vlm as load

    try:
        return load(path, device=device, dtype=dtype, attn=attn)
    except ModelLoadError as err:
        raise EvalError(str(err)) from None


def build_prompt(processor, question: str) -> str:
    """The chat-formatted single-image prompt for ``question`` (the model's chat template, or LLaVA-1.5's
    ``USER: <image>\\n{question} ASSISTANT:`` when the processor has none)."""
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {token}\n{question} ASSISTANT:"


# ---- one batch: generate, time, count -----------------------------------------------------------------------------
class BatchAnswerer:
    """Answers a batch of questions greedily with a (possibly compressed) VLM, with each answer's cost.

    ``run``: the attached :class:`vtc.Run` (or ``None`` for the uncompressed model); its ``stats`` describe each
    batch's prefill. Call :meth:`close` (or use as a context manager) to remove the timing hook.
    """

    def __init__(self, model, processor, run=None, *, max_new_tokens: int = 16, stop: Sequence[str] = ()):
        from vtc.flops import LMShape
        from vtc.models import get_adapter

        self.model = model
        self.processor = processor
        self.run = run
        self.adapter = run.adapter if run is not None else get_adapter(model)
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.shape = LMShape.from_config(model.config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.bytes_per_value = torch.finfo(self.dtype).bits // 8
        self._prefill_end: float | None = None
        self._prefill_lens: list[int] | None = None
        # registered after the run's hooks: the pre-hook sees the prompt the LLM really gets (vision-side
        # stages shorten it), the forward hook marks the end of the prefill
        self._handles = [model.register_forward_pre_hook(self._on_pre_forward, with_kwargs=True),
                         model.register_forward_hook(self._on_forward)]

    def _on_pre_forward(self, module, args, kwargs):
        if self._prefill_lens is None:
            mask = kwargs.get("attention_mask")
            ref = kwargs.get("inputs_embeds")
            ref = ref if ref is not None else kwargs.get("input_ids", args[0] if args else None)
            if mask is not None and mask.dim() == 2:
                self._prefill_lens = mask.sum(-1).tolist()
            elif ref is not None:
                self._prefill_lens = [int(ref.shape[1])] * int(ref.shape[0])
        return None

    def _on_forward(self, module, args, output):
        if self._prefill_end is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._prefill_end = time.perf_counter()

    def close(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> BatchAnswerer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _inputs(self, images: list, prompts: list[str]):
        self.processor.tokenizer.padding_side = "left"
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    @torch.no_grad()
    def warm_up(self, images: list, prompts: list[str]) -> None:
        """One untimed prefill of a batch (first-call allocations, kernel selection), nothing recorded."""
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.model.generate(**self._inputs(images, prompts), max_new_tokens=1, do_sample=False, num_beams=1,
                            pad_token_id=pad)

    @torch.no_grad()
    def __call__(self, images: list, prompts: list[str], max_new_tokens: int | None = None
                 ) -> tuple[list[str], list[dict]]:
        """(answers, per-question cost dicts) of one batch."""
        tok = self.processor.tokenizer
        inputs = self._inputs(images, prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prefill_end, self._prefill_lens = None, None
        t0 = time.perf_counter()
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                  do_sample=False, num_beams=1, pad_token_id=pad)
        prefill_s = (self._prefill_end or time.perf_counter()) - t0
        texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        texts = [self._cut(t) for t in texts]
        costs = self.costs(inputs)
        for c in costs:
            c["prefill_ms"] = prefill_s * 1e3 / len(texts)
            c["batch_prefill_ms"] = prefill_s * 1e3
            c["batch_size"] = len(texts)
        return texts, costs

    def _cut(self, text: str) -> str:
        for s in self.stop:
            if s and s in text:
                text = text.split(s, 1)[0]
        return text.strip()

    def costs(self, inputs) -> list[dict]:
        """Per question, for the last batch: visual tokens in the prompt / entering the LLM (after vision-side
        stages) / entering the last decoder layer / averaged over decoder layers, text tokens, analytic
        prefill FLOPs and KV-cache bytes (each decoder layer with its own real sequence length).

        Visual tokens are every image position of the sequence, LLaVA-NeXT's newline tokens included.
        """
        from vtc.flops import kv_cache_bytes, prefill_flops

        ids = inputs["input_ids"]
        tm = self.adapter.token_map(ids, dict(inputs))
        vis_in = tm.is_visual.sum(-1).tolist()
        mask = inputs.get("attention_mask")
        real = (mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
        llm_in = self._prefill_lens if self._prefill_lens is not None else real
        stats = self.run.stats if self.run is not None else None
        L = self.shape.layers
        per_layer = stats.tokens_per_layer if stats is not None else {}  # converted once (one host sync)
        out = []
        for i in range(len(vis_in)):
            text = int(real[i]) - int(vis_in[i])
            cur = int(llm_in[i])
            seq = []
            for layer in range(L):
                if layer in per_layer:
                    cur = int(per_layer[layer][i])
                seq.append(cur)
            out.append({
                "visual_tokens_in": int(vis_in[i]),
                "visual_tokens_llm_in": int(llm_in[i]) - text,
                "visual_tokens": seq[-1] - text,
                "visual_tokens_avg_layer": sum(seq) / L - text,
                "text_tokens": text,
                "prefill_flops": prefill_flops(self.shape, seq),
                "kv_cache_bytes": kv_cache_bytes(self.shape, seq, self.bytes_per_value),
            })
        if stats is not None and stats.stages:
            out[0]["stages"] = [s.as_dict() for s in stats.stages]  # batch-level detail, kept once
        return out
