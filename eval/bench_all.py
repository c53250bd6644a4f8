"""Run the benchmark suites and regenerate the tables of eval/BENCHMARKS.md (no number is typed by hand).

    python -m eval.bench_all --out eval/results/bench                    # the CPU suite (default)
    python -m eval.bench_all --suite gpu --out eval/results/bench        # on a CUDA machine
    python -m eval.bench_all --render-only --out eval/results/bench      # only rebuild the markdown tables
    python -m eval.bench_all --list                                      # the jobs, as <arch>/<label>
    python -m eval.bench_all --only '^gemma3-4b/|^cdpruner'              # named rows only (regex)

Suites (:data:`SUITES`):

- ``cpu``: every bundled ``configs/llava-1.5/*.yaml`` on LLaVA-1.5-7B shapes (fp32, batch 1, 64 text tokens), and
  one row per other family (:data:`FAMILY_ROWS`: its real-size preset and one of its configs),
  the LLM shortened to ``max(--min-layers, deepest stage layer + 1)`` decoder layers and the CLIP tower to the
  same share of its depth (``round(24 * L / 32)``, >= 2) so that the tower's share of the prefill stays what
  it is at full depth. Configs that would need more than ``--max-layers`` layers are listed as not run, except
  those of :data:`SCALABLE_METHODS` (PyramidDrop, SparseVLM), whose cut layers are scaled to an LLM of
  ``--scaled-depth`` layers (8: pdrop's 8 / 16 / 24 of 32 -> 2 / 4 / 6 of 8; SparseVLM's 3 / 7 / 16 -> 1 / 2 / 4);
  their full-depth FLOPs are those of the real schedule (:func:`full_depth_lens`).
- ``gpu``: full-depth fp16 models: LLaVA-1.5-7B at batch 1, 4 and 8 (every ``configs/llava-1.5`` config),
  LLaVA-NeXT-7B (~2.9k visual tokens) at batch 1 and 4 (``configs/llava-next``), Qwen2-VL-7B and Qwen2.5-VL-7B
  at batch 1 (``configs/qwen2-vl``).

A config whose methods are not installed (``vtc.available_methods()``) is listed as skipped, and so is one naming a
checkpoint that is not available locally, except the CLIP checkpoints of :data:`RANDOM_TEXT_ENCODERS` (CDPruner's
text encoder): those run with a random-weight CLIP at the same text shapes, saved once to the temp dir
(:func:`random_text_encoder`), encoding :data:`BENCH_INSTRUCTION`. Every result is
``<out>/<suite>_<arch>_<config>_b<B>_L<layers>_<device>.json`` (+ ``.png``); the markdown tables between
``<!-- bench:<suite>:begin -->`` and ``<!-- bench:<suite>:end -->`` in ``--md`` are rebuilt from all the JSON
files of the suite found in ``--out``, plus ``<out>/<suite>_summary.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vtc import bench as B
from vtc.bench import measure as BM

__all__ = ["Job", "SUITES", "suite_jobs", "render_markdown", "update_markdown", "main"]

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@dataclass
class Job:
    suite: str
    arch: str
    config: str  # path
    layers: int | None = None
    vision_layers: int | None = None
    batch: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    text_tokens: int = 64
    skip: str | None = None  # reason it is not run
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        scaled = self.extra.get("scaled")
        if scaled:
            return f"{Path(self.config).stem} (scaled: {'/'.join(map(str, scaled['scaled']))} of {self.layers})"
        return Path(self.config).stem

    @property
    def name(self) -> str:
        """``<arch>/<label>``: what ``--only`` also matches (family rows share config names)."""
        return f"{self.arch}/{self.label}"


def _config_layers(path: Path) -> int:
    """Decoder layers a config needs (deepest LLM-side stage layer + 1; 1 for vision-only configs)."""
    import vtc

    cfg = vtc.load_config(str(path))
    return max((max(s.llm_layers()) for s in cfg.stages if s.llm_layers()), default=0) + 1


def _missing_methods(path: Path) -> list[str]:
    import yaml

    import vtc

    data = yaml.safe_load(path.read_text())
    have = set(vtc.available_methods())
    return sorted({s.get("method") for s in data.get("stages", []) if s.get("method") not in have})


def _missing_checkpoints(path: Path) -> list[str]:
    """Checkpoints a config names (e.g. CDPruner's ``text_encoder``) that are neither a local folder nor in the
    Hugging Face cache: such a config cannot run offline."""
    import yaml

    names = {s["text_encoder"] for s in yaml.safe_load(path.read_text()).get("stages", []) if s.get("text_encoder")}
    missing = []
    for name in sorted(names):
        if Path(name).expanduser().is_dir():
            continue
        try:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                continue
        except Exception:  # no hub client / not a repo id
            pass
        missing.append(name)
    return missing


def _skip_reason(path: Path) -> str | None:
    missing = _missing_methods(path)
    if missing:
        return f"method(s) {', '.join(missing)} not installed"
    ckpts = _missing_checkpoints(path)
    return f"checkpoint(s) {', '.join(ckpts)} not available locally" if ckpts else None


#: CLIP checkpoints a config may name as CDPruner's ``text_encoder`` that the suites replace, when they are not
#: available locally, by a random-weight CLIP of the same text shapes (text tower, text projection; from the
#: published config): the text tower's cost is part of what the user pays and lands in the vtc time
RANDOM_TEXT_ENCODERS: dict[str, dict] = {
    "openai/clip-vit-large-patch14-336": dict(
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
        projection_dim=768),
}
#: the instruction CDPruner's text tower encodes in the suites (a VQAv2-style question; the random-weight models
#: have no tokenizer to read it off the prompt, so the config's fixed ``instruction`` is set)
BENCH_INSTRUCTION = "What is the man on the left side of the picture holding in his right hand?"


def _unavailable_text_encoders(path: Path) -> list[str]:
    """The names in :data:`RANDOM_TEXT_ENCODERS` a config needs that are not available locally."""
    return [n for n in _missing_checkpoints(path) if n in RANDOM_TEXT_ENCODERS]


def random_text_encoder_config(name: str, spec: B.ArchSpec):
    """The ``CLIPConfig`` of :func:`random_text_encoder`: the text shapes of ``name``, one vision layer of the
    width of ``spec``'s tower, the projection dimension on both sides."""
    from transformers import CLIPConfig

    shapes = RANDOM_TEXT_ENCODERS[name]
    dim = shapes["projection_dim"]
    vision = {k: spec.vision[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "image_size",
                                         "patch_size", "hidden_act", "layer_norm_eps") if k in spec.vision}
    return CLIPConfig(text_config=dict(shapes["text"], projection_dim=dim),
                      vision_config=dict(vision, num_hidden_layers=1, projection_dim=dim), projection_dim=dim)


def random_text_encoder(name: str, spec: B.ArchSpec, root: str | Path | None = None) -> Path:
    """A local CLIP checkpoint with random weights at the text shapes of ``name`` (:data:`RANDOM_TEXT_ENCODERS`)
    and the vision width of ``spec``'s tower (CDPruner applies its post-LayerNorm and visual projection to the
    model's own tower states; the checkpoint's own vision encoder is never run, so it has one layer), plus a
    word-level tokenizer (lower case, punctuation split, CLIP's start / end tokens) that knows
    :data:`BENCH_INSTRUCTION`'s words. Saved once under ``root`` (default: the temp dir) and reused."""
    import hashlib
    import shutil
    import tempfile

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPModel, PreTrainedTokenizerFast

    from vtc.bench.presets import _default_dtype, _no_init_weights

    shapes = RANDOM_TEXT_ENCODERS[name]
    words = sorted(set(re.findall(r"\w+|[^\w\s]", BENCH_INSTRUCTION.lower())))
    key = json.dumps([random_text_encoder_config(name, spec).to_dict(), words], sort_keys=True, default=str)
    root = Path(root or tempfile.gettempdir())
    out = root / f"vtc-bench-clip-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
    try:
        cfg = random_text_encoder_config(name, spec)
        with _default_dtype(torch.float32), _no_init_weights():
            clip = CLIPModel(cfg)
        B.random_fill_(clip.eval())
        clip.save_pretrained(tmp)
        t = shapes["text"]
        vocab = {"<unk>": 0, "!": 1} | {w: 2 + i for i, w in enumerate(w for w in words if w != "!")}
        vocab |= {"<|startoftext|>": t["bos_token_id"], "<|endoftext|>": t["eos_token_id"]}
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.normalizer = normalizers.Lowercase()
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tk.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[("<|startoftext|>", t["bos_token_id"]), ("<|endoftext|>", t["eos_token_id"])])
        PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                unk_token="<unk>", pad_token="!").save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process saved it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


