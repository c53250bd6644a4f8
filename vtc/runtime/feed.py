"""Feeding the reduced features of a prompt rebuilt by vision-side stages to the families that take it as ids +
features (Gemma 3, Qwen3-VL: ``ModelAdapter.feeds_mm_encoder_outputs``).

``ModelAdapter.prompt_kwargs`` builds the features as ``mm_encoder_outputs``, which the forward of those families
takes from transformers 5.18 on. transformers 5.17's forward has no such argument: it encodes ``pixel_values``
(``pixel_values_videos``) itself with the base model's own ``get_image_features`` (``get_video_features``) and
scatters what that returns into the placeholders (Qwen3-VL: the main features and the DeepStack levels alike).
There, :class:`FeatureFeed` puts a marker tensor in the forward's ``pixel_values`` and sets an instance attribute
``get_image_features`` on the base model that returns the reduced features when it is called with that marker (and
is the model's own method otherwise): the model scatters the reduced features and builds its own masks exactly as
it does from ``mm_encoder_outputs``. The attributes are set when the run attaches and removed with it (``remove``
restores the instance as it was). A forward that ends without having asked for the features it was given is an
error (never a silent run on the placeholders' embeddings).

``generate`` (every transformers version): the features never go through ``generate``'s own input handling (whose
batch expansion for beams / ``num_return_sequences`` splits precomputed features by counting tokens and cannot tell
a flat (N, D) tensor's rows from images). The feed holds them for the call and puts them into each forward that
re-reads the prompt (the first one; every step without a cache), gathered to the rows of that forward's ids: generate
expands a batch into adjacent copies of each row, and each copy gets its row's features.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["FeatureFeed", "feeding"]


class FeatureFeed:
    """Per-run feed of the reduced features (see the module docstring). ``install()`` returns the handles (this feed
    among them: its ``remove`` drops every tensor it holds)."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        #: the forward takes ``mm_encoder_outputs`` (transformers >= 5.18); else the features go through the getters
        self.as_kwarg = adapter.takes_mm_encoder_outputs()
        #: the features of a ``generate`` call in progress: per kind, per-token tensors in placeholder order of
        #: ``held_ids`` (the rebuilt prompt, before generate expands it)
        self.held: dict[str, list[torch.Tensor]] | None = None
        self.held_ids: torch.Tensor | None = None
        #: the forward in progress (getters only): kind -> (marker passed as the pixel input, the getter's output)
        self.loaded: dict[str, tuple[torch.Tensor, Any]] = {}
        #: getters only: the features of the last forward fed its own rebuilt prompt (what its kwargs carry as
        #: ``mm_encoder_outputs`` where the forward takes them; the benchmark's oracle reads them)
        self.last: dict | None = None

    def install(self) -> list:
        from . import _InstanceAttr

        handles: list = [self]
        if self.as_kwarg:
            return handles
        inner = self.adapter.inner
        try:
            for kind, (_arg, name) in self.adapter.encoder_getters.items():
                handles.append(_InstanceAttr(inner, name, self._getter(kind, name, getattr(inner, name))))
        except BaseException:
            for h in reversed(handles):
                h.remove()
            raise
        return handles

    def remove(self) -> None:
        self.held = self.held_ids = self.last = None
        self.loaded = {}

    # ---- generate ---------------------------------------------------------------------------------------------
    def hold(self, enc: dict, input_ids: torch.Tensor) -> None:
        """Keep ``generate``'s features (the rebuilt prompt's ``mm_encoder_outputs``) for its forwards."""
        self.held = self._rows(enc)
        self.held_ids = input_ids

    def release(self) -> None:
        self.held = self.held_ids = None

    # ---- forward ----------------------------------------------------------------------------------------------
    def load(self, kwargs: dict, enc: dict | None = None) -> dict:
        """Forward kwargs that carry the features: ``enc`` (this forward's own rebuilt prompt) or, without it, the
        held ones of the ``generate`` call in progress, gathered to the rows of ``kwargs["input_ids"]``."""
        ids = kwargs["input_ids"]
        kwargs = dict(kwargs)
        if enc is not None:
            if self.as_kwarg:
                kwargs["mm_encoder_outputs"] = enc
                return kwargs
            rows, self.last = self._rows(enc), enc
        elif self.held is not None:
            rows = self._expand(self.held, self.held_ids, ids)
        else:
            return kwargs
        if self.as_kwarg:
            kwargs["mm_encoder_outputs"] = {kind: self.adapter.encoder_output(kind, f) for kind, f in rows.items()}
            return kwargs
        self.loaded = {}
        for kind, feats in rows.items():
            arg, _name = self.adapter.encoder_getters[kind]
            marker = torch.empty(0, device=ids.device)
            self.loaded[kind] = (marker, self.adapter.encoder_output(kind, feats))
            kwargs[arg] = marker
        return kwargs

    def check_consumed(self) -> None:
        """After the forward: every loaded kind was taken by the model (raise otherwise)."""
        left, self.loaded = sorted(self.loaded), {}
        if left:
            raise RuntimeError(f"vtc, {self.adapter.family}: the model did not ask for the reduced {', '.join(left)} "
                               "features vtc fed it (its forward does not encode the pixel inputs through the base "
                               "model's get_*_features on this transformers); its output would be wrong")

    def discard(self) -> None:
        """Drop what a failed forward left loaded."""
        self.loaded = {}

    # ---- internals --------------------------------------------------------------------------------------------
    def _rows(self, enc: dict) -> dict[str, list[torch.Tensor]]:
        getters = self.adapter.encoder_getters
        unknown = sorted(k for k, out in enc.items() if out is not None and k not in getters)
        if unknown:
            raise RuntimeError(f"vtc, {self.adapter.family}: no way to feed {unknown} features")
        return {kind: self.adapter.encoder_rows(kind, out) for kind, out in enc.items() if out is not None}

    def _expand(self, rows: dict[str, list[torch.Tensor]], base: torch.Tensor,
                ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """The features of ``base``'s rows for ``ids``, whose rows are adjacent copies of them (generate's expansion
        for beams / ``num_return_sequences``), followed by generated tokens on steps without a cache."""
        B, N = base.shape
        r = ids.shape[0] // B
        if r * B != ids.shape[0] or ids.shape[1] < N or not torch.equal(
                ids[:, :N], base.to(ids.device).repeat_interleave(r, dim=0)):
            raise RuntimeError(f"vtc, {self.adapter.family}: a forward of generate got {tuple(ids.shape)} ids that do "
                               f"not start with copies of the rebuilt prompt's rows {tuple(base.shape)}")
        if r == 1:
            return rows
        out = {}
        for kind, feats in rows.items():
            mask = base == getattr(self.adapter.model.config, f"{kind}_token_id")
            rank = (mask.flatten().long().cumsum(0) - 1).view_as(mask)
            idx = rank.repeat_interleave(r, dim=0)[mask.repeat_interleave(r, dim=0)]
            out[kind] = [f[idx.to(f.device)] for f in feats]
        return out

    def _getter(self, kind: str, name: str, original):
        feed = self

        def get_features(pixels, *args, **kwargs):
            entry = feed.loaded.get(kind)
            if entry is None:
                return original(pixels, *args, **kwargs)
            marker, output = entry
            if pixels is not marker:
                raise RuntimeError(f"vtc, {feed.adapter.family}: {name} was called on other inputs while vtc feeds "
                                   "the reduced features")
            del feed.loaded[kind]
            return output if kwargs.get("return_dict", True) else output.to_tuple()

        return get_features


@contextlib.contextmanager
def feeding(adapter, enc: dict, input_ids: torch.Tensor):
    """The model, without a vtc run, fed the features ``enc`` (kind -> encoder output, as ``mm_encoder_outputs``
    takes them) of the prompt ``input_ids`` in every forward that reads that prompt (``model(...)`` or
    ``model.generate(...)`` on ``input_ids``), on any transformers: a :class:`FeatureFeed` holding them plus a forward
    pre-hook / hook pair on the model, all removed on exit (the benchmark's oracle on a transformers whose forward has
    no ``mm_encoder_outputs``)."""
    model = adapter.model
    feed = FeatureFeed(adapter)
    feed.hold(enc, input_ids)

    def pre(module, args, kwargs):
        feed.discard()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs.get("input_ids") is None or (cache is not None and cache.get_seq_length() > 0):
            return None
        return args, feed.load(kwargs)

    handles = feed.install()
    try:
        handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(model.register_forward_hook(lambda *_: feed.check_consumed()))
        yield
    finally:
        for h in reversed(handles):
            h.remove()
