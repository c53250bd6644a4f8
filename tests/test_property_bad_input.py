"""Property test (issue 17, point 3): random configs, valid and invalid, of every registered method and field, on
random small inputs of the tiny families. Every failure is a ``vtc.ConfigError`` / ``ValueError`` with a message,
never another exception type, and the model is unchanged afterwards (parameters, hooks, attributes).

Methods and their fields are read from ``vtc.available_methods()`` and the pydantic models, so new methods are
covered without touching this file. Bounded and deterministic: a fixed number of examples, derandomized.
"""

from __future__ import annotations

import typing
import warnings
from types import UnionType

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vtc
from vtc.methods import get_method_class

MAX_EXAMPLES = 60

JUNK = st.one_of(st.none(), st.booleans(), st.sampled_from(["", "2", "x", "last"]), st.integers(-3, 40),
                 st.floats(-1.5, 2.5), st.just(float("nan")), st.lists(st.integers(-1, 6), max_size=4))


def _values(annotation) -> st.SearchStrategy:
    """Mostly plausible values for a field of type ``annotation``, some of them out of range."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _values(args[0])
    if origin in (typing.Union, UnionType):
        return st.one_of([_values(a) for a in args])
    if annotation is type(None):
        return st.none()
    if origin is typing.Literal:
        return st.sampled_from(args)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(1, 3)
    if annotation is float:
        return st.one_of(st.floats(-0.2, 1.3), st.integers(0, 3))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(_values(args[0]), min_size=0, max_size=4)
        return st.tuples(*[_values(a) for a in args]).map(list)
    return JUNK


def _rarely(n: int) -> st.SearchStrategy:
    """True about once in ``n`` draws (hypothesis favours the first choice, so False comes first)."""
    return st.sampled_from([False] * (n - 1) + [True])


@st.composite
def stages(draw, methods: tuple[str, ...] | None = None) -> dict:
    name = draw(st.sampled_from(methods or vtc.available_methods()))
    stage = {"method": name}
    cls = get_method_class(name)
    for field in cls.parameters():
        info = cls.model_fields[field]
        if field == "method" or (not info.is_required() and not draw(st.booleans())):
            continue
        odd = draw(_rarely(6))  # now and then a value of any type or out of range
        if field == "budget" and any(typing.get_origin(a) is typing.Literal
                                     for a in (info.annotation, *typing.get_args(info.annotation))):
            # a method's own budget type (e.g. SparseVLM's Literal of schedule names): its own values
            stage[field] = draw(JUNK if odd else _values(info.annotation))
        elif field == "budget":
            plausible = st.one_of(st.integers(1, 40), st.floats(0.05, 1.0))
            stage[field] = draw(st.one_of(st.integers(-1, 0), st.floats(1.01, 2.0), JUNK) if odd else plausible)
        else:
            stage[field] = draw(JUNK if odd else _values(info.annotation))
    if draw(_rarely(20)):
        stage["bogus"] = 1
    return stage


@st.composite
def configs(draw) -> dict:
    cfg = {"stages": draw(st.lists(stages(), min_size=1, max_size=2))}
    if draw(st.booleans()):
        cfg["seed"] = draw(st.one_of(st.integers(-1, 2**64), JUNK) if draw(_rarely(4)) else st.integers(0, 9))
    return cfg


def _families():
    from matrix import discover

    return {f.name: f for f in discover()[0]}


FAMILIES = _families()
_MODELS: dict = {}


def _model(name: str):
    if name not in _MODELS:
        model = FAMILIES[name].build("sdpa")
        with torch.no_grad():  # transformers caches a few attributes on first use: take the snapshot after that
            inputs = FAMILIES[name].inputs(model, 2, 0)
            model(**inputs)
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
            # transformers (5.2x) installs its output-capturing hooks on a tower (``_output_capturing_hooks_installed``)
            # the first time anyone asks it for hidden states, once and for good, whoever asks; a tower whose plain
            # forward never asks (Gemma 3's SigLIP) is first asked by vtc's scoring. Ask once here, as a user would.
            try:
                with vtc.compress(model, {"stages": [{"method": "fastervlm", "budget": 1.0}]}):
                    model(**inputs)
            except ValueError:
                pass
        _MODELS[name] = (model, _snapshot(model))
    return _MODELS[name]


def _snapshot(model) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "attrs": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": model.training,
    }


def _assert_unchanged(model, before: dict) -> None:
    after = _snapshot(model)
    assert after["attrs"] == before["attrs"] and after["hooks"] == before["hooks"]
    assert after["grad"] == before["grad"] and after["training"] == before["training"]
    for k, v in before["params"].items():
        assert torch.equal(after["params"][k], v), k


def _break_placeholders(model, inputs: dict, drop: int) -> dict:
    """Row 0 loses its last ``drop`` image placeholders (turned into a text token)."""
    ids = inputs["input_ids"].clone()
    pos = (ids[0] == model.config.image_token_id).nonzero().flatten()
    ids[0, pos[len(pos) - drop:]] = 5
    return dict(inputs, input_ids=ids)


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(cfg=configs(), family=st.sampled_from(sorted(FAMILIES)), batch=st.integers(1, 2), seed=st.integers(0, 3),
       mode=st.sampled_from(["forward", "generate"]), drop=st.sampled_from([0, 0, 0, 1, 3]))
def test_random_configs_fail_cleanly(cfg, family, batch, seed, mode, drop):
    model, before = _model(family)
    inputs = FAMILIES[family].inputs(model, batch, seed)
    if drop:
        inputs = _break_placeholders(model, inputs, drop)
    # input that must be refused: a wrong placeholder count (the model itself refuses it), an ill-typed int field
    # or seed (``layer: true`` must not be coerced)
    must_fail = bool(drop) or _ill_typed(cfg)
    failed = False
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            with vtc.compress(model, cfg):
                if mode == "forward":
                    model(**inputs)
                else:
                    model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    except ValueError as err:  # vtc.ConfigError is a ValueError
        assert str(err).strip(), f"{type(err).__name__} without a message"
        failed = True
    assert failed or not must_fail, "wrong input ran without an error"
    _assert_unchanged(model, before)


def _int_field(cls, field: str) -> bool:
    """Whether ``field`` is a scalar int field (``int``, ``int | None``, ``Annotated[int, ...] | None``)."""
    info = cls.model_fields.get(field) if field in cls.parameters() else None
    ann = info.annotation if info is not None else None
    while typing.get_origin(ann) in (typing.Union, UnionType, typing.Annotated):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        ann = args[0] if typing.get_origin(ann) is typing.Annotated or len(args) == 1 else None
    return ann is int


def _ill_typed(cfg: dict) -> bool:
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        return True
    for stage in cfg["stages"]:
        cls = get_method_class(stage["method"])
        if any(_int_field(cls, f) and v is not None and (isinstance(v, bool) or not isinstance(v, int))
               for f, v in stage.items()):
            return True
    return False


def _drawn_fields_and_validity(name: str) -> tuple[set, set]:
    """The fields the strategy draws for method ``name`` and whether its drawn stages load (True / False seen)."""
    seen: set = set()
    loads: set = set()

    @settings(max_examples=150, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(stage=stages(methods=(name,)))
    def collect(stage):
        seen.update(stage)
        try:
            vtc.load_config([stage])
            loads.add(True)
        except vtc.ConfigError:
            loads.add(False)

    collect()
    return seen, loads


def test_the_strategy_draws_every_method_and_field():
    """The drawn configs reach every registered method and every one of its fields (a new method is covered), and
    give both valid and invalid stages of every built-in method. Drawn method by method, so the outcome does not
    depend on which helper methods other tests registered in this process."""
    for name in vtc.available_methods():
        seen, loads = _drawn_fields_and_validity(name)
        assert seen >= set(get_method_class(name).parameters()), name
        if get_method_class(name).__module__.startswith("vtc."):  # tests may register helper methods too
            assert loads == {True, False}, f"{name}: the drawn stages are all valid or all invalid"


pytestmark = pytest.mark.filterwarnings("ignore")