#: LLM-side methods whose layer schedule the CPU suite scales to a shortened depth when the real one does not fit
#: (``--scaled-depth``): their cuts split the LLM into segments, so the same share of layers per segment keeps the
#: share of the prefill each segment costs
SCALABLE_METHODS = ("pdrop", "sparsevlm")


def scaled_schedule(path: Path, full_layers: int, depth: int) -> dict | None:
    """The config of ``path`` with the ``layers`` of its :data:`SCALABLE_METHODS` stages mapped from the
    ``full_layers``-deep model to a ``depth``-deep one (``round(l * depth / full_layers)``), or None when the
    config has another LLM-side stage or the mapped layers are not distinct, >= 1 and < ``depth``.

    Returns {'config': the scaled config (dict), 'real': the real cut layers, 'scaled': the scaled ones (sorted,
    one-to-one)}."""
    import vtc

    cfg = vtc.load_config(str(path))
    stages, real, scaled = [], [], []
    for s in cfg.stages:
        d = s.model_dump()
        if s.side == "llm":
            if s.method not in SCALABLE_METHODS:
                return None
            new = [round(layer * depth / full_layers) for layer in s.layers]
            if any(b <= a for a, b in zip(new, new[1:])) or new[0] < 1 or new[-1] >= depth:
                return None
            real += list(s.layers)
            scaled += new
            d["layers"] = new
        stages.append(d)
    if not real or sorted(real) != real or sorted(scaled) != scaled or len(set(scaled)) != len(scaled):
        return None
    return {"config": {"name": f"{cfg.name or path.stem}-scaled{depth}", "stages": stages, "seed": cfg.seed},
            "real": real, "scaled": scaled}


