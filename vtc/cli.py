"""The ``vtc`` command: demo, generate, show, bench, eval.

``vtc demo`` runs offline with no arguments on the bundled tiny VLM trained by the project.

Errors: a problem with the input (a config, an ``--image``, an ``--out``, an option's value) is one line on stderr
naming the file or option and the problem, exit status 2, found before the model is loaded wherever it can be
checked first. Anything else is one line plus a hint to run again with ``--debug`` (which shows the traceback).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_DEMO_CONFIGS = {
    "grid": {"name": "demo: fastv 25% from layer 2", "stages": [{"method": "fastv", "layer": 2, "budget": 0.25}]},
    "1d": {"name": "demo: prefix 8 of 32 latents", "stages": [{"method": "prefix", "budget": 8}]},
}


class CLIError(ValueError):
    """A usage or input problem, reported as one line with exit status 2."""


def _read_image(path: str, flag: str = "--image"):
    """The RGB image at ``path``, fully decoded (so a truncated file fails here, before any model is loaded)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise CLIError(f"{flag} {path}: file not found")
    if not p.is_file():
        raise CLIError(f"{flag} {path}: not a file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise CLIError(f"{flag} {path}: not a readable image (corrupt, or not an image at all: no image "
                       "format recognises the file)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CLIError(f"{flag} {path}: corrupt or truncated image ({err})") from None


def _check_out(path: str, flag: str = "--out") -> None:
    """Raise CLIError unless a picture can be written at ``path`` (format known, folder exists, writable)."""
    from PIL import Image

    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{flag} {path}: is a folder; give a file name such as {p / 'kept.png'}")
    ext = p.suffix.lower()
    if ext not in Image.registered_extensions():
        raise CLIError(f"{flag} {path}: unknown picture format {ext or '(no extension)'!r}; use a .png file name")
    if not p.parent.is_dir():
        raise CLIError(f"{flag} {path}: {p.parent} is not an existing folder")
    existed = p.exists()
    try:
        with open(p, "ab"):
            pass
    except OSError as err:
        raise CLIError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
    if not existed:
        p.unlink()


def _config(config):
    """The validated config (``vtc.load_config``: a path, bundled name, inline YAML or dict), before any model."""
    import vtc

    return vtc.load_config(config)


def _load_model(path: str | None, kind: str = "grid"):
    """(model, processor, description) through :func:`vtc.demo.load`. ``path=None``: the bundled demo model of
    ``kind`` (its architecture with random weights if the trained weights are not installed)."""
    from . import demo

    if path is None:
        p = demo.GRID_MODEL_PATH if kind == "grid" else demo.ORDERED_MODEL_PATH
        if not (p / "model.safetensors").exists():
            return _untrained_demo_model(kind, p)
        path = str(p)
    from .model_names import resolve_model

    try:
        path = resolve_model(path)  # a folder, a bundled name (vtc-tiny-llava, vtc-tiny-1d) or a cached hub id
    except ValueError as err:
        raise SystemExit(f"vtc: {err}") from None
    model, processor = demo.load(path=path)
    return model, processor, path


def _untrained_demo_model(kind: str, missing):
    """The demo architecture with seeded random weights, for when the trained weights are not installed."""
    import torch

    from .demo import build

    print(f"note: trained demo weights not found at {missing} (train them from a checkout with `python eval/train_demo.py --model {kind}`); "
          "running the same architecture with random weights, so the answers are meaningless", file=sys.stderr)
    torch.manual_seed(0)
    tok = build.build_tokenizer()
    if kind == "grid":
        model, processor = build.build_grid_model(tok), build.build_grid_processor(tok)
    else:
        model, processor = build.build_ordered_model(tok), build.build_ordered_processor(tok)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor, f"{kind} demo architecture, random weights"


def _prefill_ms(model, inputs, repeats: int = 5) -> float:
    import torch

    times = []
    with torch.no_grad():
        model(**inputs)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _answer(model, processor, inputs, max_new_tokens: int = 8) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def _prompt(processor, text: str) -> str:
    """``text`` as is when it already holds the image placeholder, else the model's chat-formatted prompt."""
    from .evaluation.runner import build_prompt

    token = getattr(processor, "image_token", None) or "<image>"
    return text if token in text or "<image>" in text else build_prompt(processor, text)


def _compressed(model, processor, image, inputs, config, stage: int | None = None) -> dict:
    """Answer, prefill time, stats and the kept-token groups of image 0 with ``config`` attached (after ``stage``,
    index in run order; default: the final survivors)."""
    import vtc
    from vtc.viz import select_stages, token_groups

    with vtc.compress(model, config) as run:
        answer = _answer(model, processor, inputs)
        stats = run.stats
        kv = list(stats.kv_cache_len)
        ms = _prefill_ms(model, inputs)
        try:
            chosen = select_stages(stats, stage)
        except ValueError as err:
            raise CLIError(f"--stage: {err}") from None
        side = "vision" if any(s.side == "vision" for s in chosen) else "llm"
        # the image's size, for families whose inputs do not carry the crop arrangement (InternVL's tiles)
        layouts = run.adapter.picture_layouts({**inputs, "vtc_image_sizes": [(image.height, image.width)]}, 0, side)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    groups = token_groups(stats, 0, num_tokens=[lay.num_tokens for lay in layouts], stage=stage)
    return {"answer": answer, "ms": ms, "kv": kv, "stats": stats, "layouts": layouts, "groups": groups,
            "tokens": sum(stats.stages[-1].tokens_out) if stats.stages else n_visual,
            "side": "vision" if any(s.side == "vision" for s in stats.stages) else "llm"}


def _run_pair(model, processor, image, prompt, config, out_png: str | None, stage: int | None = None):
    """Answer uncompressed and compressed; returns a dict of results and writes the kept-token picture of image 0
    after ``stage`` (index in run order; default: the final survivors), at the image's aspect ratio."""
    from vtc.viz import draw_kept, processor_view

    inputs = processor(images=image, text=prompt, return_tensors="pt")
    base_answer = _answer(model, processor, inputs)
    base_ms = _prefill_ms(model, inputs)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    c = _compressed(model, processor, image, inputs, config, stage)
    result = {"answer_uncompressed": base_answer, "answer_compressed": c["answer"], "visual_tokens_before": n_visual,
              "visual_tokens_after": c["tokens"], "prefill_ms_uncompressed": base_ms, "prefill_ms_compressed": c["ms"],
              "kv_cache_len": c["kv"], "stats": c["stats"], "groups": c["groups"]}
    if out_png:
        draw_kept(image, c["groups"], c["layouts"], view=processor_view(processor, image)).save(out_png)
        result["png"] = out_png
    return result


#: the side-by-side picture of ``vtc demo``: a vision-side and an LLM-side method at the same 25% budget
DEMO_PICTURE = {
    "grid": [("VisionZip 25% (vision side)", {"name": "visionzip 49", "stages": [{"method": "visionzip", "budget": 49}]}),
             ("FastV 25% at layer 2 (LLM side)", DEFAULT_DEMO_CONFIGS["grid"])],
    "1d": [("prefix 8 of 32 latents", DEFAULT_DEMO_CONFIGS["1d"])],
}
#: the line under the demo picture when it has an LLM-side method
LLM_SIDE_NOTE = ("LLM-side cells look arbitrary here: this 4-layer LM has moved what it needs from the image into "
                 "the text tokens by layer 1, so from layer 2 on any cells can go (random pruning scores the same); "
                 "on 7B models the choice matters.")


def demo_picture(model, processor, image, prompt: str, panels: list[tuple[str, object]], size: int = 224):
    """(picture, rows): the image uncompressed, then each (title, config) with its kept tokens (outlined; merged
    groups coloured on a second row under them, as in ``vtc show``), each captioned with its answer, visual tokens and prefill time; the LLM-side note under
    them when a config prunes inside the LLM. ``rows``: per panel, title / answer / tokens / ms / side."""
    import textwrap

    from PIL import Image

    from vtc.viz import caption_panel, draw_kept, processor_view

    inputs = processor(images=image, text=prompt, return_tensors="pt")
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    rows = [{"title": "uncompressed", "answer": _answer(model, processor, inputs), "tokens": n_visual,
             "ms": _prefill_ms(model, inputs), "side": None}]
    pictures = [draw_kept(image, [], [], size=size)]
    view = processor_view(processor, image)
    for title, config in panels:
        c = _compressed(model, processor, image, inputs, config)
        rows.append({"title": title, "answer": c["answer"], "tokens": c["tokens"], "ms": c["ms"], "side": c["side"]})
        # kept tokens outlined on the first row; merged groups (VisionZip's contextual tokens) coloured on a second
        pictures.append(draw_kept(image, c["groups"], c["layouts"], size=size, view=view))
    captioned = [caption_panel(p, [r["title"], f"answer: {r['answer']}",
                                   f"{r['tokens']} of {n_visual} visual tokens", f"prefill {r['ms']:.1f} ms"])
                 for p, r in zip(pictures, rows)]
    W = sum(p.width for p in captioned) + 8 * (len(captioned) - 1)
    note = textwrap.wrap(LLM_SIDE_NOTE, max(40, W // 6)) if any(r["side"] == "llm" for r in rows) else []
    H = max(p.height for p in captioned)
    canvas = Image.new("RGB", (W, H + 13 * len(note) + (6 if note else 0)), (255, 255, 255))
    x = 0
    for p in captioned:
        canvas.paste(p, (x, 0))
        x += p.width + 8
    from PIL import ImageDraw

    d = ImageDraw.Draw(canvas)
    for i, line in enumerate(note):
        d.text((2, H + 4 + 13 * i), line, fill=(90, 0, 0))
    return canvas, rows


def cmd_demo(args) -> int:
    import torch

    from .demo import task

    if args.index < 0:
        raise CLIError(f"--index {args.index}: must be >= 0 (a sample of the synthetic task's test split)")
    args.model = {"vtc-tiny-llava": "grid", "vtc-tiny-1d": "1d"}.get(args.model, args.model)
    cfg = _config(args.config or DEFAULT_DEMO_CONFIGS[args.model])
    if args.out:
        _check_out(args.out)
    torch.manual_seed(0)
    model, processor, path = _load_model(None, args.model)
    sample = task.get_sample("test", args.index)
    prompt = task.format_prompt(sample.question)
    t0 = time.perf_counter()
    res = _run_pair(model, processor, sample.image, prompt, cfg, None)
    print(f"vtc demo — model: {path} ({'ordered 1D latents' if args.model == '1d' else 'LLaVA grid'})")
    print(f"config:   {cfg.name or args.config}")
    print(f"question: {sample.question}   (expected: {sample.answer})")
    print(f"{'':14}{'answer':>10}{'visual tokens':>16}{'prefill ms':>13}")
    print(f"{'uncompressed':14}{res['answer_uncompressed']:>10}{res['visual_tokens_before']:>16}"
          f"{res['prefill_ms_uncompressed']:>13.1f}")
    print(f"{'vtc':14}{res['answer_compressed']:>10}{res['visual_tokens_after']:>16}"
          f"{res['prefill_ms_compressed']:>13.1f}")
    print(f"KV cache per layer after prefill (compressed): {res['kv_cache_len']}")
    print(res["stats"])
    if args.out:
        panels = [(cfg.name or "your config", cfg)] if args.config else DEMO_PICTURE[args.model]
        picture, rows = demo_picture(model, processor, sample.image, prompt, panels)
        picture.save(args.out)
        print(f"side by side in {args.out}: " + "; ".join(f"{r['title']}: {r['answer']} ({r['tokens']} tokens, "
                                                        f"{r['ms']:.1f} ms)" for r in rows))
        if any(r["side"] == "llm" for r in rows):
            print(f"note: {LLM_SIDE_NOTE}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_generate(args) -> int:
    import vtc

    image = _read_image(args.image)
    cfg = _config(args.config) if args.config else None
    model, processor, _ = _load_model(args.model)
    inputs = processor(images=image, text=_prompt(processor, args.prompt), return_tensors="pt")
    if cfg is not None:
        with vtc.compress(model, cfg) as run:
            text = _answer(model, processor, inputs, args.max_new_tokens)
        print(text)
        print(run.stats, file=sys.stderr)
    else:
        print(_answer(model, processor, inputs, args.max_new_tokens))
    return 0


def cmd_show(args) -> int:
    import torch

    image = _read_image(args.image)
    cfg = _config(args.config)
    _check_out(args.out)
    model, processor, _ = _load_model(args.model)
    res = _run_pair(model, processor, image, _prompt(processor, args.prompt), cfg, args.out, args.stage)
    which = "final survivors" if args.stage is None else f"after stage {args.stage}"
    ids = torch.cat([g.flatten() for g in res["groups"]]) if res["groups"] else torch.zeros(0, dtype=torch.long)
    merged = int((torch.unique(ids[ids >= 0], return_counts=True)[1] > 1).sum()) if ids.numel() else 0
    print(f"{res['visual_tokens_before']} -> {res['visual_tokens_after']} visual tokens"
          + (f" ({merged} of them merged groups)" if merged else "") + f"; {which} drawn to {args.out}")
    return 0


def _model_image_prompt(parser: argparse.ArgumentParser) -> None:
    """The inputs ``generate`` and ``show`` share."""
    parser.add_argument("--model", required=True, help="VLM folder, cached hub id, or vtc-tiny-llava / vtc-tiny-1d")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtc", description="Visual token compression for Hugging Face VLMs.")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an unexpected error (accepted anywhere on the command line)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the bundled tiny VLM uncompressed and compressed (offline)")
    d.add_argument("--model", choices=["grid", "1d", "vtc-tiny-llava", "vtc-tiny-1d"], default="grid",
                   help="bundled model: grid (= vtc-tiny-llava) or 1d (= vtc-tiny-1d)")
    d.add_argument("--config", default=None, help="config (YAML path or bundled name); default: a demo config")
    d.add_argument("--index", type=int, default=3, help="which test sample of the synthetic task to use")
    d.add_argument("--out", default="vtc-demo-kept.png",
                   help="PNG: the image, VisionZip's and FastV's kept tokens side by side (or your --config's)")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="answer a prompt about an image, optionally compressed")
    _model_image_prompt(g)
    g.add_argument("--config", default=None)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("show", help="draw the kept / merged tokens of a config over the image")
    _model_image_prompt(s)
    s.add_argument("--config", required=True)
    s.add_argument("--out", default="kept.png")
    s.add_argument("--stage", type=int, default=None,
                   help="draw what survives stage N (0-based, run order: vision side, then LLM side by layer); "
                        "default: the final survivors")
    s.set_defaults(func=cmd_show)

    sub.add_parser("bench", add_help=False,
                   help="prefill / decode latency, FLOPs, KV cache and memory: baseline vs vtc vs oracle")
    sub.add_parser("eval", add_help=False,
                   help="VQA accuracy and cost on local benchmarks, compressed vs uncompressed (vtc eval --help)")
    return p


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["eval"]:
        from .evaluation.cli import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vtc`` command; returns the exit status (see the module docstring for errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv)
    except Exception as err:
        if debug:
            raise
        return _report(err)


def _report(err: Exception) -> int:
    """One line on stderr for ``err``; exit status 2 for input problems, 1 for anything else."""
    from .errors import ConfigError
    from .evaluation.datasets import DatasetError

    msg = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, ConfigError):
        print(f"vtc: config error: {msg}", file=sys.stderr)
        return 2
    if isinstance(err, CLIError | DatasetError):
        print(f"vtc: error: {msg}", file=sys.stderr)
        return 2
    print(f"vtc: error: {type(err).__name__}: {msg or 'no message'} (run with `--debug` for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
