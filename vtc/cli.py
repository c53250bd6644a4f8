"""The ``vtc`` command: demo, generate, show, bench, eval.

``vtc demo`` runs offline with no arguments on the bundled tiny VLM trained by the project.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

__all__ = ["main"]

DEFAULT_DEMO_CONFIGS = {
    "grid": {"name": "demo: fastv 25% from layer 2", "stages": [{"method": "fastv", "layer": 2, "budget": 0.25}]},
    "1d": {"name": "demo: prefix 8 of 32 latents", "stages": [{"method": "prefix", "budget": 8}]},
}


def _load_model(path: str | None, kind: str = "grid"):
    """(model, processor, description) through :func:`vtc.demo.load`. ``path=None``: the bundled demo model of
    ``kind`` (its architecture with random weights if the trained weights are not installed)."""
    from . import demo

    if path is None:
        p = demo.GRID_MODEL_PATH if kind == "grid" else demo.ORDERED_MODEL_PATH
        if not (p / "model.safetensors").exists():
            return _untrained_demo_model(kind, p)
        path = str(p)
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


def _run_pair(model, processor, image, prompt, config, out_png: str | None, stage: int | None = None):
    """Answer uncompressed and compressed; returns a dict of results and writes the kept-token picture of image 0
    after ``stage`` (index in run order; default: the final survivors)."""
    import vtc
    from vtc.viz import draw_kept, select_stages, token_groups

    inputs = processor(images=image, text=prompt, return_tensors="pt")
    base_answer = _answer(model, processor, inputs)
    base_ms = _prefill_ms(model, inputs)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with vtc.compress(model, config) as run:
        answer = _answer(model, processor, inputs)
        stats = run.stats
        kv = list(stats.kv_cache_len)
        ms = _prefill_ms(model, inputs)
        try:
            chosen = select_stages(stats, stage)
        except ValueError as err:
            raise SystemExit(f"vtc: --stage: {err}") from None
        side = "vision" if any(s.side == "vision" for s in chosen) else "llm"
        layouts = run.adapter.picture_layouts(inputs, 0, side)
    final = stats.stages[-1].tokens_out[0] if stats.stages else n_visual
    result = {"answer_uncompressed": base_answer, "answer_compressed": answer, "visual_tokens_before": n_visual,
              "visual_tokens_after": final, "prefill_ms_uncompressed": base_ms, "prefill_ms_compressed": ms,
              "kv_cache_len": kv, "stats": stats}
    if out_png:
        groups = token_groups(stats, 0, num_tokens=[lay.num_tokens for lay in layouts], stage=stage)
        draw_kept(image, groups, layouts).save(out_png)
        result["png"] = out_png
    return result


def cmd_demo(args) -> int:
    import torch

    from .demo import task

    torch.manual_seed(0)
    model, processor, path = _load_model(None, args.model)
    config = args.config or DEFAULT_DEMO_CONFIGS[args.model]
    sample = task.get_sample("test", args.index)
    prompt = task.format_prompt(sample.question)
    t0 = time.perf_counter()
    res = _run_pair(model, processor, sample.image, prompt, config, args.out)
    import vtc

    cfg = vtc.load_config(config)
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
        print(f"kept tokens drawn to {args.out}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_generate(args) -> int:
    from PIL import Image

    import vtc

    model, processor, _ = _load_model(args.model)
    image = Image.open(args.image).convert("RGB")
    inputs = processor(images=image, text=_prompt(processor, args.prompt), return_tensors="pt")
    if args.config:
        with vtc.compress(model, args.config) as run:
            text = _answer(model, processor, inputs, args.max_new_tokens)
        print(text)
        print(run.stats, file=sys.stderr)
    else:
        print(_answer(model, processor, inputs, args.max_new_tokens))
    return 0


def cmd_show(args) -> int:
    from PIL import Image

    model, processor, _ = _load_model(args.model)
    image = Image.open(args.image).convert("RGB")
    res = _run_pair(model, processor, image, _prompt(processor, args.prompt), args.config, args.out, args.stage)
    which = "final survivors" if args.stage is None else f"after stage {args.stage}"
    print(f"{res['visual_tokens_before']} -> {res['visual_tokens_after']} visual tokens; {which} drawn to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtc", description="Visual token compression for Hugging Face VLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the bundled tiny VLM uncompressed and compressed (offline)")
    d.add_argument("--model", choices=["grid", "1d"], default="grid")
    d.add_argument("--config", default=None, help="config (YAML path or bundled name); default: a demo config")
    d.add_argument("--index", type=int, default=3, help="which test sample of the synthetic task to use")
    d.add_argument("--out", default="vtc-demo-kept.png", help="PNG of the kept tokens")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="answer a prompt about an image, optionally compressed")
    g.add_argument("--model", required=True)
    g.add_argument("--image", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--config", default=None)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("show", help="draw the kept / merged tokens of a config over the image")
    s.add_argument("--model", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--prompt", required=True)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        from .evaluation.cli import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # clear one-line errors for config problems
        from .errors import ConfigError

        if isinstance(err, ConfigError):
            print(f"vtc: config error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
