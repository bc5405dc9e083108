"""What the pre-LLM reduction methods of issue 18 share (VisionZip, VisPruner, DivPrune, CDPruner, ...): per-group
rows and counts under the ``budget`` convention (``_budget.py``), the reduction that keeps chosen visual rows, and
row normalisation for cosine similarities.
"""

from __future__ import annotations

import torch

from ..engine.contract import DecoderInput, MergedRows, Reduction, TokenLayout
from ._budget import budget_count, split_budget


def unit_rows(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows of ``x`` (in ``dtype``, default its own) over their L2 norm; a zero row stays zero instead of NaN."""
    x = x if dtype is None else x.to(dtype)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def sample_count(budget: int | float, layout: TokenLayout, rounding: str = "round") -> int:
    """Visual tokens a per-sample ``budget`` keeps: of the sample's original visual tokens, at most the current."""
    return min(budget_count(layout.original_num_visual, budget, rounding), layout.num_visual)


def group_rows(layout: TokenLayout) -> list[torch.Tensor]:
    """The current rows of every visual group (``layout.groups`` order), ascending."""
    return [layout.group_rows(g) for g in range(len(layout.groups))]


def group_shares(budget: int | float, layout: TokenLayout, rows: list[torch.Tensor], rounding: str = "round") -> list[int]:
    """The sample's count (``sample_count``) split over the groups in proportion to their current sizes
    (``split_budget``: largest remainder, ties to the earlier group)."""
    return split_budget(sample_count(budget, layout, rounding), [r.numel() for r in rows])


def complete_group_rows(layout: TokenLayout, method: str) -> list[torch.Tensor]:
    """Every group's rows, refused unless each group is whole and in cell order (vision-encoder signals are per
    original group: a method reading them must run before any other reduction of the visual rows)."""
    rows = group_rows(layout)
    for g, (group, current) in enumerate(zip(layout.groups, rows)):
        cells = layout.cell[current]
        if current.numel() != group.size or not bool((cells == torch.arange(group.size, device=cells.device)).all()):
            raise ValueError(f"{method} reads the vision encoder's signals of whole visual groups, but group {g} has "
                             f"{current.numel()} of its {group.size} tokens: run {method} before any other reduction")
    return rows


def keep_visual_rows(seq: DecoderInput, kept: list[torch.Tensor], reindex: bool,
                     merged: MergedRows | None = None) -> Reduction | None:
    """The reduction keeping every non-visual row plus the visual rows ``kept`` (any order, one tensor per pool),
    optionally with merged rows; None when it changes nothing."""
    layout = seq.layout
    keep = torch.zeros(layout.length, dtype=torch.bool, device=layout.kind.device)
    keep[~layout.is_visual] = True
    for rows in kept:
        keep[rows] = True
    rows = keep.nonzero().flatten()
    if merged is None and rows.numel() == layout.length:
        return None
    return Reduction(rows, merged=merged, reindex_positions=reindex)
