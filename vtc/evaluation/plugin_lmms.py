"""The ``vtc`` model for lmms-eval: any vtc-supported HF VLM, optionally compressed by a vtc config.

Registered through lmms-eval's own plugin mechanism, the ``lmms_eval.models`` entry-point group (lmms-eval
>= 0.7 loads a :class:`ModelManifest` from it), so with vtc installed::

    lmms-eval --model vtc --model_args pretrained=llava-hf/llava-1.5-7b-hf,config=llava-1.5/visionzip-64 \\
        --tasks pope,gqa --batch_size 8 --output_path results/

``model_args``: ``pretrained`` (folder or hub id, required), ``config`` (vtc config: YAML path or bundled
name; omit or ``none`` for the uncompressed model), ``device`` (default ``cuda:<local rank>`` when CUDA is
available, else ``cpu``), ``dtype`` (``auto`` = fp16 on GPU, fp32 on CPU), ``attn_implementation`` (``sdpa``),
``max_new_tokens`` (default when the task sets none: 32), ``batch_size``. Data parallelism is lmms-eval's own
(``accelerate launch --num_processes N -m lmms_eval ...``): each process loads the model on its device.

Generation is greedy (tasks asking for ``temperature > 0`` are run greedily with a warning) and stops at the
task's ``until`` strings. After every ``generate_until`` call the mean visual tokens kept, prefill FLOPs and
KV-cache size of the processed requests are logged and kept in :attr:`VTCLMM.cost_summary`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict

__all__ = ["lmms_eval_manifest", "VTCLMM"]

log = logging.getLogger("vtc.evaluation.lmms")

MODEL_ID = "vtc"
CLASS_PATH = "vtc.evaluation.plugin_lmms.VTCLMM"


def lmms_eval_manifest():
    """Entry point payload (group ``lmms_eval.models``): the manifest of the ``vtc`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


try:  # the class exists only where lmms-eval is installed
    from lmms_eval.api.model import lmms as _LMMSBase
except ImportError:  # pragma: no cover - exercised where lmms-eval is absent
    _LMMSBase = None


def _flatten(visuals) -> list:
    out = []
    for v in visuals or []:
        out.extend(_flatten(v) if isinstance(v, list | tuple) else [v])
    return out


if _LMMSBase is not None:
    import torch
    from tqdm.auto import tqdm

    class VTCLMM(_LMMSBase):
        """lmms-eval ``simple`` model wrapping an HF VLM and a vtc config (see the module docstring)."""

        is_simple = True

        def __init__(self, pretrained: str, config: str | None = None, batch_size: int | str = 1,
                     device: str | None = None, dtype: str = "auto", attn_implementation: str = "sdpa",
                     max_new_tokens: int = 32, max_batch_size: int | None = None, **kwargs) -> None:
            super().__init__()
            if kwargs:
                raise ValueError(f"vtc lmms-eval model: unknown model_args {sorted(kwargs)} (allowed: pretrained, "
                                 "config, batch_size, device, dtype, attn_implementation, max_new_tokens)")
            import vtc

            from .runner import load_vlm

            self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
            self._rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if device in (None, "", "auto") or (device == "cuda" and self._world_size > 1):
                device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
            self._device = torch.device(device)
            if self._world_size > 1:
                from accelerate import Accelerator

                self.accelerator = Accelerator(cpu=self._device.type == "cpu")
            self._model, self._processor = load_vlm(pretrained, device=str(self._device), dtype=dtype,
                                                    attn=attn_implementation)
            cfg = None if config in (None, "", "none", "None") else vtc.load_config(config)
            self.vtc_config = cfg
            self._run = vtc.compress(self._model, cfg) if cfg is not None else None  # validated here
            self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
            self.max_new_tokens = int(max_new_tokens)
            self.cost_summary: dict = {}

        # ---- properties lmms-eval reads ----------------------------------------------------------------------
        @property
        def model(self):
            return self._model

        @property
        def tokenizer(self):
            return self._processor.tokenizer

        @property
        def batch_size(self) -> int:
            return self.batch_size_per_gpu

        @property
        def device(self):
            return self._device

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        # ---- helpers -----------------------------------------------------------------------------------------
        def _prompt(self, context: str, n_images: int) -> str:
            from .runner import build_prompt

            proc = self._processor
            token = getattr(proc, "image_token", None) or "<image>"
            if n_images == 0 or token in context:  # the task wrote its own placeholders / text-only
                if getattr(proc, "chat_template", None):
                    conv = [{"role": "user", "content": [{"type": "text", "text": context}]}]
                    return proc.apply_chat_template(conv, add_generation_prompt=True)
                return f"USER: {context} ASSISTANT:"
            if n_images == 1:
                return build_prompt(proc, context)
            if getattr(proc, "chat_template", None):
                content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
                return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            return "USER: " + "\n".join([token] * n_images) + f"\n{context} ASSISTANT:"

        def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
            if doc_to_visual is None:
                return []
            return [v.convert("RGB") if hasattr(v, "convert") else v
                    for v in _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))]

        def _log_costs(self, costs: list[dict]) -> None:
            if not costs:
                return
            n = len(costs)
            self.cost_summary = {
                "requests": n,
                "visual_tokens_in": sum(c["visual_tokens_in"] for c in costs) / n,
                "visual_tokens": sum(c["visual_tokens"] for c in costs) / n,
                "prefill_tflops": sum(c["prefill_flops"] for c in costs) / n / 1e12,
                "kv_cache_mb": sum(c["kv_cache_bytes"] for c in costs) / n / 2**20,
                "prefill_ms": sum(c["prefill_ms"] for c in costs) / n,
            }
            if self.rank == 0:
                name = (self.vtc_config.name or "config") if self.vtc_config is not None else "uncompressed"
                print(f"vtc ({name}): " + json.dumps({k: round(v, 4) for k, v in self.cost_summary.items()}),
                      file=sys.stderr)

        # ---- lmms API ----------------------------------------------------------------------------------------
        def generate_until(self, requests) -> list[str]:
            from .generation import BatchAnswerer

            results: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = defaultdict(list)
            for i, req in enumerate(requests):
                gen_kwargs = dict(req.args[1] or {})
                key = json.dumps({k: gen_kwargs.get(k) for k in ("until", "max_new_tokens", "temperature")},
                                 sort_keys=True, default=str)
                groups[key].append(i)
            costs: list[dict] = []
            bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vtc responding")
            try:
                if self._run is not None:
                    self._run.attach()
                for key, idx in groups.items():
                    gk = json.loads(key)
                    until = gk.get("until") or []
                    until = [until] if isinstance(until, str) else list(until)
                    if (gk.get("temperature") or 0) > 0:
                        log.warning("vtc lmms-eval model: temperature > 0 requested; generating greedily")
                    max_new = int(gk.get("max_new_tokens") or self.max_new_tokens)
                    with BatchAnswerer(self._model, self._processor, self._run, max_new_tokens=max_new,
                                   stop=until) as gen:
                        for b in range(0, len(idx), self.batch_size):
                            chunk = idx[b:b + self.batch_size]
                            # one call per number of images: a batch must be uniform for the processor
                            by_n: dict[int, list[tuple[int, list]]] = defaultdict(list)
                            for i in chunk:
                                ctx, _, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                                vis = self._visuals(doc_to_visual, task, split, doc_id)
                                by_n[len(vis)].append((i, vis))
                            for n_img, items in by_n.items():
                                prompts = [self._prompt(requests[i].args[0], n_img) for i, _ in items]
                                images = [im for _, vis in items for im in vis] or None
                                texts, c = gen(images, prompts)
                                costs.extend(c)
                                for (i, _), t in zip(items, texts):
                                    results[i] = t
                                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gk), t)
                            bar.update(len(chunk))
            finally:
                if self._run is not None:
                    self._run.remove()
                bar.close()
            self._log_costs(costs)
            return [r if r is not None else "" for r in results]

        @torch.no_grad()
        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            out = []
            try:
                if self._run is not None:
                    self._run.attach()
                for req in tqdm(requests, disable=self.rank != 0, desc="vtc loglikelihood"):
                    context, continuation, doc_to_visual, doc_id, task, split = req.args[:6]
                    doc = self.task_dict[task][split][doc_id]
                    cont = continuation if isinstance(continuation, str) else continuation(doc)
                    vis = self._visuals(doc_to_visual, task, split, doc_id)
                    prompt = self._prompt(context, len(vis))
                    n_cont = len(self.tokenizer(cont, add_special_tokens=False)["input_ids"])
                    inputs = self._processor(images=vis or None, text=[prompt + cont], return_tensors="pt")
                    inputs = inputs.to(self._device)
                    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
                        inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
                    logits = self._model(**inputs).logits  # text tokens are never pruned: the tail is aligned
                    target = inputs["input_ids"][:, -n_cont:]
                    logp = torch.log_softmax(logits[:, -n_cont - 1:-1].float(), dim=-1)
                    tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                    greedy = bool((logp.argmax(-1) == target).all())
                    out.append((float(tok_lp.sum()), greedy))
            finally:
                if self._run is not None:
                    self._run.remove()
            return out

        def generate_until_multi_round(self, requests) -> list[str]:
            raise NotImplementedError("the vtc lmms-eval model does not implement multi-round generation")
else:  # pragma: no cover
    VTCLMM = None
