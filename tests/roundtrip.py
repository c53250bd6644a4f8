"""What every family's test file checks the same way: the ``from_pretrained`` round trip (a checkpoint folder the
test saves itself: model + processor + ``img.png``, loaded back through the Auto classes and run by ``vtc generate``)
and the family's shipped configs (each runs a compressed generate)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import vtc

CONFIG_DIR = Path(__file__).resolve().parents[1] / "vtc" / "configs"


def word_tokenizer(specials: list[str], **extra_special_tokens: str):
    """A word-level tokenizer (left padding) over ``<pad> <s> </s> <unk>`` (ids 0-3), then ``specials`` (ids 4, 5, ...,
    registered as special tokens, named by ``extra_special_tokens`` where the processor looks them up), then the demo
    task's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vtc.demo.task import vocabulary

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *specials, *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    named = {"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left", **named)
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    return fast


def random_image(height: int, width: int, seed: int = 0):
    """A PIL RGB image of uniform random pixels."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


def save_checkpoint(folder: Path, model, processor, image) -> None:
    """The round trip's checkpoint folder: ``model`` and ``processor`` saved, ``image`` as ``img.png``."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image.save(Path(folder) / "img.png")


def load_checkpoint(folder: Path, text: str) -> tuple:
    """(model, inputs): the folder's model through ``AutoModelForImageTextToText`` (sdpa, eval mode) and its
    ``AutoProcessor``'s tensors for ``img.png`` with ``text``."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    proc = AutoProcessor.from_pretrained(folder)
    return model, proc(images=Image.open(Path(folder) / "img.png"), text=text, return_tensors="pt")


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


def cli_show(folder: Path, stage: str) -> Path:
    """Run ``vtc show`` (in process) on ``folder/img.png`` with one stage (inline YAML flow mapping); assert it
    succeeds; return the picture's path."""
    from vtc.cli import main

    folder = Path(folder)
    cfg = folder / "show.yaml"
    cfg.write_text(f"stages:\n  - {stage}\n")
    png = folder / "kept.png"
    assert main(["show", "--model", str(folder), "--image", str(folder / "img.png"), "--prompt", "what colour ?",
                 "--config", str(cfg), "--out", str(png)]) == 0
    return png


def first_stage_counts(model, inputs: dict, stage: dict, **gen) -> list[int]:
    """``tokens_out`` of ``stage`` (its kept tokens per image) in a compressed generate of ``inputs``."""
    with vtc.compress(model, {"stages": [stage]}) as run:
        model.generate(**inputs, **{"max_new_tokens": 3, "do_sample": False, **gen})
    return run.stats.stages[0].tokens_out


def config_depth(family_dir: str, at_least: int = 6) -> int:
    """Decoder layers a tiny model needs so that every bundled config of a family attaches at its own layers: one more
    than the deepest layer an LLM-side stage of them acts at (the configs keep the real models' layer numbers, e.g.
    PyramidDrop's cut entering layer 24), and at least ``at_least``."""
    deepest = max((layer for path in (CONFIG_DIR / family_dir).glob("*.yaml")
                   for stage in vtc.load_config(path).stages for layer in stage.llm_layers()), default=0)
    return max(at_least, deepest + 1)


def shipped_configs_test(family_dir: str, model, inputs, shrinks: bool = False, **gen):
    """The test that each bundled config of a family (``vtc/configs/<family_dir>/*.yaml``) runs: a compressed
    generate of ``inputs(model())`` adds ``max_new_tokens`` tokens to every row (``gen``: generate's arguments,
    default 3 new tokens, greedy) and no stage adds tokens to any image (``shrinks``: every stage removes some)."""
    import pytest

    configs = sorted((CONFIG_DIR / family_dir).glob("*.yaml"))
    gen = {"max_new_tokens": 3, "do_sample": False, **gen}
    params = [pytest.param(p, id=p.stem) for p in configs]

    @pytest.mark.filterwarnings("ignore::UserWarning")
    @pytest.mark.parametrize("path", params)
    def test(path):
        m = model()
        batch = inputs(m)
        with vtc.compress(m, path) as run:
            out = m.generate(**batch, **gen)
        assert out.shape[1] == batch["input_ids"].shape[1] + gen["max_new_tokens"]
        assert all(o < i if shrinks else o <= i for st in run.stats.stages for i, o in zip(st.tokens_in, st.tokens_out))

    return test
