"""Retrain the project's tiny demo VLMs from scratch (fixed seed), from a checkout of the repository.

    python eval/train_demo.py [--model grid|1d|all] [--out DIR] [--log-dir DIR] [--seed 0] [--reuse-stage1] ...

Writes the models to DIR/tiny-llava and DIR/tiny-1d (default DIR: vtc/assets), the loss logs to
eval/results/demo_training/<model>.log and the final metrics to eval/results/demo_training/<model>.json.
The training logic is in eval/demo_training/train.py (``python -m eval.demo_training.train`` does the same).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: eval.demo_training and vtc

from eval.demo_training.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
