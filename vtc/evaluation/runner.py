"""One ``vtc eval`` run: the uncompressed baseline (``compare=True``), optionally the blind baseline
(``blind=True``: the same questions on blank images) and every config, on the same questions.

- **generation** (:mod:`.generation`): greedy ``generate`` on left-padded batches; images of the next step are
  decoded on a background thread. The methods run **interleaved batch by batch** (batch 1 with every method,
  then batch 2, ...), after one untimed warm-up batch each, so their prefill times are measured side by side
  and a busy moment of the machine hits all of them alike.
- **cache / resume** (:mod:`.cache`): every finished batch is appended to ``<out>/predictions/<method>.jsonl``;
  re-running skips the cached questions; other settings or other data start that cache afresh with a notice.
  Every record names the run that made it, and the report says which rows' timings come from earlier runs.
- **data parallel** (:mod:`.distributed`): whole batches dealt to the processes, gathered on rank 0.
- **scores** (:mod:`.scoring`): the task's metric with a 95% bootstrap interval, per category, relative to the
  baseline with a paired interval, agreement with the baseline's answers; costs per question are summarised as
  means (tokens, FLOPs, KV cache) and the median with the IQR (prefill time).
- **output** (:mod:`.report`, :mod:`.plot`): ``results.json``, ``results.csv``, the printed table,
  ``accuracy_vs_tokens.png`` (``plot=True``) and the submission files of VQAv2, TextVQA and GQA.
"""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed as D
from .cache import PredictionCache, model_fingerprint, sample_key
from .confidence import median_iqr
from .datasets import EvalSample, load_task
from .generation import BatchAnswerer, build_prompt, load_vlm
from .options import EvalError, EvalOptions
from .plot import plot_results
from .report import format_table, write_results, write_submission
from .scoring import agreement, relative_ci, score

__all__ = ["EvalOptions", "EvalError", "BatchAnswerer", "PredictionCache", "Method", "load_vlm", "predict",
           "score", "summarize", "run_eval", "plot_results", "build_prompt", "config_family"]


@dataclass
class Method:
    """One row of the evaluation: the uncompressed model (``config=None``), the blind baseline or a config."""

    name: str
    family: str
    tag: str
    config: Any = None
    blind: bool = False


def config_family(config) -> str:
    """Methods, side and layers of a config: ``visionzip``, ``fastv@L2``, ``visionzip+pact@L4``,
    ``transprune@L7/9/12`` (configs of one family differ only in budgets)."""
    parts = []
    for s in config.stages:
        layers = s.llm_layers()
        parts.append(f"{s.method}@L{'/'.join(str(x) for x in layers)}" if layers else s.method)
    return "+".join(parts) or "baseline"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or "config"


def _methods(configs: Sequence[str], compare: bool, blind: bool = False) -> list[Method]:
    import vtc

    methods = []
    if compare or not configs:
        methods.append(Method("baseline", "baseline", "baseline"))
    if blind:
        methods.append(Method("blind", "blind", "blind", blind=True))
    tags = {"baseline", "blind"}
    for i, c in enumerate(configs):
        cfg = vtc.load_config(c)
        name = cfg.name or (Path(c).stem if isinstance(c, str) and "\n" not in c else f"config{i}")
        tag = _slug(Path(c).stem if isinstance(c, str) and "\n" not in c and not cfg.name else name)
        while tag in tags:
            tag = f"{tag}-{i}"
        tags.add(tag)
        methods.append(Method(name, config_family(cfg), tag, cfg))
    return methods


def _images(batch: Sequence[EvalSample], blind: bool) -> list:
    from vtc.demo.task import blank_image

    images = [s.load_image() for s in batch]
    return [blank_image(im) for im in images] if blind else images


