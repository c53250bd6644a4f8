"""Where ``--model NAME`` points: a local folder, a bundled demo model by name, or a hub id already cached.

The demo models ship in the package and answer in the format they were trained on (``USER: <image>\\n{question}
ASSISTANT:``, one-word answers, a word-level tokenizer), so the LLaVA-1.5 short-answer suffix is unknown words to
them: :func:`prompt_suffix_for` says which suffix a model wants. A name that is none of the three fails at once
(no network retries) with the choices.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLED", "BUNDLED_TEXT_ENCODERS", "resolve_model", "is_bundled", "prompt_suffix_for"]

_ASSETS = Path(__file__).resolve().parent / "assets"
#: bundled name -> folder
BUNDLED: dict[str, Path] = {"vtc-tiny-llava": _ASSETS / "tiny-llava", "vtc-tiny-1d": _ASSETS / "tiny-1d"}
#: bundled CLIP text towers (``cdpruner``'s ``text_encoder``) -> folder: the grid demo tower's own, trained by
#: eval/demo_training/train_text_tower.py
BUNDLED_TEXT_ENCODERS: dict[str, Path] = {"vtc-tiny-llava-clip": _ASSETS / "tiny-llava-clip"}


def _cached_on_hub(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:  # not a well-formed repo id (or no huggingface_hub): certainly not cached
        return False
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def resolve_model(name: str | os.PathLike, flag: str = "--model") -> str:
    """The folder or hub id to load for ``name``: a local folder as is, ``vtc-tiny-llava`` / ``vtc-tiny-1d`` to
    the bundled folders, a hub id found in the local Hugging Face cache as is. Anything else raises ValueError
    naming the choices (instead of the hub client retrying the network for half a minute)."""
    text = str(name)
    if text in BUNDLED:
        return str(BUNDLED[text])
    if os.path.isdir(os.path.expanduser(text)):
        return os.path.expanduser(text)
    if _cached_on_hub(text):
        return text
    raise ValueError(f"{flag} {text}: not a local folder, not a bundled model ({', '.join(BUNDLED)}) and not a "
                     "hub id in the local Hugging Face cache (download it first, e.g. `hf download "
                     f"{text if '/' in text else 'llava-hf/llava-1.5-7b-hf'}`)")


def is_bundled(path: str | os.PathLike) -> bool:
    """True for a bundled demo model (by name or folder)."""
    text = str(path)
    if text in BUNDLED:
        return True
    try:
        return any(Path(text).resolve() == p.resolve() for p in BUNDLED.values())
    except OSError:
        return False


def prompt_suffix_for(path: str | os.PathLike, default: str) -> str:
    """The answer-format suffix to append to questions: none for the bundled models (they answer one word
    unprompted and do not know the suffix's words), ``default`` (the task's) for any other model."""
    return "" if is_bundled(path) else default
