"""Pooling baseline: average-pool each image's (or temporal group's) grid of visual tokens before the decoder.

Card: ``shared/methods/downsample.md`` (b). No official code defines it; it follows LLaVA-OneVision's video
pooling (after the projector, rows replaced in place, raster order) and UniPruneBench's Pool_PreLLM.

**Windows**, per axis of a ``(t, h, w)`` grid (separable):

* ``stride`` s (default 2): output ``ceil(n / s)``; window i covers ``[i·s, min((i+1)·s, n))``, so a grid not
  divisible by s ends with a smaller window that averages only its in-range cells (= ``avg_pool2d`` with
  ``ceil_mode=True``): 24² → 12² (s = 2), 8² (3), 6² (4); 5² → 3² (s = 2).
* ``budget`` (status/budget.md): fraction f = ``budget_fraction(N, budget)`` for every grid; output
  ``max(1, round(n·sqrt(f)))`` per spatial axis with PyTorch's adaptive bins ``[floor(i·n/n'), ceil((i+1)·n/n'))``
  (windows may overlap). Grid granularity: the count is close to, not exactly, the budget; it is reported.
* ``t_stride`` (default 1): temporal windows over a video's temporal groups, as ``stride``.

**Modes:** ``avg`` (default), ``max`` (per channel over the window), ``bilinear`` (LLaVA-OV's own
``interpolate(..., mode="bilinear", align_corners=False)`` to the output size; spatial only).

**Positions** (``positions``; no official code defines them): ``auto`` (default) = contiguous re-numbering where the
family defines it (1-D RoPE: what LLaVA-OneVision's pooled rows get in place), original positions elsewhere (mRoPE:
the issue's rule for merged rows). ``keep``: each pooled row at the rounded (half to even) weighted mean of its
window's positions (avg: window mean; bilinear: interpolation weights; max: window mean), text unchanged (PruneVid's
convention). ``reindex``: contiguous (1-D RoPE only). ``grid``: what a native image of the pooled grid would get:
1-D RoPE renumbers the sequence contiguously; mRoPE gives the pooled cell (i, j) of a source starting at ``st`` the
positions ``(t, st + i, st + j)`` (``t``: the window's first temporal group's) and shifts every later row so text
resumes at ``st + max(h', w')``, as transformers 5.25's ``get_rope_index`` on the pooled ``grid_thw`` (the temporal
extent does not count there; tested against it); decoding continues after the new maximum. A video whose frames
the family writes as separate runs (Qwen3-VL: a timestamp before each) is positioned run by run, as its own
rope index does (t_stride > 1 with ``grid`` is refused there: a window would span runs).

Engine wiring (``before_llm``): per image / video (its temporal groups in order, a ``(t, h, w)`` grid), the pooled
rows are merged rows (members and weights from the windows; values ``pooling.apply``), placed where the window's
first temporal group began, in raster order; a budget gives one fraction of the sample's visual tokens to every
grid. ``max`` is not a weighted sum: its values are exact, but side inputs (Qwen3-VL's DeepStack features) would be
merged with the window means, so ``max`` is refused on families with side inputs. Pooled rows keep the first
member's group; their cell is -1 (the group's grid is not re-described).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._budget import budget_fraction, check_budget
from .base import DecoderInput, MergedRows, Method, ModelInfo, Reduction, check_choice, register, resolve_positions

MODES = ("avg", "max", "bilinear")
POSITIONS = ("auto", "keep", "reindex", "grid")
OFFICIAL_POSITIONS = "reindex"  # no official code: ``auto`` re-numbers where the family defines it


# ----------------------------------------------------------------------------------------------------------
# Windows along one axis
# ----------------------------------------------------------------------------------------------------------
def stride_windows(size: int, stride: int) -> list[tuple[int, int]]:
    """``[start, end)`` per output index: ``ceil(size / stride)`` windows of ``stride`` cells, the last truncated."""
    return [(start, min(start + stride, size)) for start in range(0, size, stride)]


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling bins: ``[floor(i·size/out), ceil((i+1)·size/out))`` for i < out."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def window_weights(size: int, windows: list[tuple[int, int]]) -> torch.Tensor:
    """``[out, size]`` float64 averaging matrix: ``1 / len`` on each window's cells."""
    weights = torch.zeros(len(windows), size, dtype=torch.float64)
    for i, (start, end) in enumerate(windows):
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def linear_weights(size: int, out: int) -> torch.Tensor:
    """``[out, size]`` float64 weights of 1-D linear interpolation to ``out`` cells (``align_corners=False``)."""
    eye = torch.eye(size, dtype=torch.float64)[:, None, :]  # [size, 1, size]: one basis vector per row
    return F.interpolate(eye, size=out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


def scaled_side(size: int, fraction: float) -> int:
    """Output cells along an axis for a token fraction: ``max(1, round(size·sqrt(fraction)))``."""
    return max(1, min(size, round(size * math.sqrt(fraction))))


# ----------------------------------------------------------------------------------------------------------
# One grid
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GridPooling:
    """How one ``(t, h, w)`` grid pools: windows per axis (or bilinear output sizes) and the mode."""

    shape: tuple[int, int, int]
    windows: tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]
    mode: str = "avg"

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return tuple(len(w) for w in self.windows)

    @property
    def num_out(self) -> int:
        t, h, w = self.out_shape
        return t * h * w

    def axis_weights(self) -> list[torch.Tensor]:
        """Per axis ``[out, size]`` float64: averaging windows, or linear interpolation (bilinear, h and w)."""
        weights = [window_weights(self.shape[0], self.windows[0])]
        for axis in (1, 2):
            if self.mode == "bilinear":
                weights.append(linear_weights(self.shape[axis], len(self.windows[axis])))
            else:
                weights.append(window_weights(self.shape[axis], self.windows[axis]))
        return weights

    def weights(self) -> torch.Tensor:
        """``[n_out, n]`` float64: pooled row = weights @ rows (avg, bilinear); for max, the window means."""
        out, member, weight = self.entries()
        dense = torch.zeros(self.num_out, self.shape[0] * self.shape[1] * self.shape[2], dtype=torch.float64)
        dense[out, member] = weight
        return dense

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The non-zero entries of ``weights()`` without building it (``[E]`` each: output row, member cell in raster
        order, float64 weight = the product of the per-axis weights), output-major then member order."""
        t_out, h_out, w_out = self.out_shape
        _, h, w = self.shape
        (ot, mt), (oh, mh), (ow, mw) = (weight.nonzero(as_tuple=True) for weight in self.axis_weights())
        wt, wh, ww = (weight[o, m] for weight, o, m in zip(self.axis_weights(), (ot, oh, ow), (mt, mh, mw)))
        out = ((ot[:, None, None] * h_out + oh[None, :, None]) * w_out + ow[None, None, :]).flatten()
        member = ((mt[:, None, None] * h + mh[None, :, None]) * w + mw[None, None, :]).flatten()
        weight = (wt[:, None, None] * wh[None, :, None] * ww[None, None, :]).flatten()
        order = torch.argsort(out * (h * w * self.shape[0]) + member)
        return out[order], member[order], weight[order]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``x`` ``[t·h·w, *F]`` (raster rows of the grid) → ``[t'·h'·w', *F]`` in x's dtype.

        avg / bilinear in float32 (separable weights); max exactly, per channel.
        """
        t, h, w = self.shape
        grid = x.reshape(t, h, w, -1)  # [t, h, w, F]
        if self.mode == "max":
            for axis, windows in enumerate(self.windows):
                grid = torch.stack([grid.narrow(axis, start, end - start).amax(axis) for start, end in windows], axis)
            return grid.reshape(-1, *x.shape[1:])
        wt, wh, ww = (weight.float() for weight in self.axis_weights())
        pooled = torch.einsum("at,bh,cw,thwf->abcf", wt, wh, ww, grid.float())  # [t', h', w', F]
        return pooled.to(x.dtype).reshape(-1, *x.shape[1:])


