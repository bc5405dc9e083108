"""The contract between the engine, the methods and the model families: what a method receives and returns.

This module is a leaf: it imports nothing else of tokenprune (``tests/test_layering.py``). ``methods/``,
``models/`` and the engine import it; the engine never imports ``methods/`` or ``models/``.

* ``TokenLayout`` (with ``VisualGroup`` / ``VisualSpec``): where the system, visual (per image / video frame, with
  its grid) and text rows of one sample's current sequence are, and which prompt row each came from.
* ``DecoderInput``: the sequence entering the first decoder layer, for ``before_llm`` (one sample), with lazy
  vision-encoder signals (``VisionSignals`` / ``GroupSignals``) for the methods that ask for them.
* ``PrefillStep``: what ``select`` sees at the input of one decoder layer during a prefill (one sample), with lazy
  attention scores.
* ``Reduction``: what ``before_llm`` and ``select`` return — the rows to keep plus optional merged rows
  (``MergedRows``); the engine applies it in one place (``Reduction.rows`` / ``positions`` / ``layout``).
* ``LayerPlan``: per-layer compute for visual rows (layer skip).
* ``ModelInfo``: what a method may check its fields against before any model work.
* ``VisualInputs`` (with ``FixedGeometry`` / ``DynamicGeometry``): a sample's images / video before the family's
  processor, for ``before_processor`` (methods that change the input resolution, e.g. downsampling).
* ``PruningInputError`` / ``ModelInputError``: inputs the engine cannot prune exactly / a family cannot prepare.

Old names (``VisualSequence``, ``LayerStep``, ``Selection``) stay importable as aliases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2
KIND_NAMES = {TEXT: "text", IMAGE: "image", VIDEO: "video"}


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
class PruningInputError(ValueError):
    """A call the engine cannot prune correctly (padding, missing input_ids, unsupported cache, batch shapes)."""


class ModelInputError(ValueError):
    """A sample a model family cannot turn into model inputs (corrupt image, unreadable video, ...)."""


# ---------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisualGroup:
    """One image, or one temporal step (two sampled frames) of a video, as a grid of LLM tokens."""

    kind: int  # IMAGE or VIDEO
    source: int  # index of the image / video within the sample
    frame: int  # temporal grid index within the video (0 for images)
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class VisualSpec:
    """What a model family knows about one sample's visual inputs, in LLM-token units.

    ``image_grids`` / ``video_grids`` hold one ``(t, rows, cols)`` triple per image / video in prompt order
    (images have ``t == 1``); ``rows * cols`` tokens per temporal step. The placeholder rows of a kind are taken
    in prompt order, so a video whose temporal steps are separate runs (text between them) is described the same
    way as one contiguous run.
    """

    image_token_id: int
    video_token_id: int | None = None
    image_grids: tuple[tuple[int, int, int], ...] = ()
    video_grids: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class TokenLayout:
    """Per-row description of one sample's current sequence (length L).

    Tensors (all shape ``[L]``, int64, on the sequence's device):
      * ``kind``: TEXT / IMAGE / VIDEO
      * ``group``: index into ``groups`` for visual rows, -1 for text rows
      * ``cell``: raster index inside the group's grid (row * cols + col), -1 for text rows and for merged rows
        whose members sit in different cells
      * ``original``: row index in the original, unpruned prompt (merged rows: their first member's)
    """

    kind: torch.Tensor
    group: torch.Tensor
    cell: torch.Tensor
    original: torch.Tensor
    groups: tuple[VisualGroup, ...]
    original_length: int
    original_num_visual: int
    meta: dict = field(default_factory=dict, compare=False)  # method annotations (e.g. video segments)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_input_ids(cls, input_ids: torch.Tensor, spec: VisualSpec) -> "TokenLayout":
        """Find the layout of one sample. ``input_ids``: ``[L]``."""
        if input_ids.dim() != 1:
            raise ValueError(f"TokenLayout.from_input_ids expects one sample [L], got shape {tuple(input_ids.shape)}")
        device = input_ids.device
        length = input_ids.shape[0]
        kind = torch.full((length,), TEXT, dtype=torch.long, device=device)
        group = torch.full((length,), -1, dtype=torch.long, device=device)
        cell = torch.full((length,), -1, dtype=torch.long, device=device)
        groups: list[VisualGroup] = []
        for token_kind, token_id, grids in (
            (IMAGE, spec.image_token_id, spec.image_grids),
            (VIDEO, spec.video_token_id, spec.video_grids),
        ):
            if token_id is None:
                continue
            rows_of_kind = (input_ids == token_id).nonzero().flatten()
            expected = sum(t * h * w for t, h, w in grids)
            if rows_of_kind.numel() != expected:
                raise ValueError(
                    f"found {rows_of_kind.numel()} {KIND_NAMES[token_kind]} placeholder tokens (id {token_id}) "
                    f"but the visual grids {list(grids)} need {expected}"
                )
            offset = 0
            for source, (t, h, w) in enumerate(grids):
                for frame in range(t):
                    rows = rows_of_kind[offset : offset + h * w]
                    kind[rows] = token_kind
                    group[rows] = len(groups)
                    cell[rows] = torch.arange(h * w, device=device)
                    groups.append(VisualGroup(token_kind, source, frame, h, w))
                    offset += h * w
        # Groups must be numbered in prompt order (images and videos may interleave).
        if groups:
            first_row = torch.full((len(groups),), length, dtype=torch.long, device=device)
            rows = torch.arange(length, device=device)
            visual = group >= 0
            first_row = first_row.scatter_reduce(0, group[visual], rows[visual], reduce="amin")
            order = torch.argsort(first_row)
            renumber = torch.empty_like(order)
            renumber[order] = torch.arange(len(groups), device=device)
            group = torch.where(visual, renumber[group.clamp(min=0)], group)
            groups = [groups[i] for i in order.tolist()]
        return cls(
            kind=kind,
            group=group,
            cell=cell,
            original=torch.arange(length, device=device),
            groups=tuple(groups),
            original_length=length,
            original_num_visual=int((kind != TEXT).sum()),
        )

    # ------------------------------------------------------------------ queries
    @property
    def length(self) -> int:
        return self.kind.shape[0]

    @cached_property
    def is_visual(self) -> torch.Tensor:
        """``[L]`` bool."""
        return self.kind != TEXT

    @cached_property
    def num_visual(self) -> int:
        """Counted once per layout (one host-device sync), not once per layer."""
        return int(self.is_visual.sum())

    def visual_rows(self) -> torch.Tensor:
        """Current row indices of visual tokens, ascending. ``[n_visual]``."""
        return self.is_visual.nonzero().flatten()

    def text_rows(self) -> torch.Tensor:
        """Current row indices of every non-visual token (system, template, question). ``[L - n_visual]``."""
        return (~self.is_visual).nonzero().flatten()

    def text_after_visual_rows(self) -> torch.Tensor:
        """Non-visual rows after the last visual token (the instruction that follows the image / video)."""
        visual = self.visual_rows()
        if visual.numel() == 0:
            return self.text_rows()
        rows = torch.arange(self.length, device=self.kind.device)
        return rows[(rows > visual[-1]) & ~self.is_visual]

    def group_rows(self, group_index: int) -> torch.Tensor:
        """Current rows of one visual group, ascending."""
        return (self.group == group_index).nonzero().flatten()

    # ------------------------------------------------------------------ transformation
    def gather(self, index: torch.Tensor) -> "TokenLayout":
        """Layout of ``sequence[index]`` (``index``: ``[L']`` ascending rows of the current sequence)."""
        return self.with_rows(self.kind[index], self.group[index], self.cell[index], self.original[index])

    def with_rows(self, kind, group, cell, original, meta: dict | None = None) -> "TokenLayout":
        """A layout with new per-row tensors (same groups and original prompt)."""
        return TokenLayout(
            kind=kind,
            group=group,
            cell=cell,
            original=original,
            groups=self.groups,
            original_length=self.original_length,
            original_num_visual=self.original_num_visual,
            meta=dict(self.meta if meta is None else meta),
        )

    def to(self, device) -> "TokenLayout":
        """The layout with its tensors on ``device`` (itself when they are there; the visual count is kept)."""
        if self.kind.device == torch.device(device):
            return self
        moved = self.with_rows(self.kind.to(device), self.group.to(device), self.cell.to(device),
                               self.original.to(device))
        if "num_visual" in self.__dict__:  # counted already: no second host read
            moved.__dict__["num_visual"] = self.__dict__["num_visual"]
        return moved

    def describe(self) -> str:
        n_text = self.length - self.num_visual
        return (
            f"TokenLayout(length={self.length}, visual={self.num_visual}/{self.original_num_visual}, "
            f"text={n_text}, groups={len(self.groups)})"
        )


# ---------------------------------------------------------------------------------------------------------
# What a method may check its fields against
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """What a method may check its fields against before any model work (filled by the model family)."""

    num_layers: int
    rope: str = ""  # the family's name of its RoPE kind, for messages only: methods decide on the capabilities
    hidden_size: int = 0
    family: str = ""
    reindex_positions: bool = False  # capability: contiguous re-indexing of the survivors' positions is defined
    side_inputs: bool = False  # the family adds per-row side inputs between layers (merged with a reduction's weights)


# ---------------------------------------------------------------------------------------------------------
# Visual inputs before the processor (methods that change the input resolution)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedGeometry:
    """A fixed square encoder input: every image becomes ``image_size`` px, ``(image_size / patch_size)²`` tokens
    (e.g. a CLIP tower at 336 px with 14 px patches: 24 × 24)."""

    image_size: int = 336
    patch_size: int = 14

    @property
    def side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class DynamicGeometry:
    """Dynamic resolution: images resized to multiples of ``patch_size · merge_size`` px within ``[min_pixels,
    max_pixels]`` (aspect kept), one LLM token per ``factor²`` px (e.g. 14 px patches merged 2 × 2); video frames
    grouped by ``temporal_patch_size``."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    temporal_patch_size: int = 2

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass
class VisualInputs:
    """One sample's visual inputs before the family's processor, for ``before_processor``.

    ``images``: PIL images in prompt order; ``video``: ``[n, 3, H, W]`` float frames (0-255) already sized by the
    family to its token grid (the processor does not resize them again), or None; ``geometry``: how the family's
    encoder turns pixels into LLM tokens (``FixedGeometry`` / ``DynamicGeometry``; None: the family defines none, so
    resolution methods refuse it); ``processor_kwargs``: extra keyword arguments of the processor call; ``stats``:
    numbers to report (e.g. ``native_visual_tokens``: the tokens the unchanged input would give).
    ``before_processor`` returns a new ``VisualInputs`` (or None: unchanged). While a method with this hook is applied,
    the engine calls the vision encoder with the family's ``resized_vision_kwargs`` (a fixed-geometry encoder then
    interpolates its position table; exact at the native size).
    """

    images: list
    video: torch.Tensor | None = None
    geometry: FixedGeometry | DynamicGeometry | None = None
    processor_kwargs: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# The reduction result
# ---------------------------------------------------------------------------------------------------------
POSITION_RULES = ("mean", "first")


@dataclass
class MergedRows:
    """``M`` new rows, each a weighted sum of rows of the current sequence (its *members*).

    Members, as ``E`` (member, merged row, weight) triples:
      * ``sources`` ``[E]`` int64: current row of each member;
      * ``into`` ``[E]`` int64: the merged row (0..M-1) it belongs to; every merged row has at least one member;
      * ``weights`` ``[E]`` float: its weight. Per-row side inputs (features a family adds between layers) are merged
        with exactly these weights: ``side[m] = Σ_e weights[e] · side[sources[e]]`` over ``into[e] == m``.
    Values: ``values`` ``[M, d]`` when the method computed the merged embeddings / hidden states itself (e.g. by
    value: a merge of pre-projector features pushed through a nonlinear projector); None: the engine computes
    ``Σ weights · rows``. The weights always define the members (layout entries) and the side inputs.
    Place: merged row m goes just before current row ``anchor[m]`` (``L``: at the end), after every kept row below
    it; merged rows with equal anchors keep their order here. ``anchor`` ``[M]`` int64.
    Positions (``positions``):
      * "mean": the rounded mean of the members' positions, each member counted once (``torch.round``: half to
        even), per rotary axis;
      * "first": the positions of the first (lowest) member row;
      * a ``[P, M]`` int64 tensor: given.
    Layout entries: kind, group and original row of the first member; cell: the members' common cell, -1 if they
    differ.
    """

    sources: torch.Tensor
    into: torch.Tensor
    weights: torch.Tensor
    anchor: torch.Tensor
    values: torch.Tensor | None = None
    positions: str | torch.Tensor = "mean"

    @property
    def count(self) -> int:
        return self.anchor.numel()

    def combine(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``Σ weights · x[sources]`` per merged row along ``dim`` (``x``: ``[..., L, ...]`` → ``[..., M, ...]``).
        Accumulates in float32 at least; returns ``x``'s dtype."""
        accumulate = torch.promote_types(x.dtype, torch.float32)
        members = x.index_select(dim, self.sources).to(accumulate)
        shape = [1] * x.dim()
        shape[dim] = -1
        members = members * self.weights.to(accumulate).view(shape)
        out_shape = list(x.shape)
        out_shape[dim] = self.count
        out = torch.zeros(out_shape, dtype=accumulate, device=x.device).index_add_(dim, self.into, members)
        return out.to(x.dtype)

    def first_member(self, length: int) -> torch.Tensor:
        """``[M]`` the lowest current row among each merged row's members."""
        first = torch.full((self.count,), length, dtype=torch.long, device=self.sources.device)
        return first.scatter_reduce(0, self.into, self.sources, reduce="amin")

    def merged_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions`` ``[P, L]`` → ``[P, M]`` by the stated rule."""
        if isinstance(self.positions, torch.Tensor):
            return self.positions.to(positions.device, positions.dtype)
        if self.positions == "first":
            return positions[:, self.first_member(positions.shape[1])]
        members = positions[:, self.sources].double()  # [P, E]
        total = torch.zeros(positions.shape[0], self.count, dtype=torch.float64, device=positions.device)
        total.index_add_(1, self.into, members)
        count = torch.bincount(self.into, minlength=self.count).double()  # [M]
        return torch.round(total / count).to(positions.dtype)

    def merged_layout_rows(self, layout: TokenLayout) -> dict[str, torch.Tensor]:
        """kind / group / cell / original of the merged rows (``[M]`` each)."""
        first = self.first_member(layout.length)
        member_cells = layout.cell[self.sources]
        lowest = torch.full((self.count,), layout.length, dtype=torch.long, device=first.device)
        highest = torch.full((self.count,), -2, dtype=torch.long, device=first.device)
        lowest = lowest.scatter_reduce(0, self.into, member_cells, reduce="amin")
        highest = highest.scatter_reduce(0, self.into, member_cells, reduce="amax")
        return {"kind": layout.kind[first], "group": layout.group[first],
                "cell": torch.where(lowest == highest, lowest, -1), "original": layout.original[first]}


@dataclass
class Reduction:
    """What ``before_llm`` and ``select`` return: which rows of the current sequence survive, and new merged rows.

    ``keep`` ``[K]``: ascending rows that survive unchanged (values, positions, layout entries).
    ``merged``: optional ``MergedRows`` (their values, positions, layout entries and side inputs by its rules).
    The new sequence holds the kept rows in order with the merged rows inserted at their anchors.
    ``prune_cache_before`` (``select`` only): also drop the pruned rows from the KV caches of all earlier layers
    (not with merged rows: an earlier layer has no keys for them).
    ``reindex_positions``: number the new sequence's positions contiguously from here on (where the model family
    defines it: ``ModelInfo.reindex_positions``).
    ``sequence_positions``: ``[P, L']`` int64, the positions of every row of the new sequence, given (they replace
    the kept rows' own and the merged rows' rule; e.g. pooled grids numbered as a native image of the pooled size,
    with the text after them shifted); decoding continues after their maximum, from this layer on.
    ``meta``: layout annotations to set on the new layout (e.g. PruneVid's stage-1 parts).
    """

    keep: torch.Tensor
    merged: MergedRows | None = None
    prune_cache_before: bool = False
    reindex_positions: bool = False
    meta: dict | None = None
    sequence_positions: torch.Tensor | None = None

    @property
    def indices(self) -> torch.Tensor:
        """The kept rows (the name of the first engine's ``Selection``)."""
        return self.keep

    def new_length(self) -> int:
        return self.keep.numel() + (self.merged.count if self.merged is not None else 0)

    def keeps_everything(self, length: int) -> bool:
        """True when the new sequence is the current one (no host read: counts are known on the host)."""
        return (self.merged is None and self.keep.numel() == length and not self.reindex_positions and not self.meta
                and self.sequence_positions is None)

    # ------------------------------------------------------------------ applying it (one sample)
    def order(self, length: int) -> torch.Tensor | None:
        """``[K + M]``: the new sequence's entry i is kept row ``keep[order[i]]`` if ``order[i] < K``, else merged
        row ``order[i] - K``. None without merged rows (kept rows in order)."""
        if self.merged is None:
            return None
        cached = self.__dict__.get("_order")  # computed once per reduction (every per-row tensor uses it)
        if cached is None or cached[0] != length:
            # kept row r sorts at 2r + 1, a merged row anchored at a at 2a: before row a, after rows below it
            keys = torch.cat([2 * self.keep + 1, 2 * self.merged.anchor.clamp(max=length)])
            cached = self.__dict__["_order"] = (length, torch.argsort(keys, stable=True))
        return cached[1]

    def rows(self, x: torch.Tensor, dim: int, values: torch.Tensor | None = None) -> torch.Tensor:
        """The new sequence's rows of a per-row tensor ``x`` ``[..., L, ...]`` (rows along ``dim``).

        Merged rows: ``values`` (already in ``x``'s layout) if given, else ``Σ weights · x[sources]``."""
        kept = x.index_select(dim, self.keep)
        if self.merged is None:
            return kept
        merged = self.merged.combine(x, dim) if values is None else values.to(x.dtype)
        return torch.cat([kept, merged], dim).index_select(dim, self.order(x.shape[dim]))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings / hidden states ``[L, d]`` → ``[L', d]`` (merged rows: the method's values if it gave them)."""
        return self.rows(x, 0, None if self.merged is None else self.merged.values)

    def positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotary positions ``[P, L]`` → ``[P, L']`` (merged rows by ``MergedRows.positions``; all rows given by
        ``sequence_positions`` when set)."""
        if self.sequence_positions is not None:
            return self.sequence_positions.to(positions.device, positions.dtype)
        if self.merged is None:
            return positions[:, self.keep]
        return self.rows(positions, 1, self.merged.merged_positions(positions))

    def layout(self, layout: TokenLayout) -> TokenLayout:
        """The new sequence's layout."""
        meta = dict(layout.meta)
        meta.update(self.meta or {})
        if self.merged is None:
            new = layout.gather(self.keep)
            return new.with_rows(new.kind, new.group, new.cell, new.original, meta=meta) if self.meta else new
        merged = self.merged.merged_layout_rows(layout)
        fields = {name: self.rows(getattr(layout, name), 0, merged[name]) for name in merged}
        return layout.with_rows(fields["kind"], fields["group"], fields["cell"], fields["original"], meta=meta)

    def check(self, length: int, who: str, where: str) -> None:
        """Refuse a malformed reduction of a ``length``-row sequence (one host read for all checks)."""
        rows = self.keep
        if rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{who} must return 1-D integer rows to keep, got {tuple(rows.shape)} {rows.dtype}")
        checks = []
        if rows.numel():
            checks += [(rows.min() >= 0) & (rows.max() < length), (rows[1:] > rows[:-1]).all()]
        given = self.sequence_positions
        if given is not None and (given.dim() != 2 or given.dtype != torch.int64 or given.shape[1] != self.new_length()):
            raise ValueError(f"{who} {where}: sequence_positions must be [P, {self.new_length()}] int64 (one column per "
                             f"row of the new sequence), got {tuple(given.shape)} {given.dtype}")
        merged = self.merged
        if merged is not None:
            if self.prune_cache_before:
                raise ValueError(f"{who} {where}: prune_cache_before cannot be combined with merged rows (an "
                                 "earlier layer's cache has no keys for them)")
            for name in ("sources", "into", "anchor"):
                tensor = getattr(merged, name)
                if tensor.dim() != 1 or tensor.dtype != torch.int64:
                    raise ValueError(f"{who} {where}: MergedRows.{name} must be 1-D int64, got "
                                     f"{tuple(tensor.shape)} {tensor.dtype}")
            if not (merged.sources.numel() == merged.into.numel() == merged.weights.numel()):
                raise ValueError(f"{who} {where}: MergedRows.sources, into and weights must have equal lengths")
            if isinstance(merged.positions, str) and merged.positions not in POSITION_RULES:
                raise ValueError(f"{who} {where}: MergedRows.positions must be one of {list(POSITION_RULES)} or a "
                                 f"[P, M] tensor, got {merged.positions!r}")
            if merged.count:
                members = torch.bincount(merged.into.clamp(0, merged.count - 1), minlength=merged.count)
                checks += [(merged.sources.min() >= 0) & (merged.sources.max() < length),
                           (merged.into.min() >= 0) & (merged.into.max() < merged.count),
                           (merged.anchor.min() >= 0) & (merged.anchor.max() <= length),
                           (members > 0).all(), torch.isfinite(merged.weights).all()]
        if not checks:
            return
        ok = torch.stack(checks).tolist()
        messages = ["returned rows outside [0, {n})", "must return strictly ascending rows to keep",
                    "MergedRows.sources outside [0, {n})", "MergedRows.into outside [0, M)",
                    "MergedRows.anchor outside [0, {n}]", "a merged row has no member", "MergedRows.weights not finite"]
        if not rows.numel():
            messages = messages[2:]
        for passed, message in zip(ok, messages):
            if not passed:
                raise ValueError(f"{who} {where}: {message.format(n=length)}")


Selection = Reduction  # the first engine's name of the result of ``select``


# ---------------------------------------------------------------------------------------------------------
# Layer plans
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LayerPlan:
    """Per-layer compute for the skipping rows (rows of ``skip_kinds``; by default every visual row).

    Default (tokenprune's layer skip): only the skipping rows skip, text rows run the full layer, keys and values
    of every row are cached, and decoding is unchanged. Two switches give the seed's decoder (layer skip with
    ``semantics: seed``):

    * ``attn_all_rows``: a skipped attention is skipped for **every** row (no input norm, no projections, no
      KV-cache entry for this layer), in the prefill and in every decoding step: ``u = h``;
    * ``mlp_scales_text``: a skipped MLP gives every row ``mlp_scale * u`` plus, on the other rows,
      ``MLP(LN2(u))`` (text residuals are scaled too), in the prefill only; decoding runs the full layer.
    """

    skip_attn: bool = False
    skip_mlp: bool = False
    mlp_scale: float = 1.0  # skipping rows: h <- mlp_scale * u when the MLP is skipped
    attn_scale: float = 1.0  # skipping rows: u <- attn_scale * h when the attention is skipped
    attn_all_rows: bool = False  # the attention skip holds for every row, prefill and decode (no KV entries)
    mlp_scales_text: bool = False  # the MLP skip scales the other rows' residual too (prefill)
    skip_kinds: tuple[int, ...] = (IMAGE, VIDEO)  # layout kinds whose rows skip (the seed: IMAGE only)

    def __post_init__(self):
        if self.attn_all_rows and self.attn_scale != 1.0:
            raise ValueError("LayerPlan: an attention skip for every row has no scalar (attn_scale must be 1.0)")

    @property
    def is_identity(self) -> bool:
        return not (self.skip_attn or self.skip_mlp)

    def skipping(self, layout: TokenLayout) -> torch.Tensor:
        """``[L]`` bool: the rows of ``layout`` that skip under this plan."""
        kinds = torch.tensor(self.skip_kinds, dtype=layout.kind.dtype, device=layout.kind.device)
        return torch.isin(layout.kind, kinds)


# ---------------------------------------------------------------------------------------------------------
# Vision-encoder signals (pre-LLM methods)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupSource:
    """Where an encoder group came from: the ``call``-th vision-encoder call of the prefill, its ``item``-th image /
    grid, ``frame``-th temporal step (0 for images)."""

    call: int
    item: int
    frame: int


@dataclass
class GroupSignals:
    """What the vision encoder computed for one visual group of ``n`` LLM tokens, in the group's cell order.

    ``scores`` ``[n]`` float32: attention each token gets inside the encoder (the CLS row at the feature layer on
    encoders with a CLS token; attention received, summed over the group's query rows, on encoders without one);
    ``keys`` ``[n, head_dim]`` float32: that layer's keys averaged over heads; on encoders that emit pre-projector
    features: ``features`` ``[n, D]`` (the projector's input), ``cls_feature`` ``[D]``, ``cls_key`` ``[head_dim]``.
    The family file states exactly which layer and reduction (``models/vision_signals.py``).
    """

    source: GroupSource
    scores: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor | None = None
    cls_feature: torch.Tensor | None = None
    cls_key: torch.Tensor | None = None


class VisionSignals:
    """Lazy vision-encoder signals of one sample, one ``GroupSignals`` per visual group of its layout.

    Nothing is computed until a method asks (``group``); then the family's computation runs once for the whole
    prefill, from the encoder layer's own projections (never eager attention maps). ``has_cls``: the encoder emits
    a CLS token (its feature and key are in ``GroupSignals``). ``project(features)``: the family's projector
    (pre-projector features ``[..., D]`` → LLM embeddings ``[..., d]``), ``post_norm(features)``: the encoder's
    final norm; both raise ValueError where the family has none.
    """

    def __init__(self, groups: Callable[[], list[GroupSignals]], has_cls: bool,
                 project: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 post_norm: Callable[[torch.Tensor], torch.Tensor] | None = None, family: str = ""):
        self._groups = groups
        self.has_cls = has_cls
        self._project = project
        self._post_norm = post_norm
        self.family = family

    def group(self, index: int) -> GroupSignals:
        """The signals of ``layout.groups[index]`` (its ``size`` tokens in cell order)."""
        return self._groups()[index]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        if self._project is None:
            raise ValueError(f"the {self.family} family has no projector of pre-projector features")
        return self._project(features)

    def post_norm(self, features: torch.Tensor) -> torch.Tensor:
        if self._post_norm is None:
            raise ValueError(f"the {self.family} family exposes no final encoder norm")
        return self._post_norm(features)


# ---------------------------------------------------------------------------------------------------------
# What hooks see
# ---------------------------------------------------------------------------------------------------------
@dataclass
class DecoderInput:
    """The whole sequence entering the first decoder layer (text and visual rows), for ``before_llm``; one sample.

    ``embeds``: ``[1, L, d]``; ``positions``: ``[1, P, L]`` rotary positions (P = 1 for 1-D RoPE, 3 for 3-D
    rotary positions); ``layout``: the sample's TokenLayout; ``side``: per-row side inputs ``{layer: [1, L, d]}`` that the
    engine adds to the input of ``layer`` (zero rows where a row has none; read-only, the engine merges them with
    a reduction's weights); ``stats``: numbers the method reports (segments, ...); ``model``: the model's
    ``ModelInfo`` (capabilities such as ``reindex_positions``); ``vision``: the vision encoder's signals for this
    sample (``VisionSignals``), only for a method whose ``needs_vision_signals`` is true (else None);
    ``question``: the sample's question text when the caller gave it (``apply(..., questions=[...])``), else None.
    ``before_llm`` returns a ``Reduction`` of this sequence (or None: unchanged).
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    layout: TokenLayout
    stats: dict = field(default_factory=dict)
    side: dict = field(default_factory=dict)
    model: ModelInfo | None = None
    vision: VisionSignals | None = None
    question: str | None = None

    def reduced(self, reduction: "Reduction | None") -> "DecoderInput":
        """This sequence after ``reduction`` (what the engine hands the decoder; for inspection and tests)."""
        if reduction is None:
            return self
        side = {layer: reduction.rows(values[0], 0)[None] for layer, values in self.side.items()}
        return DecoderInput(reduction.hidden(self.embeds[0])[None], reduction.positions(self.positions[0])[None],
                            reduction.layout(self.layout), stats=self.stats, side=side, model=self.model,
                            vision=self.vision, question=self.question)


VisualSequence = DecoderInput  # the first engine's name (it always held the text rows too)


class PrefillStep:
    """What ``select`` sees at the input of one decoder layer during a prefill, for one sample.

    ``hidden``: ``[1, L, d]`` the hidden states entering ``layer`` (side inputs of that layer already added);
    ``positions``: ``[1, P, L]``; ``layout``: the current TokenLayout. ``attention(...)`` computes attention
    probabilities lazily from a layer's own projections (the family's attention math), for the needed query rows
    only. ``model``: the model's ``ModelInfo``. Also lazily, for methods that need them: ``keys(layer)`` (a layer's
    post-RoPE keys), ``final_norm(x)`` (the text model's final norm) and ``decoder_input`` (the sequence that entered
    the first decoder layer). Decoding steps never call ``select``.
    """

    def __init__(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor, layout: TokenLayout,
                 scorer: Callable[..., torch.Tensor], stats: dict, model: ModelInfo | None = None, *,
                 keys: Callable[[int], torch.Tensor] | None = None,
                 final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 decoder_input: Callable[[], DecoderInput] | None = None):
        self.layer = layer
        self.hidden = hidden
        self.positions = positions
        self.layout = layout
        self._scorer = scorer
        self.stats = stats
        self.model = model
        self._keys = keys
        self._final_norm = final_norm
        self._decoder_input = decoder_input

    def keys(self, layer: int | None = None) -> torch.Tensor:
        """``[H_kv, L, d_h]`` post-RoPE keys of every current row in ``layer`` (``self.layer - 1`` or ``self.layer``),
        KV heads not repeated: read from that layer's KV cache when it holds exactly these rows, else recomputed from
        its own input norm and key projection (the family's attention math)."""
        if self._keys is None:
            raise ValueError("this PrefillStep has no keys (built outside the engine)")
        return self._keys(self.layer if layer is None else layer)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The text model's final norm (the one before the LM head, with its weight) applied to ``x`` ``[..., d]``."""
        if self._final_norm is None:
            raise ValueError("this PrefillStep has no final norm (built outside the engine)")
        return self._final_norm(x)

    @property
    def decoder_input(self) -> DecoderInput:
        """The sequence that entered the first decoder layer in this prefill (after ``before_llm`` reductions):
        embeddings ``[1, L0, d]``, positions and layout (e.g. SparseVLM's raters read the input embeddings)."""
        if self._decoder_input is None:
            raise ValueError("this PrefillStep has no decoder input (built outside the engine)")
        return self._decoder_input()

    def attention(self, layer: int | None = None, queries: str | torch.Tensor = "last",
                  keys: str | torch.Tensor = "visual", rope: bool = True, causal: bool = True, heads: str = "mean",
                  reduce: str | None = None) -> torch.Tensor:
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

    def keep_visual(self, visual_rows: torch.Tensor, **kwargs) -> Reduction:
        """Reduction keeping every non-visual row plus ``visual_rows`` (current row indices)."""
        keep = torch.zeros(self.layout.length, dtype=torch.bool, device=self.layout.kind.device)
        keep[~self.layout.is_visual] = True
        keep[visual_rows] = True
        return Reduction(keep.nonzero().flatten(), **kwargs)


LayerStep = PrefillStep  # the first engine's name