def full_depth_lens(real: list[int], scaled: list[int], full_layers: int):
    """The map of per-layer lengths of a scaled run (cuts entering ``scaled``) to the full-depth model with the
    real cuts (entering ``real``): layer l of the full model gets the length after the last real cut <= l."""
    import bisect

    def fn(lens: list[int]) -> list[int]:
        out = []
        for layer in range(full_layers):
            j = bisect.bisect_right(real, layer)
            out.append(lens[0] if j == 0 else lens[scaled[j - 1]])
        return out

    return fn


#: the CPU suite's one row per other family: (bench preset, config under configs/ without .yaml)
FAMILY_ROWS: list[tuple[str, str]] = [
    ("llava-next-7b", "llava-next/visionzip-320"),
    ("qwen2-vl-7b", "qwen2-vl/visionzip-25"),
    ("qwen2.5-vl-7b", "qwen2-vl/visionzip-25"),
    ("mistral-small-3.1-24b", "mistral3/visionzip-25"),
    ("internvl3-8b", "internvl3/visionzip-64"),
    ("smolvlm2-2.2b", "smolvlm/visionzip-18"),
    ("llava-onevision-7b", "llava-onevision/visionzip-25"),
    ("gemma3-4b", "gemma3/visionzip-64"),
    ("qwen3-vl-8b", "qwen3-vl/visionzip-25"),
]


def _family_configs(folder: str) -> list[Path]:
    return sorted((CONFIGS / folder).glob("*.yaml"))


def _plan_job(job: Job, spec: B.ArchSpec, path: Path) -> None:
    """Skip reason, or the checkpoint substitutions the job runs with."""
    job.skip = _skip_reason(path)
    if job.skip is not None and not _missing_methods(path):
        missing = _missing_checkpoints(path)
        if missing and missing == _unavailable_text_encoders(path):  # random weights at the real text shapes
            job.skip = None
            job.extra["random_text_encoders"] = missing


