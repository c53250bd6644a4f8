"""Attach a config to a model instance, detach it exactly.

``vtc.compress(model, cfg)`` is a context manager; ``vtc.apply(model, cfg)`` attaches at once and returns the
same :class:`Run` handle (``.remove()``). Everything vtc adds is per instance and listed in ``Run._handles``:
forward pre-hooks on the model and on decoder layers, one forward hook, the family's own hooks
(``ModelAdapter.attach``, e.g. Qwen3-VL's DeepStack under LLM-side stages), an instance-level ``generate`` wrapper
(it reduces the images for vision-side stages and refuses a chunked prefill of a prompt with images), an
instance-level ``_reorder_cache`` (only for LLM-side stages: beam search reorders vtc's per-row state with the
cache), and, for Gemma 3 / Qwen3-VL vision-side stages on transformers 5.17,
an instance-level ``get_image_features`` (``get_video_features``) on the base model through which the reduced
features are fed (:mod:`vtc.runtime.feed`).
Removing them restores the model bit for bit, including a ``generate`` the user had set on the instance before.

``generate`` with vision-side stages: with a cache (the default), the wrapper reduces the images once and calls
the model's ``generate`` on the rebuilt, shorter prompt (``inputs_embeds``); beams / ``num_return_sequences``
expand that prompt like any other input, and the output gets the caller's prompt ids back in front (repeated per
returned sequence). transformers decodes an ``inputs_embeds`` prompt with a KV cache even under ``use_cache=False``.
Families fed ids + features (Gemma 3, Qwen3-VL) get the rebuilt ids; their features are held by the run's
:class:`~vtc.runtime.feed.FeatureFeed` and put into the forwards that read the prompt, row by row.
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any

import torch
from torch import nn

from ..config import Config, load_config
from ..errors import ConfigError
from ..models import get_adapter
from ..models.base import ModelAdapter, cache_kwarg_name
from .feed import FeatureFeed
from .llm import LLMRuntime
from .stats import Stats
from .view import RunView
from .vision import VisionRuntime, rebuild_prompt

__all__ = ["Run", "RunView", "compress", "apply"]


class Run:
    """A config attached (or ready to attach) to one model instance. ``stats`` describes the last prefill.

    ``states`` holds each stage's per-run state (stage index -> ``Method.new_state()``) while attached; the
    runtimes pass it to the methods as ``ctx.state``.
    """

    def __init__(self, model: nn.Module, config: Config, adapter: ModelAdapter | None = None) -> None:
        self.model = model
        self.config = config
        self.adapter = adapter or get_adapter(model)
        num_layers = self.adapter.num_layers()
        for i, stage in enumerate(config.stages):
            try:
                stage.validate_for_model(num_layers)
                self.adapter.check_stage(stage)
            except ConfigError as err:
                raise ConfigError(f"stages[{i}] ({stage.method}): {err}") from None
        self.stats = Stats()
        indexed = list(enumerate(config.stages))
        self.vision = VisionRuntime(self.adapter, [(i, s) for i, s in indexed if s.side == "vision"], self.stats,
                                    config.seed)
        self.llm = LLMRuntime(self.adapter, [(i, s) for i, s in indexed if s.side == "llm"], self.stats,
                              config.seed)
        #: stage index -> the stage's per-run state, created at attach, dropped at remove
        self.states: dict[int, Any] = {}
        self.vision.states = self.llm.states = self.states
        self._handles: list[Any] = []
        self._attached = False
        self._entered: list[bool] = []  # one per open ``with`` block: did that block attach?
        self._pending_token_map = None
        #: how a rebuilt prompt's reduced features reach the forward, for the families fed ids + features
        #: (``ModelAdapter.feeds_mm_encoder_outputs``; set while attached)
        self._feed: FeatureFeed | None = None
        self._forward_sig = inspect.signature(model.forward)
        self._cache_key = cache_kwarg_name(model.forward)

    # ---- lifecycle --------------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> Run:
        if self._attached:
            raise RuntimeError("this vtc run is already attached")
        if getattr(self.model, "_vtc_run", None) is not None:
            raise ConfigError("this model already has a vtc config attached; remove it first (handle.remove())")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._post_forward, with_kwargs=True))
            layers = self.adapter.decoder_layers()
            for i in self.llm.hook_layers:
                self._handles.append(layers[i].register_forward_pre_hook(self.llm.layer_hook(i), with_kwargs=True))
            view = RunView(self)
            self._handles.extend(self.adapter.attach(view))
            if self.vision.stages and self.adapter.feeds_mm_encoder_outputs:
                self._feed = FeatureFeed(self.adapter)
                self._handles.extend(self._feed.install())
            for i, stage in enumerate(self.config.stages):
                self.states[i] = stage.new_state()
                self._handles.extend(stage.attach(view, self.states[i]))
            self._handles.append(_InstanceAttr(self.model, "generate", self._wrap_generate(self.model.generate)))
            if self.llm.stages:
                self._handles.append(_InstanceAttr(self.model, "_reorder_cache",
                                                   self._wrap_reorder(getattr(self.model, "_reorder_cache", None))))
            self._handles.append(_InstanceAttr(self.model, "_vtc_run", self))
        except BaseException:
            self.remove()
            raise
        self._attached = True
        return self

    def remove(self) -> None:
        """Detach everything; the model is exactly as before (safe to call twice)."""
        while self._handles:
            self._handles.pop().remove()
        self._feed = None
        self.states.clear()
        self.llm.reset()
        self._pending_token_map = None
        self._attached = False

    def __enter__(self) -> Run:
        """Attach unless attached already. Re-entrant: a nested ``with run:`` (or ``with handle:`` after
        ``vtc.apply``) leaves the run attached at its exit; only the block that attached detaches."""
        attaching = not self._attached
        if attaching:
            self.attach()
        self._entered.append(attaching)
        return self

    def __exit__(self, *exc) -> None:
        if self._entered.pop() if self._entered else True:
            self.remove()

    def set_instruction(self, text: str | list[str] | None) -> None:
        """The user's instruction (question) for text-guided vision-side methods (CDPruner): one string for every
        sample, or one per batch row; None goes back to reading it from the prompt."""
        if text is not None and not isinstance(text, str) and not (
                isinstance(text, list | tuple) and all(isinstance(t, str) for t in text)):
            raise ConfigError(f"set_instruction takes a string or a list of strings (one per batch row), got {text!r}")
        self.vision.instruction = text if text is None or isinstance(text, str) else list(text)

    # ---- hooks --------------------------------------------------------------------------------------------------
    def _bind(self, args, kwargs) -> dict:
        if not args:
            return dict(kwargs)
        bound = self._forward_sig.bind_partial(*args, **kwargs)
        out = dict(bound.arguments)
        extra = out.pop("kwargs", None)
        if isinstance(extra, dict):
            out.update(extra)
        return out

    def _cache(self, kwargs):
        return kwargs.get(self._cache_key, kwargs.get("past_key_values", kwargs.get("cache")))

    def _pre_forward(self, module, args, kwargs):
        t0 = time.perf_counter()
        kwargs = self._bind(args, kwargs)
        feed = self._feed
        if feed is not None:
            feed.discard()  # what a failed forward left
        cache = self._cache(kwargs)
        is_prefill = cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)
        if is_prefill and cache is not None and getattr(cache, "is_compileable", False) and self.llm.stages:
            raise ConfigError("LLM-side stages need a dynamic KV cache (static / compileable caches are fixed-size)")
        token_map = None
        input_ids = kwargs.get("input_ids")
        if is_prefill and self._pending_token_map is None:
            self.stats.begin_prefill()
        if self.vision.stages and input_ids is not None and self.adapter.has_visual_inputs(kwargs):
            prompt = self._reduce_prompt(kwargs)
            kwargs = self._replace_inputs(kwargs, prompt)
            token_map = prompt.token_map
            if feed is not None and kwargs.get("mm_encoder_outputs") is not None:
                kwargs = feed.load(kwargs, kwargs.pop("mm_encoder_outputs"))
        elif self._pending_token_map is not None and is_prefill:
            token_map = self._pending_token_map
            ref = kwargs.get("inputs_embeds")
            ref = ref if ref is not None else kwargs.get("input_ids")  # families fed the rebuilt ids (Gemma 3, Qwen3-VL)
            if ref is not None and ref.shape[0] != token_map.is_visual.shape[0]:
                # generate expanded the rebuilt prompt (beams / num_return_sequences): copies are adjacent rows
                token_map = token_map.repeat_rows(ref.shape[0] // token_map.is_visual.shape[0])
        elif input_ids is not None and is_prefill and self.llm.stages:
            tm = self.adapter.token_map(input_ids, kwargs)
            token_map = tm if bool(tm.is_visual.any()) else None
        if feed is not None and feed.held is not None and is_prefill and kwargs.get("input_ids") is not None:
            kwargs = feed.load(kwargs)  # a prefill of generate on the rebuilt ids (every step without a cache)
        self._pending_token_map = None
        self._last_was_prefill = is_prefill
        ref = kwargs.get("inputs_embeds")
        ref = ref if ref is not None else kwargs.get("input_ids")
        if is_prefill and ref is not None:
            self.stats.prompt_len = int(ref.shape[1])
        if self.llm.stages:
            if is_prefill and token_map is not None and kwargs.get("labels") is not None:
                raise ConfigError(
                    "labels cannot be used with LLM-side stages: the logits of pruned positions do not exist. "
                    "Compute the loss on the logits of run.stats' kept positions, or use vision-side stages only"
                )
            if ref is not None:
                am = kwargs.get("attention_mask")
                self.llm.begin(is_prefill=is_prefill, seq_len=ref.shape[1], batch=ref.shape[0],
                               token_map=token_map, attention_mask_2d=am if (am is not None and am.dim() == 2) else None,
                               device=ref.device)
        self.stats.add_time(time.perf_counter() - t0)
        return (), kwargs

    def _post_forward(self, module, args, kwargs, output):
        if self._feed is not None:
            self._feed.check_consumed()
        self.llm.end_prefill()
        if getattr(self, "_last_was_prefill", False):
            self._last_was_prefill = False
            cache = getattr(output, "cache", None)
            if cache is None:
                cache = getattr(output, "past_key_values", None)
            n_layers = self.adapter.num_layers()
            self.stats.record_cache(cache, n_layers)
            for layer in range(n_layers):  # layers before the first LLM-side stage see the whole prompt
                self.stats.seq_len_per_layer.setdefault(layer, self.stats.prompt_len)
            self.stats.seq_len_per_layer = dict(sorted(self.stats.seq_len_per_layer.items()))
        return None

    def _reduce_prompt(self, kwargs):
        images = self.vision.reduce_images(kwargs)  # times its own scoring / selection (not the tower)
        self.stats.image_tokens = [int(im.embeds.shape[0]) for im in images]
        t0 = time.perf_counter()
        prompt = rebuild_prompt(self.adapter, kwargs["input_ids"], kwargs.get("attention_mask"), images, kwargs,
                                labels=kwargs.get("labels"))
        self.stats.add_time(time.perf_counter() - t0)
        return prompt

    def _replace_inputs(self, kwargs: dict, prompt) -> dict:
        kwargs = {k: v for k, v in kwargs.items() if k not in self.adapter.visual_input_keys
                  and k not in self.adapter.vision_only_keys and k != "input_ids"}
        kwargs["inputs_embeds"] = prompt.inputs_embeds
        kwargs["attention_mask"] = prompt.attention_mask
        extra = self.adapter.prompt_kwargs(prompt, kwargs)
        if "input_ids" in extra:
            kwargs.pop("inputs_embeds")
        kwargs.update(extra)
        if prompt.position_ids is not None:
            kwargs["position_ids"] = prompt.position_ids
        elif kwargs.get("position_ids") is not None:
            m = prompt.attention_mask.long()
            kwargs["position_ids"] = (m.cumsum(-1) - 1).clamp(min=0)
        if prompt.labels is not None:
            kwargs["labels"] = prompt.labels
        return kwargs

    def _wrap_generate(self, original):
        run = self
        signature = inspect.signature(original)

        @functools.wraps(original)
        def generate(*args, **kwargs):
            call = _bind_generate(signature, args, kwargs)
            input_ids = call.get("input_ids")
            visual = input_ids is not None and run.adapter.has_visual_inputs(call)
            if visual:
                _refuse_chunked_prefill(run.model, call)
            if not visual or not run.vision.stages:
                return original(*args, **kwargs)
            run.stats.begin_prefill()
            prompt = run._reduce_prompt(call)
            new_kwargs = run._replace_inputs(call, prompt)
            new_kwargs.pop("labels", None)
            run._pending_token_map = prompt.token_map
            feed = run._feed
            if feed is not None and new_kwargs.get("mm_encoder_outputs") is not None:
                feed.hold(new_kwargs.pop("mm_encoder_outputs"), new_kwargs["input_ids"])
            try:
                out = original(**new_kwargs)
            finally:
                run._pending_token_map = None
                if feed is not None:
                    feed.release()
            fed = new_kwargs.get("input_ids")  # adapters that feed the rebuilt ids get them back: strip them
            return _prepend_prompt(out, input_ids, 0 if fed is None else fed.shape[1])

        return generate

    def _wrap_reorder(self, original):
        """Beam search reorders the cache's rows (``beam_idx``); vtc's per-row state (kept slots, sizes, decode
        masks) moves with them."""
        run = self

        def _reorder_cache(cache, beam_idx):
            if original is not None:
                cache = original(cache, beam_idx)
            elif hasattr(cache, "reorder_cache"):
                cache.reorder_cache(beam_idx)
            run.llm.reorder_rows(beam_idx)
            return cache

        return _reorder_cache


def _refuse_chunked_prefill(model: nn.Module, call: dict) -> None:
    """vtc reduces the visual tokens in one prefill forward over the whole prompt: a prefill split into chunks
    (``prefill_chunk_size``, a ``generate`` argument or a generation-config field) would score and cut each chunk
    apart, so it is refused instead of giving wrong results."""
    size = call.get("prefill_chunk_size")
    if size is None:
        config = call.get("generation_config") or getattr(model, "generation_config", None)
        size = getattr(config, "prefill_chunk_size", None)
    if size is not None:
        raise ConfigError(f"generate: prefill_chunk_size={size} (chunked prefill) is not supported under vtc, which "
                          "reduces the visual tokens in one prefill forward over the whole prompt; leave "
                          "prefill_chunk_size unset (None)")


def _bind_generate(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """The keyword arguments of a ``generate`` call, with the prompt (positional, ``inputs=`` or ``input_ids=``)
    as ``input_ids``."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    call = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            call[name] = value
    inputs = call.pop("inputs", None)
    if inputs is not None:
        if call.get("input_ids") is not None:
            raise ValueError("generate: pass the prompt as `inputs` or as `input_ids`, not both")
        call["input_ids"] = inputs
    return call


