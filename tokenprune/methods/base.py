"""The hook interface every method implements, the method registry, and composition.

A method is a dataclass. It overrides only the hooks it needs; the engine calls them:

* ``before_llm(seq) -> seq``: merge or drop visual embeddings before the first decoder layer (positions follow).
* ``prune_layers(layout) -> list[int]`` + ``select(step) -> Selection``: at the input of each listed layer,
  keep a subset of the current tokens (prefill only; the KV caches of that layer and later ones hold only
  the survivors).
* ``layer_plan(layer, layout) -> LayerPlan | None``: per-layer compute for visual rows (skip the attention
  and/or the MLP, with a scalar), prefill only.

Methods keep no state across calls: whatever a call needs lives in the engine's per-call state, which is
dropped with the call's KV cache.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..engine.layout import TokenLayout

if TYPE_CHECKING:  # pragma: no cover
    pass


# ---------------------------------------------------------------------------------------------------------
# What the engine hands to hooks, and what hooks hand back
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """What a method may check its fields against before any model work."""

    num_layers: int
    rope: str  # "1d" or "mrope"
    hidden_size: int = 0
    family: str = ""


@dataclass
class Selection:
    """Rows of the current sequence that survive, ascending (``[L']`` int64).

    ``prune_cache_before``: also drop the pruned rows from the KV caches of all earlier layers.
    ``reindex_positions``: number the survivors' positions contiguously from here on (1-D RoPE only).
    """

    indices: torch.Tensor
    prune_cache_before: bool = False
    reindex_positions: bool = False


@dataclass
class LayerPlan:
    """Per-layer compute for the visual rows (text rows always run the full layer)."""

    skip_attn: bool = False
    skip_mlp: bool = False
    mlp_scale: float = 1.0  # visual rows: h <- mlp_scale * u when the MLP is skipped
    attn_scale: float = 1.0  # visual rows: u <- attn_scale * h when the attention is skipped

    @property
    def is_identity(self) -> bool:
        return not (self.skip_attn or self.skip_mlp)


@dataclass
class VisualSequence:
    """The sequence entering the decoder, for ``before_llm`` (one sample).

    ``embeds``: ``[1, L, d]``; ``positions``: ``[1, P, L]`` rotary positions (P = 1 for 1-D RoPE, 3 for
    mRoPE); ``layout``: the sample's TokenLayout. A hook returns a new VisualSequence (any length).
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    layout: TokenLayout
    stats: dict = field(default_factory=dict)


class LayerStep:
    """What ``select`` sees at the input of one layer, for one sample.

    ``hidden``: ``[1, L, d]`` the hidden states entering ``layer``; ``positions``: ``[1, P, L]``;
    ``layout``: the current TokenLayout. ``attention(...)`` computes attention probabilities lazily from a
    layer's own projections, for the needed query rows only (see ``engine/scores.py``).
    """

    def __init__(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor, layout: TokenLayout,
                 scorer: Callable[..., torch.Tensor], stats: dict):
        self.layer = layer
        self.hidden = hidden
        self.positions = positions
        self.layout = layout
        self._scorer = scorer
        self.stats = stats

    def attention(self, layer: int | None = None, queries: str | torch.Tensor = "last", keys: str | torch.Tensor = "visual",
                  rope: bool = True, causal: bool = True, heads: str = "mean", reduce: str | None = None) -> torch.Tensor:
        """Attention probabilities of ``queries`` over ``keys`` in ``layer`` (``self.layer - 1`` or ``self.layer``).

        queries: "last" | "text" (non-visual rows after the last visual row) | "visual" | "all" | row tensor.
        keys: "visual" | "all" | column tensor — the softmax always runs over every key the query may see.
        heads: "mean" | "max" | "none"; reduce over queries: None | "sum" | "mean" | "max".
        Returns float32 ``[n_q, n_k]`` (or ``[n_k]`` when reduced, ``[H, n_q, n_k]`` for heads="none").
        """
        layer = self.layer if layer is None else layer
        return self._scorer(layer=layer, queries=self.rows(queries), keys=self.columns(keys), rope=rope,
                            causal=causal, heads=heads, reduce=reduce)

    def rows(self, which: str | torch.Tensor) -> torch.Tensor:
        if isinstance(which, torch.Tensor):
            return which
        device = self.layout.kind.device
        if which == "last":
            return torch.tensor([self.layout.length - 1], device=device)
        if which == "text":
            return self.layout.text_after_visual_rows()
        if which == "visual":
            return self.layout.visual_rows()
        if which == "all":
            return torch.arange(self.layout.length, device=device)
        raise ValueError(f"queries must be 'last', 'text', 'visual', 'all' or a tensor of rows, got {which!r}")

    def columns(self, which: str | torch.Tensor) -> torch.Tensor | None:
        if isinstance(which, torch.Tensor):
            return which
        if which == "visual":
            return self.layout.visual_rows()
        if which == "all":
            return None
        raise ValueError(f"keys must be 'visual', 'all' or a tensor of columns, got {which!r}")

    def keep_visual(self, visual_rows: torch.Tensor, **kwargs) -> Selection:
        """Selection keeping every non-visual row plus ``visual_rows`` (current row indices)."""
        keep = torch.zeros(self.layout.length, dtype=torch.bool, device=self.layout.kind.device)
        keep[~self.layout.is_visual] = True
        keep[visual_rows] = True
        return Selection(keep.nonzero().flatten(), **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Method base class
# ---------------------------------------------------------------------------------------------------------
class Method:
    """Base class: every hook is optional. Subclasses are dataclasses registered with ``@register``."""

    name: str = "method"

    # -- hooks ------------------------------------------------------------------------------------------
    def before_llm(self, seq: VisualSequence) -> VisualSequence:
        return seq

    def prune_layers(self, layout: TokenLayout) -> list[int]:
        return []

    def select(self, step: LayerStep) -> Selection:
        raise NotImplementedError(f"{type(self).__name__} lists prune layers but does not implement select()")

    def layer_plan(self, layer: int, layout: TokenLayout) -> LayerPlan | None:
        return None

    # -- what the engine needs to know ------------------------------------------------------------------
    @property
    def uses_before_llm(self) -> bool:
        return type(self).before_llm is not Method.before_llm

    @property
    def uses_select(self) -> bool:
        return type(self).prune_layers is not Method.prune_layers

    @property
    def uses_layer_plan(self) -> bool:
        return type(self).layer_plan is not Method.layer_plan

    @property
    def is_noop(self) -> bool:
        return not (self.uses_before_llm or self.uses_select or self.uses_layer_plan)

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

    ``before_llm`` hooks chain; prune layers are the union (at a shared layer the selections apply in
    order); the first non-empty layer plan wins.
    """

    methods: list[Method] = field(default_factory=list)
    name = "compose"

    def before_llm(self, seq: VisualSequence) -> VisualSequence:
        for method in self.methods:
            if method.uses_before_llm:
                seq = method.before_llm(seq)
        return seq

    def prune_layers(self, layout: TokenLayout) -> list[int]:
        return sorted({layer for m in self.methods if m.uses_select for layer in m.prune_layers(layout)})

    def select(self, step: LayerStep) -> Selection:
        raise RuntimeError("Compose.select is resolved by the engine per child (see selections_at)")

    def selectors_at(self, layer: int, layout: TokenLayout) -> list[Method]:
        return [m for m in self.methods if m.uses_select and layer in m.prune_layers(layout)]

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
    def uses_select(self) -> bool:
        return any(m.uses_select for m in self.methods)

    @property
    def uses_layer_plan(self) -> bool:
        return any(m.uses_layer_plan for m in self.methods)

    def validate(self, model: ModelInfo) -> None:
        for method in self.methods:
            method.validate(model)

    def describe(self) -> dict[str, Any]:
        return {"method": "compose", "methods": [m.describe() for m in self.methods]}


def selectors_at(method: Method, layer: int, layout: TokenLayout) -> list[Method]:
    """The methods whose ``select`` runs at ``layer`` (one, or several inside a Compose)."""
    if isinstance(method, Compose):
        return method.selectors_at(layer, layout)
    return [method] if layer in method.prune_layers(layout) else []
