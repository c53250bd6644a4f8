"""Batched, resumable, data-parallel evaluation of a VLM with and without vtc configs on one benchmark.

One run evaluates the uncompressed baseline (``compare=True``) and every config on the same questions:

- **generation**: greedy ``model.generate`` on batches of ``batch_size`` left-padded prompts (the processor's
  chat template with one image and the task's answer-format suffix); images of the next batch are decoded on a
  background thread.
- **cache / resume**: every finished batch is appended (and flushed to disk) to
  ``<out>/predictions/<method>.jsonl``, whose first line records what produced it (task, model, config,
  generation settings). Re-running the same command skips the cached questions, so an interrupted run resumes
  and adding a config to a finished run costs only that config; a cache written by different settings is an
  error (``overwrite=True`` starts afresh). A torn last line (a crash mid-write) is dropped.
- **data parallel**: under ``accelerate launch --multi_gpu --num_processes N`` (or ``vtc eval
  --num-processes N``, or torchrun) the pending questions are cut into the batches a single process would
  run and whole batches are dealt to the processes, so every question sees exactly the batch it would see
  alone: the gathered predictions and scores equal the single-process run. Each process appends to its own
  ``<method>.rank<r>.jsonl``; rank 0 gathers, merges them into the cache and scores.
- **cost per question**: visual tokens entering the LLM and after every stage (from ``run.stats``), the
  visual tokens averaged over decoder layers, the analytic LLM prefill FLOPs (:mod:`vtc.flops`, with each
  decoder layer's real sequence length), the KV-cache bytes after prefill, and the measured prefill time
  (from the ``generate`` call to the end of the first forward, per batch, divided by the batch size).
- **output**: ``<out>/results.json`` and ``results.csv`` (one row per method: score, score relative to the
  baseline, visual tokens, prefill ms, prefill TFLOPs, KV-cache MB), ``<out>/accuracy_vs_tokens.png`` with
  ``plot=True``, and ``<out>/<method>.submission.json`` in the evaluation server's format for VQAv2, TextVQA
  and GQA.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import metrics as M
from .datasets import EvalSample, TaskSpec, load_task

__all__ = ["EvalOptions", "EvalError", "Generator", "PredictionCache", "load_vlm", "predict", "score",
           "summarize", "run_eval", "plot_results", "build_prompt"]


class EvalError(ValueError):
    """A problem with the evaluation request (model, cache, options); the message says what to change."""


# ---- model ------------------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise EvalError(f"--dtype {dtype!r} is not supported (allowed: auto, {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def load_vlm(path: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype = "auto",
             attn: str = "sdpa"):
    """(model, processor) from a local folder or hub id, checked to be a VLM that vtc supports.

    Raises :class:`EvalError` if the path does not exist / cannot be loaded or the model is not a supported
    vision-language model.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vtc.demo.ordered_vlm import register
    from vtc.errors import ConfigError
    from vtc.models import get_adapter, supported_models

    register()  # the demo 1D model's classes, for AutoConfig / AutoModel

    path = str(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        where = "the folder has no usable config.json" if os.path.isdir(path) else \
            "no such local folder, and not loadable as a hub id"
        raise EvalError(f"--model {path}: {where} ({str(err).splitlines()[0]})") from None
    vision = getattr(config, "vision_config", None)
    if vision is None:
        archs = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise EvalError(f"--model {path}: {archs} (model_type '{config.model_type}') is not a vision-language "
                        f"model; vtc eval needs one of: {', '.join(supported_models())}")
    torch_dtype = _resolve_dtype(dtype, device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn,
            device_map=str(device) if str(device).startswith("cuda") else None)
    except ValueError as err:
        raise EvalError(f"--model {path}: cannot load it as an image-text-to-text model "
                        f"({str(err).splitlines()[0]}); supported: {', '.join(supported_models())}") from None
    try:
        get_adapter(model)
    except ConfigError as err:
        raise EvalError(f"--model {path}: {err}") from None
    processor = AutoProcessor.from_pretrained(path)
    if not hasattr(processor, "image_processor"):
        raise EvalError(f"--model {path}: its processor ({type(processor).__name__}) has no image processor")
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


def build_prompt(processor, question: str) -> str:
    """The chat-formatted single-image prompt for ``question`` (the model's chat template, or LLaVA-1.5's
    ``USER: <image>\\n{question} ASSISTANT:`` when the processor has none)."""
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {token}\n{question} ASSISTANT:"


# ---- one batch: generate, time, count -----------------------------------------------------------------------------
class Generator:
    """Greedy batched answers of a (possibly compressed) VLM, with the per-question cost.

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

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def __call__(self, images: list, prompts: list[str], max_new_tokens: int | None = None
                 ) -> tuple[list[str], list[dict]]:
        """(answers, per-question cost dicts) of one batch."""
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
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
        out = []
        for i in range(len(vis_in)):
            text = int(real[i]) - int(vis_in[i])
            cur = int(llm_in[i])
            seq = []
            for layer in range(L):
                if stats is not None and layer in stats.tokens_per_layer:
                    cur = int(stats.tokens_per_layer[layer][i])
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


# ---- prediction cache ------------------------------------------------------------------------------------------------
_META_KEYS = ("task", "model", "config", "max_new_tokens", "prompt_suffix", "dtype")


class PredictionCache:
    """Append-only JSONL of predictions (``{"meta": ...}`` first, then one record per question).

    ``rank`` / ``world``: under data parallelism each process appends to ``<stem>.rank<r>.jsonl``; reading
    merges the main file and every rank file.
    """

    def __init__(self, path: Path, meta: dict, *, overwrite: bool = False, rank: int = 0, world: int = 1):
        self.path = Path(path)
        self.meta = json.loads(json.dumps(meta, default=str))  # as it reads back (tuples -> lists)
        self.rank, self.world = rank, world
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and rank == 0:
            for p in self._all_files():
                p.unlink()

    def _rank_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.rank*.jsonl"))

    def _all_files(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + self._rank_files()

    @property
    def write_path(self) -> Path:
        return self.path if self.world == 1 else self.path.with_name(f"{self.path.stem}.rank{self.rank}.jsonl")

    def _check_meta(self, path: Path, meta: dict) -> None:
        for k in _META_KEYS:
            if meta.get(k) != self.meta.get(k):
                raise EvalError(f"{path}: cached predictions were made with a different {k} "
                                f"({meta.get(k)!r}, now {self.meta.get(k)!r}); pass --overwrite to discard "
                                "them or choose another --out")

    def load(self) -> dict[str, dict]:
        """Cached records by question id (a torn or malformed line is skipped with a warning)."""
        records: dict[str, dict] = {}
        for path in self._all_files():
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            for n, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    print(f"vtc eval: {path}:{n + 1}: skipping an unreadable line (interrupted write?)",
                          file=sys.stderr)
                    continue
                if "meta" in rec:
                    self._check_meta(path, rec["meta"])
                elif "id" in rec:
                    records[str(rec["id"])] = rec
        return records

    def append(self, records: list[dict]) -> None:
        """Append records and flush them to disk (a crash after this loses nothing)."""
        path = self.write_path
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            with open(path, "rb+") as f:  # drop a torn last line so the next record starts on its own line
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 1))
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    f.truncate(data.rfind(b"\n") + 1)
        with open(path, "a", encoding="utf-8") as f:
            if fresh or path.stat().st_size == 0:
                f.write(json.dumps({"meta": self.meta}) + "\n")
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _main_ids(self) -> set[str]:
        if not self.path.exists():
            return set()
        ids = set()
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "id" in rec:
                    ids.add(str(rec["id"]))
        return ids

    def merge(self, records: list[dict] | None = None) -> None:
        """Rank 0 after a data-parallel pass (``records``: the gathered new records), or any later run that
        finds rank files of an interrupted one: move every record into the main file, delete the rank files."""
        if records is None:
            records = list(self.load().values())
        have = self._main_ids()
        todo = [r for r in records if str(r["id"]) not in have]
        world, self.world = self.world, 1
        try:
            if todo:
                self.append(todo)
        finally:
            self.world = world
        for p in self._rank_files():
            p.unlink()


# ---- predict ---------------------------------------------------------------------------------------------------------
def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def predict(model, processor, samples: Sequence[EvalSample], *, config=None, batch_size: int = 8,
            max_new_tokens: int = 16, prompt_suffix: str = "", cache: PredictionCache | None = None,
            rank: int = 0, world: int = 1, progress: bool = False, desc: str = "") -> dict[str, dict]:
    """Answer ``samples`` (those not in ``cache``) with ``config`` attached (``None``: uncompressed).

    Returns this process's new records by question id (``{"id", "prediction", <costs>}``); with a cache, each
    batch is appended as soon as it is done. Under data parallelism (``world > 1``) the pending questions are
    cut into batches of ``batch_size`` and process ``rank`` takes batches ``rank, rank + world, ...``.
    """
    import vtc

    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    done = cache.load() if cache is not None else {}
    pending = [s for s in samples if s.id not in done]
    mine = _batches(pending, batch_size)[rank::world]
    new: dict[str, dict] = {}
    if not mine:
        return new
    run = vtc.compress(model, config) if config is not None else None
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending), desc=desc or "eval", unit="q", dynamic_ncols=True)

    def load(batch):
        return [s.load_image() for s in batch]

    try:
        if run is not None:
            run.attach()
        with Generator(model, processor, run, max_new_tokens=max_new_tokens) as gen, \
                ThreadPoolExecutor(max_workers=1) as pool:
            nxt = pool.submit(load, mine[0])
            for b, batch in enumerate(mine):
                images = nxt.result()
                if b + 1 < len(mine):
                    nxt = pool.submit(load, mine[b + 1])
                prompts = [build_prompt(processor, s.question + prompt_suffix) for s in batch]
                texts, costs = gen(images, prompts)
                recs = [{"id": s.id, "prediction": t, **c} for s, t, c in zip(batch, texts, costs)]
                if cache is not None:
                    cache.append(recs)
                new.update((r["id"], r) for r in recs)
                if bar is not None:  # rank 0 stands for all processes (they run batches of the same size)
                    bar.update(min(len(batch) * world, bar.total - bar.n))
    finally:
        if run is not None:
            run.remove()
        if bar is not None:
            bar.close()
    return new


# ---- scoring ---------------------------------------------------------------------------------------------------------
def score(spec: TaskSpec, samples: Sequence[EvalSample], predictions: dict[str, str]) -> dict[str, Any]:
    """The task's metric on ``predictions`` (question id -> answer text): ``{"metric", "score" (0-100 or
    None without references), "n", "per_category", ...}``."""
    have = [s for s in samples if s.id in predictions]
    scored = [s for s in have if s.answers is not None]
    out: dict[str, Any] = {"metric": spec.metric, "n": len(have), "n_scored": len(scored)}
    if not scored:
        out.update(score=None, note="no reference answers in this split: see the submission file")
        return out
    if spec.metric == "pope":
        preds = [M.pope_yes_no(predictions[s.id]) for s in scored]
        labels = [s.answers[0] for s in scored]
        pooled = M.pope_metrics(preds, labels)
        cats: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(scored):
            cats[s.category].append(i)
        per = {c: M.pope_metrics([preds[i] for i in ix], [labels[i] for i in ix]) for c, ix in sorted(cats.items())}
        out.update({k: pooled[k] * 100 for k in ("accuracy", "precision", "recall", "f1")})
        out["yes_ratio"] = pooled["yes_ratio"]
        out["score"] = pooled["f1"] * 100
        out["f1_mean_over_categories"] = 100 * sum(p["f1"] for p in per.values()) / len(per)
        out["per_category"] = {c: {k: round(v * 100, 4) if k in ("accuracy", "precision", "recall", "f1") else v
                                   for k, v in p.items()} for c, p in per.items()}
        return out
    fn = {"vqav2": M.vqav2_accuracy, "textvqa": M.textvqa_accuracy,
          "exact_match": lambda p, a: M.exact_match(p, a[0]),
          "first_word": lambda p, a: float(M.first_word(p) == a[0].lower())}[spec.metric]
    values = [fn(predictions[s.id], s.answers) for s in scored]
    out["score"] = 100 * sum(values) / len(values)
    cats = defaultdict(list)
    for s, v in zip(scored, values):
        if s.category:
            cats[s.category].append(v)
    if cats:
        out["per_category"] = {c: 100 * sum(v) / len(v) for c, v in sorted(cats.items())}
    return out


def summarize(records: Sequence[dict]) -> dict[str, float]:
    """Means over questions of the per-question costs."""
    n = max(1, len(records))

    def mean(key):
        return sum(float(r.get(key, 0.0)) for r in records) / n

    return {
        "visual_tokens_in": mean("visual_tokens_in"),
        "visual_tokens_llm_in": mean("visual_tokens_llm_in"),
        "visual_tokens": mean("visual_tokens"),
        "visual_tokens_avg_layer": mean("visual_tokens_avg_layer"),
        "text_tokens": mean("text_tokens"),
        "prefill_ms": mean("prefill_ms"),
        "prefill_tflops": mean("prefill_flops") / 1e12,
        "kv_cache_mb": mean("kv_cache_bytes") / 2**20,
    }


# ---- the whole run ------------------------------------------------------------------------------------------------
@dataclass
class EvalOptions:
    """Everything ``vtc eval`` takes (see :func:`vtc.evaluation.cli.main` for the flags)."""

    task: str
    model: str | None = None
    configs: list[str] = field(default_factory=list)
    compare: bool = False
    data: str | None = None
    questions: str | None = None
    annotations: str | None = None
    images: str | None = None
    split: str = "test"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    prompt_suffix: str | None = None
    out: str | None = None
    plot: bool = False
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "sdpa"
    overwrite: bool = False
    progress: bool = True
    quiet: bool = False


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or "config"


def _distributed(device: str):
    """(state | None, rank, world): accelerate's PartialState when launched with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0, 1
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    return state, state.process_index, state.num_processes


