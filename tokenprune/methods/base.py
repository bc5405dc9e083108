"""The hook interface every method implements, the method registry, and composition.

A method is a dataclass. It overrides only the hooks it needs; the engine calls them:

* ``before_llm(seq: DecoderInput) -> Reduction | None``: merge or drop rows of the sequence entering the first
  decoder layer (positions, layout entries and side inputs follow by the reduction's rules).
* ``prune_layers(layout) -> list[int]`` + ``select(step: PrefillStep) -> Reduction``: at the input of each listed
  layer, keep a subset of the current rows, optionally with merged rows (prefill only; the KV caches of that layer
  and later ones hold only the new rows).
* ``layer_plan(layer, layout) -> LayerPlan | None``: per-layer compute for visual rows (skip the attention
  and/or the MLP, with a scalar), prefill only.
* ``before_processor(visuals: VisualInputs) -> VisualInputs | None``: change a sample's images / video before the
  model family's processor (``vlm.prepare(sample, method)``; e.g. downsampling). Not a decoder hook.

The types come from the engine's contract (``tokenprune/engine/contract.py``). Methods keep no state across
calls: whatever a call needs lives in the engine's per-call state, which is dropped with the call's KV cache.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.contract import (DecoderInput, LayerPlan, LayerStep, MergedRows, ModelInfo, PrefillStep,  # noqa: F401
                               Reduction, Selection, TokenLayout, VisualInputs, VisualSequence)


# ---------------------------------------------------------------------------------------------------------
# Method base class
# ---------------------------------------------------------------------------------------------------------
class Method:
    """Base class: every hook is optional. Subclasses are dataclasses registered with ``@register``."""

    name: str = "method"
    # before_llm reads the vision encoder's signals (``DecoderInput.vision``): the engine installs the family's capture
    # hooks only then (a class attribute, or a property where it depends on the fields)
    needs_vision_signals: bool = False

    # -- hooks ------------------------------------------------------------------------------------------
    def before_llm(self, seq: DecoderInput) -> Reduction | None:
        return None

    def prune_layers(self, layout: TokenLayout) -> list[int]:
        return []

    def select(self, step: PrefillStep) -> Reduction:
        raise NotImplementedError(f"{type(self).__name__} lists prune layers but does not implement select()")

    def layer_plan(self, layer: int, layout: TokenLayout) -> LayerPlan | None:
        return None

    def before_processor(self, visuals: VisualInputs) -> VisualInputs | None:
        return None

    # -- what the engine needs to know ------------------------------------------------------------------
    @property
    def uses_before_llm(self) -> bool:
        return type(self).before_llm is not Method.before_llm

    @property
    def uses_prune_layers(self) -> bool:
        """True when the method lists prune layers (``prune_layers`` overridden); ``select`` runs there."""
        return type(self).prune_layers is not Method.prune_layers

    @property
    def uses_layer_plan(self) -> bool:
        return type(self).layer_plan is not Method.layer_plan

    @property
    def uses_before_processor(self) -> bool:
        """True when the method changes the preprocessing (inputs must be prepared with ``vlm.prepare(sample, m)``)."""
        return type(self).before_processor is not Method.before_processor

    @property
    def is_noop(self) -> bool:
        """True when the method installs no decoder hook (``before_processor`` acts in ``prepare``)."""
        return not (self.uses_before_llm or self.uses_prune_layers or self.uses_layer_plan)

    def components(self) -> list["Method"]:
        """The methods whose hooks the engine runs, in order: this one (a ``Compose``: its children)."""
        return [self]

    def validate(self, model: ModelInfo) -> None:
        """Check fields that depend on the model (e.g. layer indices); raise ValueError naming the field."""

    def describe(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"method": self.name, **fields}


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: ``@register("fastv")`` makes the method available to ``create`` and the configs."""

    def decorator(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available())}")
    return _REGISTRY[name]


def create(name: str, **fields) -> Method:
    """Build a registered method from its name and fields, validating both."""
    cls = method_class(name)
    if dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"method {name!r} has no field(s) {', '.join(unknown)}; its fields are: {', '.join(sorted(known)) or '(none)'}"
            )
    return cls(**fields)


# ---------------------------------------------------------------------------------------------------------
# Field validation helpers (errors name the field and the allowed values)
# ---------------------------------------------------------------------------------------------------------
def check_ratio(method: str, field_name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"{method}.{field_name} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_choice(method: str, field_name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{method}.{field_name} must be one of {list(choices)}, got {value!r}")