def _prepend_prompt(out, input_ids: torch.Tensor, strip: int = 0):
    """generate() on inputs_embeds returns only new tokens (on rebuilt ids: those ids, then the new tokens: ``strip``
    drops them); give back [original prompt ids, new tokens], the prompt repeated for each sequence of a sample
    (``num_return_sequences``)."""
    seqs = out if isinstance(out, torch.Tensor) else out.sequences
    seqs = seqs[:, strip:]
    prompt = input_ids.to(seqs.device)
    if seqs.shape[0] != prompt.shape[0]:
        prompt = prompt.repeat_interleave(seqs.shape[0] // prompt.shape[0], dim=0)
    full = torch.cat([prompt, seqs], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


class _InstanceAttr:
    """Sets an attribute on the instance; ``remove`` restores what the instance had before (or nothing, so the
    class attribute shows through again)."""

    _MISSING = object()

    def __init__(self, obj, name: str, value) -> None:
        self.obj = obj
        self.name = name
        self.before = obj.__dict__.get(name, self._MISSING)
        setattr(obj, name, value)

    def remove(self) -> None:
        if self.before is self._MISSING:
            self.obj.__dict__.pop(self.name, None)
        else:
            self.obj.__dict__[self.name] = self.before


def compress(model: nn.Module, config: str | dict | Config | list, *, adapter: ModelAdapter | None = None) -> Run:
    """Context manager that compresses visual tokens of ``model`` inside the ``with`` block.

    ``with vtc.compress(model, "configs/llava-1.5/fastv-50.yaml") as run: model.generate(...)``.
    The config is validated (and checked against the model) here; hooks attach on ``__enter__`` and are removed
    on exit, also after an exception. ``run.stats`` describes the last prefill.
    """
    return Run(model, load_config(config), adapter)


def apply(model: nn.Module, config: str | dict | Config | list, *, adapter: ModelAdapter | None = None) -> Run:
    """Attach a config for the long term; returns the handle (``handle.remove()`` restores the model)."""
    return Run(model, load_config(config), adapter).attach()