def _methods(configs: Sequence[str], compare: bool) -> list[dict]:
    import vtc

    methods = []
    if compare or not configs:
        methods.append({"name": "baseline", "family": "baseline", "config": None, "tag": "baseline"})
    tags = {"baseline"}
    for i, c in enumerate(configs):
        cfg = vtc.load_config(c)
        name = cfg.name or (Path(c).stem if isinstance(c, str) and "\n" not in c else f"config{i}")
        tag = _slug(Path(c).stem if isinstance(c, str) and "\n" not in c and not cfg.name else name)
        while tag in tags:
            tag = f"{tag}-{i}"
        tags.add(tag)
        family = "+".join(s.method for s in cfg.stages) or "baseline"
        methods.append({"name": name, "family": family, "config": cfg, "tag": tag})
    return methods


def run_eval(opts: EvalOptions) -> dict | None:
    """Evaluate the baseline and/or configs on a task; write results; return the report (rank 0; other
    processes of a data-parallel run return ``None``)."""
    import vtc

    device = opts.device
    state, rank, world = _distributed(device)
    if device == "auto":
        device = str(state.device) if state is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    spec, samples = load_task(opts.task, opts.data, limit=opts.limit, questions=opts.questions,
                              annotations=opts.annotations, images=opts.images,
                              **({"split": opts.split} if opts.task == "synthetic" else {}))
    model_path = opts.model
    if model_path is None:
        if opts.task != "synthetic":
            raise EvalError("--model is required (a local folder or hub id of a VLM, e.g. llava-hf/llava-1.5-7b-hf)")
        from vtc.demo import GRID_MODEL_PATH

        if not (GRID_MODEL_PATH / "config.json").exists():
            raise EvalError(f"the bundled demo model is missing at {GRID_MODEL_PATH}; give --model "
                            "or retrain it from a checkout with `python eval/train_demo.py --model grid`")
        model_path = str(GRID_MODEL_PATH)
    methods = _methods(opts.configs, opts.compare)
    model, processor = load_vlm(model_path, device=device, dtype=opts.dtype, attn=opts.attn)
    for m in methods:  # validate every config against the model before generating anything
        if m["config"] is not None:
            vtc.compress(model, m["config"])
    max_new = opts.max_new_tokens or spec.max_new_tokens
    suffix = spec.prompt_suffix if opts.prompt_suffix is None else opts.prompt_suffix
    out_dir = Path(opts.out or Path("vtc-eval") / opts.task)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    rows, details = [], {}
    t_start = time.perf_counter()
    for m in methods:
        meta = {"task": opts.task, "model": str(model_path), "max_new_tokens": max_new, "prompt_suffix": suffix,
                "dtype": dtype_name, "config": m["config"].to_dict() if m["config"] is not None else None}
        cache = PredictionCache(out_dir / "predictions" / f"{m['tag']}.jsonl", meta, overwrite=opts.overwrite,
                                rank=rank, world=world)
        if state is not None:
            state.wait_for_everyone()  # rank 0 may have just cleared the cache
        new = predict(model, processor, samples, config=m["config"], batch_size=opts.batch_size,
                      max_new_tokens=max_new, prompt_suffix=suffix, cache=cache, rank=rank, world=world,
                      progress=opts.progress, desc=m["name"])
        if state is not None:
            from accelerate.utils import gather_object

            gathered = gather_object([list(new.values())])
            if rank == 0:
                cache.merge([r for part in gathered for r in part])
            state.wait_for_everyone()
        if rank != 0:
            continue
        if cache._rank_files():  # left by an interrupted data-parallel run
            cache.merge()
        records = cache.load()
        missing = [s.id for s in samples if s.id not in records]
        if missing:
            raise EvalError(f"{cache.path}: {len(missing)} questions have no prediction (e.g. {missing[:3]})")
        ordered = [records[s.id] for s in samples]
        res = score(spec, samples, {s.id: records[s.id]["prediction"] for s in samples})
        row = {"task": opts.task, "method": m["name"], "family": m["family"], "tag": m["tag"], "n": len(samples),
               "metric": res["metric"], "score": res["score"], "relative": None, **summarize(ordered)}
        rows.append(row)
        details[m["tag"]] = {"scores": res, "config": meta["config"],
                             "stages": next((r["stages"] for r in ordered if "stages" in r), [])}
        _write_submission(spec, samples, records, out_dir / f"{m['tag']}.submission.json")
    if rank != 0:
        return None
    base = next((r for r in rows if r["tag"] == "baseline"), None)
    for r in rows:
        if base is not None and base["score"] and r["score"] is not None:
            r["relative"] = 100 * r["score"] / base["score"]
    report = {"task": opts.task, "description": spec.description, "model": str(model_path), "device": device,
              "dtype": dtype_name, "world_size": world, "n": len(samples), "max_new_tokens": max_new,
              "prompt_suffix": suffix, "rows": rows, "details": details, "options": asdict(opts),
              "vtc_version": vtc.__version__, "wall_s": time.perf_counter() - t_start}
    write_results(report, out_dir)
    if opts.plot:
        report["plot"] = str(plot_results(rows, out_dir / "accuracy_vs_tokens.png",
                                          title=f"{opts.task} — {Path(str(model_path)).name}"))
    if not opts.quiet:
        print(format_table(report))
        print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.csv'}"
              + (f", {report['plot']}" if opts.plot else ""))
    return report