def check_layer(method: str, field_name: str, value, model: ModelInfo | None = None, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{method}.{field_name} must be an integer layer index, got {value!r}")
    if value < minimum:
        raise ValueError(f"{method}.{field_name} must be >= {minimum}, got {value}")
    if model is not None and value >= model.num_layers:
        raise ValueError(
            f"{method}.{field_name}={value} is out of range: the model has {model.num_layers} decoder layers "
            f"(valid indices {minimum}..{model.num_layers - 1})"
        )
    return value


POSITIONS = ("auto", "keep", "reindex")


def check_positions(method: str, value) -> None:
    """``value`` must be one of ``POSITIONS`` (ValueError naming ``method.positions``)."""
    check_choice(method, "positions", value, POSITIONS)


def resolve_positions(method: str, value: str, official: str, model: ModelInfo) -> str:
    """``keep`` or ``reindex`` for ``model``: ``auto`` is the method's ``official`` rule ("keep" or "reindex", its
    official code's on 1-D RoPE) where the model's family defines contiguous re-indexing, else ``keep``;
    ``reindex`` is refused where it is not defined (call this in ``validate``, before any model work)."""
    check_positions(method, value)
    if value == "auto":
        return official if model.reindex_positions else "keep"
    if value == "reindex" and not model.reindex_positions:
        raise ValueError(f"{method}.positions='reindex' (contiguous re-numbering) is not defined for the "
                         f"{model.family or 'this'} family ({model.rope}); use positions='auto' or 'keep'")
    return value


def keep_count(num_tokens: int, ratio: float, rounding: str) -> int:
    """Tokens kept out of ``num_tokens`` at ``ratio``: "round" (Python round, half to even) or "floor"."""
    count = round(num_tokens * ratio) if rounding == "round" else math.floor(num_tokens * ratio)
    return max(0, min(num_tokens, int(count)))


def topk_rows(scores: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows with the highest scores (ties: lower row first), ascending."""
    if k >= rows.numel():
        return rows
    order = torch.argsort(scores.float(), descending=True, stable=True)[:k]
    return torch.sort(rows[order]).values


# ---------------------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Compose(Method):
    """Run several methods' hooks in order: ``Compose([PruneVidStage1(...), PDrop(...)])``.

    The engine runs the children's ``before_llm`` reductions in order and, at a shared prune layer, their
    selections in order (each sees the result of the previous one); prune layers are the union; the first
    non-empty layer plan wins.
    """

    methods: list[Method] = field(default_factory=list)
    name = "compose"

    def components(self) -> list[Method]:
        return list(self.methods)

    def before_llm(self, seq: DecoderInput) -> Reduction | None:
        raise RuntimeError("Compose.before_llm is resolved by the engine per child (see components())")

    def prune_layers(self, layout: TokenLayout) -> list[int]:
        return sorted({layer for m in self.methods if m.uses_prune_layers for layer in m.prune_layers(layout)})

    def select(self, step: PrefillStep) -> Reduction:
        raise RuntimeError("Compose.select is resolved by the engine per child (see components())")

    def layer_plan(self, layer: int, layout: TokenLayout) -> LayerPlan | None:
        for method in self.methods:
            if method.uses_layer_plan:
                plan = method.layer_plan(layer, layout)
                if plan is not None and not plan.is_identity:
                    return plan
        return None

    @property
    def uses_before_llm(self) -> bool:
        return any(m.uses_before_llm for m in self.methods)

    @property
    def uses_prune_layers(self) -> bool:
        return any(m.uses_prune_layers for m in self.methods)

    @property
    def uses_layer_plan(self) -> bool:
        return any(m.uses_layer_plan for m in self.methods)

    def before_processor(self, visuals: VisualInputs) -> VisualInputs | None:
        raise RuntimeError("Compose.before_processor is resolved per child (see components())")

    @property
    def uses_before_processor(self) -> bool:
        return any(m.uses_before_processor for m in self.methods)

    @property
    def needs_vision_signals(self) -> bool:
        return any(m.needs_vision_signals for m in self.methods)

    def validate(self, model: ModelInfo) -> None:
        for method in self.methods:
            method.validate(model)

    def describe(self) -> dict[str, Any]:
        return {"method": "compose", "methods": [m.describe() for m in self.methods]}