def suite_jobs(suite: str, *, min_layers: int = 3, max_layers: int = 5, scaled_depth: int | None = 8) -> list[Job]:
    """The jobs of a suite (see the module docstring)."""
    jobs: list[Job] = []
    if suite == "cpu":
        plan = [("llava-1.5-7b", str(p.relative_to(ROOT))) for p in _family_configs("llava-1.5")]
        plan += [(arch, f"configs/{config}.yaml") for arch, config in FAMILY_ROWS]
        for arch, config in plan:
            spec = B.ARCHS[arch]
            path = ROOT / config
            job = Job("cpu", spec.name, config)
            _plan_job(job, spec, path)
            if job.skip is None:
                need = max(min_layers, _config_layers(path))
                job.layers = need
                if need > max_layers:
                    scaled = scaled_schedule(path, spec.text_layers, scaled_depth) if scaled_depth else None
                    if scaled is None:
                        job.skip = f"needs {need} decoder layers (> --max-layers {max_layers}); run on a GPU"
                    else:
                        job.layers = scaled_depth
                        job.extra["scaled"] = scaled
                job.vision_layers = max(2, round(spec.vision_layers * job.layers / spec.text_layers))
            jobs.append(job)
    elif suite == "gpu":
        plan = [("llava-1.5-7b", "llava-1.5", (1, 4, 8)), ("llava-next-7b", "llava-next", (1, 4)),
                ("qwen2-vl-7b", "qwen2-vl", (1,)), ("qwen2.5-vl-7b", "qwen2-vl", (1,))]
        for arch, folder, batches in plan:
            for path in _family_configs(folder):
                for b in batches:
                    job = Job("gpu", arch, str(path.relative_to(ROOT)), batch=b, dtype="float16", device="cuda")
                    _plan_job(job, B.ARCHS[arch], path)
                    jobs.append(job)
    else:
        raise ValueError(f"unknown --suite {suite!r} (allowed: cpu, gpu)")
    return jobs


def job_config(job: Job, root: str | Path | None = None):
    """What :func:`vtc.bench.bench` runs for ``job``: the config path, or the config with its substitutions (a
    scaled schedule; random-weight text encoders, saved under ``root``, with :data:`BENCH_INSTRUCTION`)."""
    scaled = job.extra.get("scaled")
    encoders = job.extra.get("random_text_encoders")
    if not scaled and not encoders:
        return job.config
    import vtc

    if scaled:
        data = json.loads(json.dumps(scaled["config"]))
    else:
        cfg = vtc.load_config(str(ROOT / job.config))
        data = {"name": cfg.name or job.label, "stages": [s.model_dump() for s in cfg.stages], "seed": cfg.seed}
    for st in data["stages"]:
        if st.get("text_encoder") in (encoders or ()):
            st["text_encoder"] = str(random_text_encoder(st["text_encoder"], B.ARCHS[job.arch], root))
            if not st.get("instruction"):
                st["instruction"] = BENCH_INSTRUCTION
    return data


SUITES = ("cpu", "gpu")


def _stem(job: Job, result: dict) -> str:
    return f"{job.suite}_{B.result_stem(result)}"


def run_jobs(jobs: list[Job], out: Path, *, repeats: int, warmup: int, decode_tokens: int) -> list[Path]:
    written = []
    todo = [j for j in jobs if j.skip is None]
    groups: dict[tuple, list[Job]] = {}
    for j in todo:
        groups.setdefault((j.arch, j.layers, j.vision_layers, j.dtype, j.device), []).append(j)
    done = 0
    t_start = time.perf_counter()
    for (arch, layers, vlayers, dtype, device), group in groups.items():
        BM._stderr(f"building {arch} (LLM layers {layers or 'all'}, vision layers {vlayers or 'all'}, {dtype}, "
                  f"{device}) for {len(group)} job(s)")
        model = B.build_model(arch, layers=layers, vision_layers=vlayers, dtype=dtype, device=device)
        for job in group:
            done += 1
            BM._stderr(f"[{done}/{len(todo)}] {job.label} batch {job.batch} ({time.perf_counter() - t_start:.0f} s so far)")
            inputs = B.synthetic_inputs(model, arch, batch=job.batch, text_tokens=job.text_tokens)
            spec = B.ARCHS[arch]
            scaled = job.extra.get("scaled")
            lens = full_depth_lens(scaled["real"], scaled["scaled"], spec.text_layers) if scaled else None
            result = B.bench(model, inputs, job_config(job), repeats=repeats, warmup=warmup,
                             decode_tokens=decode_tokens, full_depth_lens=lens)
            result["suite"] = job.suite
            result["label"] = job.label
            result["config"] = job.config
            if scaled:
                result["scaled_schedule"] = {"real_layers": scaled["real"], "scaled_layers": scaled["scaled"],
                                             "full_layers": spec.text_layers}
            if job.extra.get("random_text_encoders"):
                result["random_text_encoders"] = job.extra["random_text_encoders"]
                result["instruction"] = BENCH_INSTRUCTION
            print(B.format_table(result), flush=True)
            jpath, _ = B.write_result(result, out, stem=_stem(job, result))
            written.append(jpath)
            del inputs
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return written


# ---- markdown ------------------------------------------------------------------------------------------------------
def _fmt(x, spec: str = "{:.2f}", none: str = "–") -> str:
    return none if x is None else spec.format(x)