def _write_submission(spec: TaskSpec, samples: Sequence[EvalSample], records: dict, path: Path) -> None:
    if spec.name in ("vqav2", "textvqa"):
        sub = [{"question_id": s.meta.get("question_id", s.id), "answer": M.normalize_answer(records[s.id]["prediction"])}
               for s in samples]
    elif spec.name == "gqa":
        sub = [{"questionId": s.id, "prediction": M.gqa_normalize(records[s.id]["prediction"])} for s in samples]
    else:
        return
    path.write_text(json.dumps(sub))


CSV_COLUMNS = ("task", "method", "family", "n", "metric", "score", "relative", "visual_tokens_in",
               "visual_tokens_llm_in", "visual_tokens", "visual_tokens_avg_layer", "prefill_ms", "prefill_tflops",
               "kv_cache_mb")


def write_results(report: dict, out_dir: Path) -> None:
    """``results.json`` (everything) and ``results.csv`` (one row per method)."""
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in report["rows"]:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def format_table(report: dict) -> str:
    head = (f"{'method':<28}{'score':>8}{'rel %':>8}{'vis in':>8}{'vis kept':>10}{'vis avg':>9}"
            f"{'prefill ms':>12}{'TFLOPs':>9}{'KV MB':>9}")
    lines = [f"{report['description']} — {report['model']} (n={report['n']}, {report['dtype']}, "
             f"{report['device']}, {report['world_size']} process(es))", head, "-" * len(head)]
    for r in report["rows"]:
        sc = "n/a" if r["score"] is None else f"{r['score']:.2f}"
        rel = "" if r["relative"] is None else f"{r['relative']:.1f}"
        lines.append(f"{r['method'][:27]:<28}{sc:>8}{rel:>8}{r['visual_tokens_in']:>8.1f}{r['visual_tokens']:>10.1f}"
                     f"{r['visual_tokens_avg_layer']:>9.1f}{r['prefill_ms']:>12.2f}{r['prefill_tflops']:>9.4f}"
                     f"{r['kv_cache_mb']:>9.2f}")
    return "\n".join(lines)


def plot_results(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Score against visual tokens kept, one line per method family, the baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    fams: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["score"] is not None:
            fams[r["family"]].append(r)
    for fam, rs in fams.items():
        rs = sorted(rs, key=lambda r: r["visual_tokens"])
        xs, ys = [r["visual_tokens"] for r in rs], [r["score"] for r in rs]
        if fam == "baseline":
            ax.axhline(ys[0], color="0.4", ls="--", lw=1)
            ax.plot(xs, ys, "k*", ms=11, label="baseline")
            continue
        ax.plot(xs, ys, "o-", label=fam)
        for r in rs:
            ax.annotate(r["method"], (r["visual_tokens"], r["score"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    metric = rows[0]["metric"] if rows else ""
    ax.set_xlabel("visual tokens kept per question (entering the last decoder layer)")
    ax.set_ylabel({"pope": "F1", "first_word": "accuracy", "exact_match": "accuracy"}.get(metric, "VQA accuracy"))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
