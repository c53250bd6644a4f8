"""The command-line half of every family's ``from_pretrained`` round trip: ``vtc generate`` on a checkpoint folder
the test saved itself (model + processor + ``img.png``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def cli_generate(folder: Path, stage: str = "{method: visionzip, budget: 6}", prompt: str = "what colour ?") -> str:
    """Run ``python -m vtc.cli generate`` on ``folder/img.png`` with one stage (inline YAML flow mapping); assert it
    succeeds and reports the stage's method; return its stderr (the run's statistics)."""
    cfg = Path(folder) / "roundtrip.yaml"
    cfg.write_text(f"stages:\n  - {stage}\n")
    res = subprocess.run([sys.executable, "-m", "vtc.cli", "generate", "--model", str(folder), "--image",
                          str(Path(folder) / "img.png"), "--prompt", prompt, "--config", str(cfg)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    method = stage.split("method:")[1].split(",")[0].strip(" }")
    assert method in res.stderr, res.stderr[-2000:]
    return res.stderr