def plan_grid(shape: tuple[int, int, int], mode: str = "avg", stride: int | None = 2, t_stride: int = 1,
              fraction: float | None = None, out: tuple[int, int] | None = None) -> GridPooling:
    """Windows for one grid ``(t, h, w)``: spatially ``stride`` windows, or adaptive bins to ``out`` = (h', w')
    or to the scaled sides of a token ``fraction``; ``t_stride`` windows in time. ``bilinear`` interpolates to
    the same output size (``ceil(n / stride)`` or h', w')."""
    t, h, w = shape
    if fraction is not None:
        out = (scaled_side(h, fraction), scaled_side(w, fraction))
    if out is not None:
        spatial = [adaptive_windows(n, o) for n, o in zip((h, w), out)]
    else:
        spatial = [stride_windows(n, stride) for n in (h, w)]
    return GridPooling(shape, (stride_windows(t, t_stride), *spatial), mode)


# ----------------------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------------------
def mean_positions(positions: torch.Tensor, pooling: GridPooling) -> torch.Tensor:
    """``[P, n_out]``: rounded (half to even) weighted mean of each window's positions ``[P, n]``."""
    out, member, weight = pooling.entries()  # rows of the window weights sum to 1
    means = torch.zeros(positions.shape[0], pooling.num_out, dtype=torch.float64, device=positions.device)
    means.index_add_(1, out.to(positions.device), positions[:, member].double() * weight.to(positions.device))
    return torch.round(means).to(positions.dtype)


