"""A tiny CLIP checkpoint (random weights) with a word-level tokenizer, saved locally: CDPruner's text encoder in
the tests. Its vision width (32) matches the tiny LLaVA / LLaVA-NeXT towers of tests/models*.py; its text context
is 8 tokens so longer instructions exercise CDPruner's 77-token (here 8-token) chunking."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

VOCAB = 128
SPECIAL = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}


def word_tokenizer(words: tuple[str, ...] = ()):
    """Word-level tokenizer, BOS/EOS added: ``words`` first (ids 4, 5, ...), then ``w{i}`` for every other id up to
    127 (so it decodes any tiny-model id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL) | {w: len(SPECIAL) + i for i, w in enumerate(words)}
    vocab |= {f"w{i}": i for i in range(len(vocab), VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_clip(path: Path, vision_width: int = 32, seed: int = 0, words: tuple[str, ...] = ()) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=vision_width, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(path)
    word_tokenizer(words).save_pretrained(path)
    return path


@functools.cache
def tiny_clip_dir() -> str:
    """One tiny CLIP checkpoint per test process (removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="vtc-tiny-clip-"))
    atexit.register(shutil.rmtree, root, True)
    save_tiny_clip(root / "clip")
    return str(root / "clip")
