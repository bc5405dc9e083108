"""Spatially uniform grid subsampling of each image / frame: the strong pooling-style baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import PrefillStep, ModelInfo, check_layer, check_ratio, keep_count, register
from .scored import ScoredMethod


def uniform_cells(rows: int, cols: int, k: int) -> list[int]:
    """``k`` raster indices spread evenly over a ``rows x cols`` grid.

    Picks ``r`` evenly spaced grid rows (r chosen so that the kept points form a near-square lattice) and,
    in the i-th picked row, ``c_i`` evenly spaced columns with ``sum c_i == k`` exactly. A 24 x 24 grid at
    k = 144 gives every second row and column; k = rows * cols gives every cell.
    """
    total = rows * cols
    if k >= total:
        return list(range(total))
    if k <= 0:
        return []
    picked_rows = min(rows, max(1, round(math.sqrt(k * rows / cols)), math.ceil(k / cols)))
    cells = []
    for i in range(picked_rows):
        row = int((i + 0.5) * rows / picked_rows)
        count = (i + 1) * k // picked_rows - i * k // picked_rows
        cells.extend(row * cols + int((j + 0.5) * cols / count) for j in range(count))
    return cells


@register("uniform")
@dataclass
class UniformPrune(ScoredMethod):
    """Keep ``keep_ratio`` of each image's / frame's tokens on an evenly spaced grid, at ``layer``."""

    keep_ratio: float = 0.5
    layer: int = 2

    pool = "group"

    def __post_init__(self):
        check_ratio(self.name, "keep_ratio", self.keep_ratio)
        check_layer(self.name, "layer", self.layer)

    def validate(self, model: ModelInfo) -> None:
        check_layer(self.name, "layer", self.layer, model)

    def prune_layers(self, layout) -> list[int]:
        return [self.layer]

    def count(self, step: PrefillStep, num_rows: int) -> int:
        return keep_count(num_rows, self.keep_ratio, "round")

    def score(self, step: PrefillStep) -> torch.Tensor:
        """1 on each group's lattice points (``uniform_cells`` with the group's count), 0 elsewhere."""
        layout = step.layout
        visual = layout.visual_rows()
        scores = torch.zeros(visual.numel(), device=visual.device)
        for group_index, group in enumerate(layout.groups):
            members = (layout.group[visual] == group_index).nonzero().flatten()  # positions within visual
            if members.numel() == 0:
                continue
            cells = layout.cell[visual[members]]
            k = self.count(step, members.numel())
            if members.numel() == group.size and bool((cells >= 0).all()):
                # a full grid: lattice cells (cells are in raster order within the group)
                wanted = torch.tensor(uniform_cells(group.rows, group.cols, k), device=visual.device, dtype=torch.long)
                position = torch.full((group.size,), -1, dtype=torch.long, device=visual.device)
                position[cells] = torch.arange(members.numel(), device=visual.device)
                scores[members[position[wanted]]] = 1
            else:
                # a grid already thinned by an earlier step: evenly spaced in raster order
                picked = torch.tensor(uniform_cells(1, members.numel(), k), dtype=torch.long, device=visual.device)
                scores[members[picked]] = 1
        return scores