def _load(out: Path, suite: str) -> list[dict]:
    results = []
    for p in sorted(out.glob(f"{suite}_*.json")):
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if r.get("suite") == suite:
            r["_file"] = p.name
            results.append(r)
    return results


def render_markdown(results: list[dict], skipped: list[Job] | None = None,
                    pending: list[Job] | None = None) -> str:
    """The markdown table(s) of one suite's results (one table per arch / dtype / device), then the jobs not run
    (``skipped``, with their reasons) and the runnable jobs without a result yet (``pending``)."""
    if not results and not skipped and not pending:
        return "_No results yet: run `python -m eval.bench_all` for this suite._\n"
    lines: list[str] = []
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["arch"], r["dtype"], r["environment"]["device"].split(":")[0])
        groups.setdefault(key, []).append(r)
    for (arch, dtype, device), rs in groups.items():
        rs.sort(key=lambda r: (r["batch"], r.get("label") or ""))
        env = rs[0]["environment"]
        where = env.get("gpu") or f"{env.get('processor') or 'CPU'}, {env.get('cpu_count')} cores, " \
                                  f"{env.get('torch_threads')} torch threads"
        loads = [r["environment"]["load_average"][0] for r in rs if r["environment"].get("load_average")]
        load = f" (1-minute load average at the end of a row: {min(loads):.1f} to {max(loads):.1f})" if loads else ""
        lines.append(f"**{arch}**, {dtype}, {device} ({where}); torch {env['torch']}, transformers "
                     f"{env['transformers']}; {rs[0]['repeats']} repeats after {rs[0]['warmup']} warm-up round(s), "
                     f"{rs[0]['decode_tokens']} decoded tokens; measured {min(r['environment']['date'] for r in rs)} "
                     f"to {max(r['environment']['date'] for r in rs)}{load}.\n")
        lines.append("| config | batch | LLM / vision layers | LLM tokens (first → last layer) | prefill ms: baseline | vtc | "
                     "oracle | speedup | oracle speedup | efficiency | vtc overhead (full depth, est.) | "
                     "decode ms/token: baseline → vtc | "
                     "KV MB: baseline → vtc | peak MB (Δ): baseline → vtc | FLOPs ratio (run / full depth) |")
        lines.append("|" + "---|" * 15)
        for r in rs:
            v = r["variants"]
            s = B.summarize(v, r["summary"].get("oracle_matches_vtc", True))  # recomputed from the medians
            base, vt, orc = v["baseline"], v["vtc"], v["oracle"]

            def pre(e):
                p = e["prefill_s"]
                return f"{_fmt(p['median'] * 1e3, '{:.0f}')} ± {_fmt(p['iqr'] * 1e3, '{:.0f}')}"

            def mem(e):
                d = e.get("peak_memory_delta_bytes")
                return _fmt(d / 2 ** 20 if d is not None else None, "{:.0f}")

            flag = "" if s.get("oracle_matches_vtc", True) else " ⚠"
            lines.append(
                f"| {r.get('label') or r['config_name']}{flag} | {r['batch']} | {r['llm_layers']} / {r['vision_layers']} "
                f"| {base['seq_len_per_layer'][0]} → {vt['seq_len_per_layer'][0]} → {vt['seq_len_per_layer'][-1]} "
                f"| {pre(base)} | {pre(vt)} | {pre(orc)} | {_fmt(s['speedup'])}× | {_fmt(s['oracle_speedup'])}× "
                f"| {_fmt(s['efficiency'], '{:.3f}')} | {_fmt(s['overhead_pct'], '{:.1f}')}% "
                f"({_fmt(s['overhead_pct_full_depth_est'], '{:.1f}')}%) "
                f"| {_fmt(base['decode_s_per_token']['median'] * 1e3 if base['decode_s_per_token']['median'] else None, '{:.0f}')}"
                f" → {_fmt(vt['decode_s_per_token']['median'] * 1e3 if vt['decode_s_per_token']['median'] else None, '{:.0f}')} "
                f"| {_fmt(base['kv_cache_bytes'] / 2 ** 20, '{:.1f}')} → {_fmt(vt['kv_cache_bytes'] / 2 ** 20, '{:.1f}')} "
                f"| {mem(base)} → {mem(vt)} "
                f"| {_fmt(s['flops_ratio'], '{:.3f}')} / {_fmt(s['flops_ratio_full_depth'], '{:.3f}')} |")
        lines.append("")
    if skipped:
        lines.append("Not run: " + "; ".join(f"`{j.label}` ({j.skip})" for j in skipped) + ".\n")
    if pending:
        lines.append("Not measured yet (`python -m eval.bench_all --only '<arch>/<label>'` runs one): "
                     + ", ".join(f"`{j.name}`" for j in pending) + ".\n")
    return "\n".join(lines)