def predict(model, processor, samples: Sequence[EvalSample], methods: Sequence[Method], *, batch_size: int = 8,
            max_new_tokens: int = 16, prompt_suffix: str = "", caches: Sequence[PredictionCache] | None = None,
            rank: int = 0, world: int = 1, progress: bool = False, run_id: str = "", warm_up: bool = True
            ) -> list[dict[str, dict]]:
    """Answer ``samples`` (those not in each method's cache) with every method, interleaved batch by batch.

    Returns, per method, this process's new records by question id (``{"id", "prediction", "key", "run",
    <costs>}``); with caches, each batch is appended as soon as it is done. Under data parallelism each
    method's pending questions are cut into batches of ``batch_size`` and process ``rank`` takes batches
    ``rank, rank + world, ...``. ``warm_up``: one untimed batch per method first.
    """
    import vtc

    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    caches = list(caches) if caches is not None else [None] * len(methods)
    done = [c.load() if c is not None else {} for c in caches]
    pending = [[s for s in samples if s.id not in d] for d in done]
    mine = [D.deal(p, batch_size, rank, world) for p in pending]
    new: list[dict[str, dict]] = [{} for _ in methods]
    steps = max((len(m) for m in mine), default=0)
    if steps == 0:
        return new
    runs = [vtc.compress(model, m.config) if m.config is not None else None for m in methods]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(p) for p in pending), desc="eval " + ", ".join(m.name for m in methods)[:40],
                   unit="q", dynamic_ncols=True)

    def step_images(j: int) -> dict:
        out = {}
        for m, batches in zip(methods, mine):
            if j < len(batches):
                key = (tuple(s.id for s in batches[j]), m.blind)
                if key not in out:
                    out[key] = _images(batches[j], m.blind)
        return out

    def answer(i: int, images: list, batch: list, warm: bool = False):
        run = runs[i]
        if run is not None:
            run.attach()
        try:
            with BatchAnswerer(model, processor, run, max_new_tokens=max_new_tokens) as gen:
                prompts = [build_prompt(processor, s.question + prompt_suffix) for s in batch]
                if warm:
                    return gen.warm_up(images, prompts)
                return gen(images, prompts)
        finally:
            if run is not None:
                run.remove()

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            nxt = pool.submit(step_images, 0)
            if warm_up:
                first = nxt.result()
                for i, (m, batches) in enumerate(zip(methods, mine)):
                    if batches:
                        answer(i, first[(tuple(s.id for s in batches[0]), m.blind)], batches[0], warm=True)
                nxt = pool.submit(lambda: first)
            for j in range(steps):
                images = nxt.result()
                if j + 1 < steps:
                    nxt = pool.submit(step_images, j + 1)
                for i, (m, batches) in enumerate(zip(methods, mine)):
                    if j >= len(batches):
                        continue
                    batch = batches[j]
                    texts, costs = answer(i, images[(tuple(s.id for s in batch), m.blind)], batch)
                    recs = [{"id": s.id, "prediction": t, "key": sample_key(s), "run": run_id, **c}
                            for s, t, c in zip(batch, texts, costs)]
                    if caches[i] is not None:
                        caches[i].append(recs)
                    new[i].update((r["id"], r) for r in recs)
                    if bar is not None:  # rank 0 stands for all processes (they run batches of the same size)
                        bar.update(min(len(batch) * world, bar.total - bar.n))
    finally:
        if bar is not None:
            bar.close()
    return new


def summarize(records: Sequence[dict]) -> dict[str, float | None]:
    """Per-question costs over ``records``: means of tokens, FLOPs and KV cache; median and quartiles of the
    prefill time."""
    n = max(1, len(records))

    def mean(key):
        return sum(float(r.get(key, 0.0)) for r in records) / n

    ms = median_iqr([float(r["prefill_ms"]) for r in records if r.get("prefill_ms") is not None])
    return {
        "visual_tokens_in": mean("visual_tokens_in"),
        "visual_tokens_llm_in": mean("visual_tokens_llm_in"),
        "visual_tokens": mean("visual_tokens"),
        "visual_tokens_avg_layer": mean("visual_tokens_avg_layer"),
        "text_tokens": mean("text_tokens"),
        "prefill_ms": ms[0] if ms else None,
        "prefill_ms_q25": ms[1] if ms else None,
        "prefill_ms_q75": ms[2] if ms else None,
        "prefill_tflops": mean("prefill_flops") / 1e12,
        "kv_cache_mb": mean("kv_cache_bytes") / 2**20,
    }


def _timing_note(records: Sequence[dict], run_id: str) -> str | None:
    """Which runs the timings of a row come from, when not all from this one."""
    runs = Counter(r.get("run") or "an earlier run" for r in records)
    if set(runs) == {run_id}:
        return None
    parts = [f"{n} from {'this run' if k == run_id else k}" for k, n in sorted(runs.items(), key=lambda kv: kv[0])]
    return "prefill timings of " + ", ".join(parts) + " (resumed cache; --overwrite measures all side by side)"


def _model_path(opts: EvalOptions) -> str:
    if opts.model is not None:
        return opts.model
    if opts.task != "synthetic":
        raise EvalError("--model is required (a local folder, a cached hub id such as llava-hf/llava-1.5-7b-hf, "
                        "or a bundled model: vtc-tiny-llava, vtc-tiny-1d)")
    return "vtc-tiny-llava"


