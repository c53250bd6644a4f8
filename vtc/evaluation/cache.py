"""The prediction cache of ``vtc eval``: one append-only JSONL per method, keyed on what produced the answers.

``<out>/predictions/<method>.jsonl`` starts with ``{"meta": ...}`` (task, model with a fingerprint of its files,
config, prompt template and suffix, generation settings, dtype, attention, blind), then one record per question
with its ``key``: a hash of the question text and of the image it read (file name and size, or the pixels of an
in-memory image). A re-run skips the questions whose record matches, so an interrupted run resumes and adding a
config costs only that config. When the settings differ, or any question of this run finds a record made from
other data (another split, a blind copy of the images), the cache starts afresh with a one-line notice.
Annotations are not part of the key: they change scores, which every run recomputes from the predictions.

Under data parallelism each process appends to ``<stem>.rank<r>.jsonl``; rank 0 merges them into the main file.
A torn last line (a crash mid-write) is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["PredictionCache", "sample_key", "model_fingerprint", "META_KEYS"]

#: the settings a cache must match to be reused
META_KEYS = ("task", "model", "model_fingerprint", "config", "max_new_tokens", "prompt_suffix", "prompt_template",
             "dtype", "attn", "blind")


def _notice(msg: str) -> None:
    print(f"vtc eval: {msg}", file=sys.stderr)


def sample_key(sample) -> str:
    """Hash of what a question's answer depends on: its text and its image (name + size of a file, or the pixels
    of an in-memory image)."""
    h = hashlib.sha1(str(sample.question).encode())
    img = sample.image
    if isinstance(img, str | Path):
        p = Path(img)
        try:
            size = p.stat().st_size
        except OSError:
            size = -1
        h.update(f"\0{p.name}\0{size}".encode())
    elif img is not None:
        h.update(b"\0pixels\0" + f"{img.size}{img.mode}".encode())
        h.update(img.tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(path: str | os.PathLike) -> str:
    """A short hash of a model's identity: for a folder, its ``config.json`` and the name, size and modification
    time of its weight files; for a hub id, the cached snapshot (commit) it loads."""
    p = Path(str(path))
    h = hashlib.sha1()
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.is_file():
            h.update(cfg.read_bytes())
        for f in sorted(p.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            h.update(str(try_to_load_from_cache(str(path), "config.json")).encode())
        except Exception:
            h.update(str(path).encode())
    return h.hexdigest()[:16]


class PredictionCache:
    """Append-only JSONL of predictions (``{"meta": ...}`` first, then one record per question).

    ``keys``: question id -> :func:`sample_key` of this run's questions; a cached record of one of them with
    another key means the data changed, and (like a change of ``meta``) starts the cache afresh with a notice.
    ``rank`` / ``world``: under data parallelism each process appends to ``<stem>.rank<r>.jsonl``; reading
    merges the main file and every rank file. Only rank 0 clears files.
    """

    def __init__(self, path: Path, meta: dict, *, keys: Mapping[str, str] | None = None, overwrite: bool = False,
                 rank: int = 0, world: int = 1, notice: Callable[[str], None] = _notice):
        self.path = Path(path)
        self.meta = json.loads(json.dumps(meta, default=str))  # as it reads back (tuples -> lists)
        self.keys = dict(keys or {})
        self.rank, self.world = rank, world
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            reason = "--overwrite" if overwrite else self._stale()
            if reason is not None:
                if reason != "--overwrite":
                    notice(f"{self.path}: {reason}; starting afresh")
                for p in self._all_files():
                    p.unlink()

    def _rank_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.rank*.jsonl"))

    def _all_files(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + self._rank_files()

    @property
    def write_path(self) -> Path:
        return self.path if self.world == 1 else self.path.with_name(f"{self.path.stem}.rank{self.rank}.jsonl")

    def _read(self, path: Path, warn: bool = True):
        """(meta or None, records) of one file; unreadable lines are skipped (with a warning)."""
        meta, records = None, []
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if warn:
                    _notice(f"{path}:{n + 1}: skipping an unreadable line (interrupted write?)")
                continue
            if "meta" in rec:
                meta = rec["meta"]
            elif "id" in rec:
                records.append(rec)
        return meta, records

    def _stale(self) -> str | None:
        """Why the files on disk cannot be reused (None: they can, or there are none)."""
        for path in self._all_files():
            meta, records = self._read(path, warn=False)
            if meta is not None:
                for k in META_KEYS:
                    if meta.get(k) != self.meta.get(k):
                        return f"cached predictions were made with a different {k} ({meta.get(k)!r}, now " \
                               f"{self.meta.get(k)!r})"
            for r in records:
                want = self.keys.get(str(r["id"]))
                if want is not None and r.get("key") != want:
                    return f"cached predictions were made on other data (question {r['id']} or its image differs)"
        return None

    def load(self) -> dict[str, dict]:
        """Cached records by question id (a torn or malformed line is skipped with a warning)."""
        records: dict[str, dict] = {}
        for path in self._all_files():
            for rec in self._read(path)[1]:
                records[str(rec["id"])] = rec
        return records

    def append(self, records: list[dict]) -> None:
        """Append records and flush them to disk (a crash after this loses nothing)."""
        path = self.write_path
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            with open(path, "rb+") as f:  # drop a torn last line so the next record starts on its own line
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 1))
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    f.truncate(data.rfind(b"\n") + 1)
        with open(path, "a", encoding="utf-8") as f:
            if fresh or path.stat().st_size == 0:
                f.write(json.dumps({"meta": self.meta}) + "\n")
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _main_ids(self) -> set[str]:
        return {str(r["id"]) for r in self._read(self.path, warn=False)[1]} if self.path.exists() else set()

    def merge(self, records: list[dict] | None = None) -> None:
        """Rank 0 after a data-parallel pass (``records``: the gathered new records), or any later run that
        finds rank files of an interrupted one: move every record into the main file, delete the rank files."""
        if records is None:
            records = list(self.load().values())
        have = self._main_ids()
        todo = [r for r in records if str(r["id"]) not in have]
        world, self.world = self.world, 1
        try:
            if todo:
                self.append(todo)
        finally:
            self.world = world
        for p in self._rank_files():
            p.unlink()

    def has_rank_files(self) -> bool:
        return bool(self._rank_files())
