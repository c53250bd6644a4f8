"""``vtc eval``: accuracy and cost of a VLM, uncompressed and with vtc configs, on a local benchmark.

Examples::

    vtc eval --task synthetic --config configs/tiny/fastv-25.yaml --compare --plot
    vtc eval --task custom --data my.jsonl --model vtc-tiny-llava --metric exact --compare --config ...
    vtc eval --model llava-hf/llava-1.5-7b-hf --task pope --data ~/data/pope --images ~/data/coco/val2014 \\
        --config llava-1.5/visionzip-64 --config llava-1.5/fastv-50 --compare --batch-size 16 --plot
    accelerate launch --multi_gpu --num_processes 4 -m vtc.evaluation.cli --model ... --task vqav2 ...
    vtc eval --num-processes 2 --device cpu ...      # the same, launched by vtc itself

Exit status: 0 on success, 2 on a usage / data / config error (one line on stderr naming the problem).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

__all__ = ["main", "build_parser", "add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``vtc eval`` flags (shared by ``vtc eval`` and ``python -m vtc.evaluation.cli``)."""
    from .datasets import TASKS
    from .options import METRICS

    p.add_argument("--task", required=True, choices=sorted(TASKS), help="benchmark")
    p.add_argument("--model", default=None,
                   help="VLM folder, cached hub id, or bundled model vtc-tiny-llava | vtc-tiny-1d "
                        "(default for --task synthetic: vtc-tiny-llava)")
    p.add_argument("--config", action="append", default=[], metavar="CFG",
                   help="vtc config (YAML path or bundled name); repeat to evaluate several")
    p.add_argument("--compare", action="store_true", help="also evaluate the uncompressed model (the baseline)")
    p.add_argument("--data", default=None,
                   help="benchmark folder (or file) in its published layout; --task custom: your .jsonl / .csv")
    p.add_argument("--questions", default=None, help="questions file, when not found in --data")
    p.add_argument("--annotations", default=None, help="VQAv2 annotations file, when not found in --data")
    p.add_argument("--images", default=None, help="image folder, when not found in --data")
    p.add_argument("--split", default="test", help="split of --task synthetic (train / val / test)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate a seeded random sample of N questions, stratified by category")
    p.add_argument("--seed", type=int, default=0, help="seed of --limit's sample and of the bootstrap intervals")
    p.add_argument("--metric", default=None, choices=METRICS,
                   help="--task custom: exact (default; after the VQA normalisation) | vqa | contains | yesno")
    p.add_argument("--blind", action="store_true",
                   help="also evaluate the uncompressed model on blank images (what the text alone gives)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (16; POPE 8; synthetic 3)")
    p.add_argument("--prompt-suffix", default=None,
                   help="text appended to each question (default: LLaVA-1.5's short-answer instruction; "
                        "none for the bundled models)")
    p.add_argument("--out", default=None, help="output folder (default: vtc-eval/<task>)")
    p.add_argument("--plot", action="store_true", help="draw accuracy vs visual tokens (PNG)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU) | float32 | float16 | bfloat16")
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa | eager | flash_attention_2")
    p.add_argument("--overwrite", action="store_true", help="discard cached predictions")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--num-processes", type=int, default=1,
                   help="data-parallel processes launched by vtc (one GPU each, or CPU processes)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="vtc eval", description=__doc__.split("\n\n")[0]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_num_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--num-processes":
            skip = True
            continue
        if a.startswith("--num-processes="):
            continue
        out.append(a)
    return out


def launch(argv: list[str], n: int) -> int:
    """Run ``python -m vtc.evaluation.cli argv`` in ``n`` processes wired for torch.distributed (what
    ``accelerate launch --multi_gpu --num_processes n`` does); returns the first non-zero exit status."""
    port = str(_free_port())
    procs = []
    for rank in range(n):
        env = dict(os.environ, WORLD_SIZE=str(n), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "vtc.evaluation.cli", *argv], env=env))
    codes = [None] * n
    try:
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None:
                    try:
                        codes[i] = p.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        continue
                    if codes[i] != 0:  # one failed: stop the others (they would wait at a barrier forever)
                        for j, q in enumerate(procs):
                            if codes[j] is None:
                                q.terminate()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    return next((c for c in codes if c), 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vtc eval`` (``argv`` without the ``eval`` word)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.num_processes > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print("vtc eval: --num-processes inside an already distributed launch", file=sys.stderr)
            return 2
        return launch(_strip_num_processes(argv), args.num_processes)
    from vtc.errors import ConfigError

    from .datasets import DatasetError
    from .runner import EvalError, EvalOptions, run_eval

    opts = EvalOptions(task=args.task, model=args.model, configs=args.config, compare=args.compare, data=args.data,
                       questions=args.questions, annotations=args.annotations, images=args.images,
                       split=args.split, limit=args.limit, seed=args.seed, metric=args.metric, blind=args.blind,
                       batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, prompt_suffix=args.prompt_suffix, out=args.out,
                       plot=args.plot, device=args.device, dtype=args.dtype, attn=args.attn,
                       overwrite=args.overwrite, progress=not args.no_progress)
    try:
        run_eval(opts)
    except (DatasetError, EvalError) as err:
        print(f"vtc eval: error: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"vtc eval: config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