def run_eval(opts: EvalOptions) -> dict | None:
    """Evaluate the baseline and/or configs on a task; write results; return the report (rank 0; other
    processes of a data-parallel run return ``None``)."""
    import vtc
    from vtc.model_names import prompt_suffix_for, resolve_model

    device = opts.device
    state, rank, world = D.distributed(device)
    if device == "auto":
        device = str(state.device) if state is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    spec, samples = load_task(opts.task, opts.data, limit=opts.limit, seed=opts.seed, metric=opts.metric,
                              questions=opts.questions, annotations=opts.annotations, images=opts.images,
                              **({"split": opts.split} if opts.task == "synthetic" else {}))
    try:
        model_path = resolve_model(_model_path(opts))
    except ValueError as err:
        raise EvalError(str(err)) from None
    methods = _methods(opts.configs, opts.compare, opts.blind)
    model, processor = load_vlm(model_path, device=device, dtype=opts.dtype, attn=opts.attn)
    for m in methods:  # validate every config against the model before generating anything
        if m.config is not None:
            vtc.compress(model, m.config)
    max_new = opts.max_new_tokens or spec.max_new_tokens
    suffix = prompt_suffix_for(model_path, spec.prompt_suffix) if opts.prompt_suffix is None else opts.prompt_suffix
    out_dir = Path(opts.out or Path("vtc-eval") / opts.task)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    run_id = D.broadcast(state, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()) + f" #{uuid.uuid4().hex[:6]}")
    keys = {s.id: sample_key(s) for s in samples}
    fingerprint = model_fingerprint(model_path)
    caches = []
    for m in methods:
        meta = {"task": opts.task, "model": str(model_path), "model_fingerprint": fingerprint,
                "max_new_tokens": max_new, "prompt_suffix": suffix, "prompt_template": build_prompt(processor, "{q}"),
                "dtype": dtype_name, "attn": opts.attn, "blind": m.blind,
                "config": m.config.to_dict() if m.config is not None else None}
        caches.append(PredictionCache(out_dir / "predictions" / f"{m.tag}.jsonl", meta, keys=keys,
                                      overwrite=opts.overwrite, rank=rank, world=world))
    D.barrier(state)  # rank 0 may have just cleared caches
    t_start = time.perf_counter()
    new = predict(model, processor, samples, methods, batch_size=opts.batch_size, max_new_tokens=max_new,
                  prompt_suffix=suffix, caches=caches, rank=rank, world=world, progress=opts.progress,
                  run_id=run_id)
    for cache, recs in zip(caches, new):
        gathered = D.gather_records(state, list(recs.values())) if state is not None else None
        if rank == 0 and state is not None:
            cache.merge(gathered)
    D.barrier(state)
    if rank != 0:
        return None
    rows, details, preds = [], {}, {}
    for m, cache in zip(methods, caches):
        if cache.has_rank_files():  # left by an interrupted data-parallel run
            cache.merge()
        records = cache.load()
        missing = [s.id for s in samples if s.id not in records]
        if missing:
            raise EvalError(f"{cache.path}: {len(missing)} questions have no prediction (e.g. {missing[:3]})")
        ordered = [records[s.id] for s in samples]
        preds[m.tag] = {s.id: records[s.id]["prediction"] for s in samples}
        res = score(spec, samples, preds[m.tag], n_boot=opts.bootstrap, seed=opts.seed)
        ci = res.get("ci") or [None, None]
        row = {"task": opts.task, "method": m.name, "family": m.family, "tag": m.tag, "n": len(samples),
               "metric": res["metric"], "score": res["score"], "score_lo": ci[0], "score_hi": ci[1],
               "relative": None, "relative_lo": None, "relative_hi": None, "agreement": None,
               "per_category": res.get("per_category"), "neither_yes_nor_no": res.get("neither_yes_nor_no"),
               **summarize(ordered)}
        unclear = res.get("neither_yes_nor_no")
        counted = (f"{unclear} of {res['n_scored']} answers were neither yes nor no (counted as 'yes')"
                   if unclear and not res.get("warning") else None)
        notes = [n for n in (res.get("warning"), counted, res.get("note"), _timing_note(ordered, run_id)) if n]
        if notes:
            row["notes"] = notes
        if res.get("warning"):
            print(f"vtc eval: warning ({m.name}): {res['warning']}", file=sys.stderr)
        rows.append(row)
        details[m.tag] = {"scores": res, "config": m.config.to_dict() if m.config is not None else None,
                          "stages": next((r["stages"] for r in ordered if "stages" in r), [])}
        write_submission(spec, samples, records, out_dir / f"{m.tag}.submission.json")
    base = next((r for r in rows if r["tag"] == "baseline"), None)
    if base is not None:
        for r in rows:
            r["agreement"] = agreement(samples, preds[r["tag"]], preds["baseline"])
            if base["score"] and r["score"] is not None:
                r["relative"] = 100 * r["score"] / base["score"]
                rci = relative_ci(spec, samples, preds[r["tag"]], preds["baseline"], n_boot=opts.bootstrap,
                                  seed=opts.seed)
                if rci is not None:
                    r["relative_lo"], r["relative_hi"] = rci
    report = {"task": opts.task, "description": spec.description, "model": str(model_path), "device": device,
              "dtype": dtype_name, "world_size": world, "n": len(samples), "max_new_tokens": max_new,
              "prompt_suffix": suffix, "run": run_id, "rows": rows, "details": details, "options": asdict(opts),
              "vtc_version": vtc.__version__, "wall_s": time.perf_counter() - t_start}
    write_results(report, out_dir)
    if opts.plot:
        report["plot"] = str(plot_results(rows, out_dir / "accuracy_vs_tokens.png",
                                          title=f"{spec.description} — {Path(str(model_path)).name} (n={len(samples)})"))
    if not opts.quiet:
        print(format_table(report))
        print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.csv'}"
              + (f", {report['plot']}" if opts.plot else ""))
    return report