def plot_summary(results: list[dict], path: Path) -> Path | None:
    """Grouped bars per config: speedup of vtc and of the oracle vs the baseline, and the efficiency."""
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = sorted(results, key=lambda r: (r["arch"], r["batch"], r.get("label") or ""))
    labels = [f"{r.get('label') or r['config_name']}\n{r['arch']} b{r['batch']}" for r in rs]
    sp = [r["summary"]["speedup"] or 0 for r in rs]
    osp = [r["summary"]["oracle_speedup"] or 0 for r in rs]
    eff = [r["summary"]["efficiency"] or 0 for r in rs]
    x = range(len(rs))
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(rs) + 2), 4.8))
    w = 0.38
    ax.bar([i - w / 2 for i in x], osp, w, label="oracle (ideal) speedup", color="#2ca02c")
    ax.bar([i + w / 2 for i in x], sp, w, label="vtc speedup", color="#1f77b4")
    for i, e in enumerate(eff):
        ax.text(i + w / 2, sp[i], f"{e:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("prefill speedup vs baseline (×)")
    ax.set_title("vision + prefill speedup (numbers on the vtc bars: efficiency = oracle time / vtc time)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_markdown(md: Path, suite: str, table: str) -> None:
    """Replace the text between the suite's markers in ``md`` (appending a section with markers if absent)."""
    begin, end = f"<!-- bench:{suite}:begin -->", f"<!-- bench:{suite}:end -->"
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    block = f"{begin}\n<!-- generated by `python -m eval.bench_all --suite {suite}`; do not edit by hand -->\n\n" \
            f"{table.rstrip()}\n\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Results: {suite}\n\n{block}\n"
    md.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=SUITES, default="cpu")
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench"))
    p.add_argument("--md", default=str(ROOT / "eval" / "BENCHMARKS.md"))
    p.add_argument("--only", default=None,
                   help="run only the jobs whose label or <arch>/<label> matches this regex (see --list), e.g. "
                        "'^cdpruner', 'pdrop|sparsevlm', '^gemma3-4b/'")
    p.add_argument("--list", action="store_true", help="list the suite's jobs (<arch>/<label>, depths, skip "
                                                       "reason) and exit")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=4)
    p.add_argument("--min-layers", type=int, default=3)
    p.add_argument("--max-layers", type=int, default=5)
    p.add_argument("--scaled-depth", type=int, default=8,
                   help=f"CPU suite: run a config of {'/'.join(SCALABLE_METHODS)} that needs more than --max-layers "
                        "layers with its cut layers scaled to an LLM of this depth (0: list it as not run)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--render-only", action="store_true", help="do not measure; rebuild the markdown from the JSONs")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    jobs = all_jobs = suite_jobs(args.suite, min_layers=args.min_layers, max_layers=args.max_layers,
                                 scaled_depth=args.scaled_depth or None)
    if args.only:
        jobs = [j for j in jobs if re.search(args.only, j.label) or re.search(args.only, j.name)]
    if args.list:
        for j in jobs:
            depth = f"LLM {j.layers} / vision {j.vision_layers} layers" if j.layers else "full depth"
            print(f"{j.name}: {j.config}, batch {j.batch}, {depth}" + (f"; not run: {j.skip}" if j.skip else "")
                  + ("; random-weight text encoder" if j.extra.get("random_text_encoders") else ""))
        return 0
    if not args.render_only:
        if args.suite == "gpu" and not torch.cuda.is_available():
            print("error: the gpu suite needs CUDA", file=sys.stderr)
            return 2
        run_jobs(jobs, out, repeats=args.repeats, warmup=args.warmup, decode_tokens=args.decode_tokens)
    results = _load(out, args.suite)
    ran = {f"{r.get('arch')}/{r.get('label')}" for r in results}
    skipped = [j for j in all_jobs if j.skip is not None and j.name not in ran]
    pending = [j for j in all_jobs if j.skip is None and j.name not in ran]
    update_markdown(Path(args.md), args.suite, render_markdown(results, skipped, pending))
    plot_summary(results, out / f"{args.suite}_summary.png")
    print(f"updated {args.md} ({len(results)} result(s) of suite {args.suite})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