def grid_positions(positions: torch.Tensor, sources: list[tuple[int, int, GridPooling]]) -> torch.Tensor:
    """Positions ``[P, L']`` of the sequence in which each source's rows are replaced by its pooled rows.

    positions ``[P, L]`` (P = 1: 1-D RoPE, 3: mRoPE) of the unpooled sequence; sources: ``(first_row, end_row,
    pooling)`` per image / video in row order, each covering its rows ``[first_row, end_row)`` in raster order
    (a video: its temporal groups one after another). 1-D: ``positions[0, 0] + arange(L')``. mRoPE: module doc.
    """
    num_axes, length = positions.shape
    new_length = length - sum(end - first - pool.num_out for first, end, pool in sources)
    if num_axes == 1:
        return positions[:, :1] + torch.arange(new_length, device=positions.device)[None]
    pieces, cursor, shift = [], 0, 0
    for first, end, pool in sources:
        t, h, w = pool.shape
        if end - first != t * h * w:
            raise ValueError(f"pool: a source of {end - first} rows does not match its grid {pool.shape}")
        pieces.append(positions[:, cursor:first] - shift)
        start = int(positions[1, first]) - shift  # h (= w) axis of cell (0, 0): the source's start
        t_out, h_out, w_out = pool.out_shape
        first_group = torch.tensor([s for s, _ in pool.windows[0]], device=positions.device)  # [t']
        t_axis = positions[0, first + first_group * h * w] - shift  # [t']
        grid = torch.stack(torch.meshgrid(torch.arange(t_out), torch.arange(h_out), torch.arange(w_out),
                                          indexing="ij")).reshape(3, -1).to(positions.device)  # [3, n_out]
        block = torch.stack([t_axis[grid[0]], start + grid[1], start + grid[2]])  # [3, n_out]
        pieces.append(block.to(positions.dtype))
        shift += max(h, w) - max(h_out, w_out)  # text resumes at start + max(h, w) (transformers 5.25)
        cursor = end
    pieces.append(positions[:, cursor:] - shift)
    return torch.cat(pieces, dim=1)


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------
@register("pool")
@dataclass
class Pool(Method):
    """Pool every image / temporal-group grid; see the module docstring. Default: 2×2 average, positions auto."""

    budget: int | float | None = None  # tokenprune: token fraction per grid (status/budget.md); unsets stride
    stride: int | None = None  # spatial window (None: 2 unless budget is set)
    t_stride: int = 1  # temporal window over a video's temporal groups
    mode: str = "avg"  # avg | max | bilinear
    positions: str = "auto"  # auto (1-D RoPE: contiguous; mRoPE: keep) | keep (window means) | reindex | grid

    DEFAULT_STRIDE = 2

    def __post_init__(self):
        check_budget(self.name, self.budget)
        for field_name in ("stride", "t_stride"):
            value = getattr(self, field_name)
            if value is None and field_name == "stride":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}.{field_name} must be an integer >= 1, got {value!r}")
        if self.budget is not None and self.stride is not None:
            raise ValueError(f"{self.name}: set at most one of budget, stride (got both)")
        check_choice(self.name, "mode", self.mode, MODES)
        check_choice(self.name, "positions", self.positions, POSITIONS)
        if self.mode == "bilinear" and self.t_stride != 1:
            raise ValueError(f"{self.name}.t_stride must be 1 with mode='bilinear' (spatial interpolation only), "
                             f"got {self.t_stride}")

    def validate(self, model: ModelInfo) -> None:
        self.position_rule(model)
        if self.mode == "max" and model.side_inputs:
            raise ValueError(f"{self.name}.mode='max' is not a weighted sum: the {model.family} family's per-row side "
                             "inputs (e.g. DeepStack features) cannot follow it; use mode='avg' or 'bilinear'")

    def position_rule(self, model: ModelInfo) -> str:
        """``keep``, ``reindex`` or ``grid`` on ``model`` (refuses ``reindex`` where it is not defined)."""
        if self.positions == "grid":
            return "grid"
        return resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, model)

    def runs(self, groups: list[int], group_rows: list[torch.Tensor], pooling: GridPooling,
             model: ModelInfo | None) -> list[tuple[int, int, GridPooling]]:
        """``(first_row, end_row, pooling)`` per contiguous run of one source's rows (``grid_positions``' input).

        A source is one run, except a video whose temporal groups the family writes as separate runs (Qwen3-VL: a
        timestamp between frames), where each run of groups is pooled (and positioned) as a grid of its own; with
        ``t_stride`` > 1 a window would span runs, which no native input of the pooled grid describes.
        """
        starts = [0] + [i for i in range(1, len(groups)) if int(group_rows[i][0]) != int(group_rows[i - 1][-1]) + 1]
        if len(starts) == 1:
            return [(int(group_rows[0][0]), int(group_rows[-1][-1]) + 1, pooling)]
        if self.t_stride != 1:
            family = model.family if model is not None else "this"
            raise ValueError(f"{self.name}.positions='grid' with t_stride={self.t_stride} is not defined for the "
                             f"{family} family: its video frames are separate runs (timestamps between them), so a "
                             "temporal window spans runs; use t_stride=1 or positions='keep'")
        _, h, w = pooling.shape
        out = []
        for start, end in zip(starts, starts[1:] + [len(groups)]):
            run = GridPooling((end - start, h, w), ([(i, i + 1) for i in range(end - start)], *pooling.windows[1:]),
                              pooling.mode)
            out.append((int(group_rows[start][0]), int(group_rows[end - 1][-1]) + 1, run))
        return out

    def plan(self, shape: tuple[int, int, int], fraction: float | None = None) -> GridPooling:
        """The pooling of one grid; ``fraction``: ``budget_fraction(N, budget)`` of the sample (budget only)."""
        if self.budget is not None:
            if fraction is None:
                raise ValueError("pool.plan: a budget needs the sample's token fraction")
            return plan_grid(shape, self.mode, None, self.t_stride, fraction)
        return plan_grid(shape, self.mode, self.stride or self.DEFAULT_STRIDE, self.t_stride)

    # -- hook ------------------------------------------------------------------------------------------------
    def before_llm(self, seq: DecoderInput) -> Reduction | None:
        layout = seq.layout
        if self.mode == "max" and seq.side:
            raise ValueError(f"{self.name}.mode='max' cannot merge this model's per-row side inputs (weights are "
                             "window means); use mode='avg' or 'bilinear'")
        fraction = budget_fraction(layout.num_visual, self.budget) if self.budget is not None else None
        embeds, positions = seq.embeds[0], seq.positions[0]  # [L, d], [P, L]
        device = embeds.device
        sources, into, weights, anchor, values, means, grids = [], [], [], [], [], [], []
        rule = self.position_rule(seq.model)
        count, num_in = 0, 0
        for groups in source_groups(layout):
            group_rows = [layout.group_rows(g) for g in groups]  # each [h * w], raster order
            rows = torch.cat(group_rows)
            first = layout.groups[groups[0]]
            pooling = self.plan((len(groups), first.rows, first.cols), fraction)
            out, member, weight = (x.to(device) for x in pooling.entries())  # [E] each, never [n_out, n]
            sources.append(rows[member])
            into.append(out + count)
            weights.append(weight.float())
            starts = torch.stack([group_rows[start][0] for start, _ in pooling.windows[0]])  # [t'] first rows
            anchor.append(starts.repeat_interleave(pooling.num_out // len(starts)))
            values.append(pooling.apply(embeds[rows]))
            means.append(mean_positions(positions[:, rows], pooling))
            if rule == "grid":
                grids += self.runs(groups, group_rows, pooling, seq.model)
            num_in += pooling.shape[0] * pooling.shape[1] * pooling.shape[2]
            count += pooling.num_out
        if count == num_in:
            return None  # every window is one cell: nothing changes
        merged = MergedRows(sources=torch.cat(sources), into=torch.cat(into), weights=torch.cat(weights),
                            anchor=torch.cat(anchor), values=torch.cat(values), positions=torch.cat(means, dim=1))
        reduction = Reduction(layout.text_rows(), merged=merged)
        if rule == "reindex":
            reduction.reindex_positions = True
        elif rule == "grid":
            reduction.sequence_positions = grid_positions(positions, grids)
        return reduction


def source_groups(layout) -> list[list[int]]:
    """Group indices of each image / video, in prompt order (a video's temporal groups consecutively)."""
    sources: dict[tuple[int, int], list[int]] = {}
    for index, group in enumerate(layout.groups):
        sources.setdefault((group.kind, group.source), []).append(index)
    return sorted(sources.values(), key=lambda groups: groups[0])
