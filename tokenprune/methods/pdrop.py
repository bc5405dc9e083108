"""PyramidDrop (Xing et al., CVPR 2025): keep a shrinking fraction of the visual tokens at each stage boundary.

Card: ``shared/methods/pdrop.md``. At the input of layer ``l_s`` the last prompt token's head-mean attention,
recomputed with layer ``l_s``'s own projections on its input, ranks the surviving visual tokens; the top
``floor(N * r_s)`` of the original N survive (nested sets).

Positions (``positions``): ``auto`` (default) is the official algorithm wherever it is defined — the LLaVA code
re-numbers the survivors contiguously after every drop and shifts decode positions to match (``reindex``) — and
keeps the original 3-D positions on mRoPE models, where re-numbering has no reference (a tokenprune extension).
``keep`` (original positions on every model: a labelled variant on 1-D RoPE) and ``reindex`` (1-D RoPE only) can
be chosen explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import (PrefillStep, ModelInfo, check_layer, check_positions, check_ratio, keep_count, register,
                   resolve_positions)
from .scored import ScoredMethod

OFFICIAL_POSITIONS = "reindex"  # the official LLaVA code re-numbers the survivors contiguously after every drop


def stage_boundaries(num_layers: int, stages: int = 4) -> list[int]:
    """The paper's boundaries scaled to a decoder of ``num_layers``: ``i * floor(L / stages)`` for i = 1..stages-1
    (at least 1 apart; boundaries past the last layer are dropped). 32 layers: 8, 16, 24; 28: 7, 14, 21; 6: 1, 2, 3."""
    step = max(1, num_layers // stages)
    return [i * step for i in range(1, stages) if i * step < num_layers]


@register("pdrop")
@dataclass
class PDrop(ScoredMethod):
    layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])
    positions: str = "auto"  # "auto": reindex on 1-D RoPE (official), keep on mRoPE; "keep"; "reindex" (1-D only)

    def __post_init__(self):
        self.layers, self.ratios = list(self.layers), list(self.ratios)
        if len(self.layers) != len(self.ratios):
            raise ValueError(f"pdrop.layers ({self.layers}) and pdrop.ratios ({self.ratios}) must have equal lengths")
        for i, layer in enumerate(self.layers):
            check_layer(self.name, f"layers[{i}]", layer)
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"pdrop.layers must be strictly increasing, got {self.layers}")
        for i, ratio in enumerate(self.ratios):
            check_ratio(self.name, f"ratios[{i}]", ratio)
        if any(b > a for a, b in zip(self.ratios, self.ratios[1:])):
            raise ValueError(f"pdrop.ratios must be non-increasing, got {self.ratios}")
        check_positions(self.name, self.positions)

    def validate(self, model: ModelInfo) -> None:
        for i, layer in enumerate(self.layers):
            check_layer(self.name, f"layers[{i}]", layer, model)
        if self.positions == "reindex" and not model.reindex_positions:
            raise ValueError("pdrop.positions='reindex' is defined for 1-D RoPE only (LLaVA); "
                             f"this model uses {model.rope}: use positions='keep' or 'auto'")

    def prune_layers(self, layout) -> list[int]:
        return list(self.layers)

    def count(self, step: PrefillStep, num_rows: int) -> int:
        stage = self.layers.index(step.layer)
        return keep_count(step.layout.original_num_visual, self.ratios[stage], "floor")  # of the original N

    def score(self, step: PrefillStep) -> torch.Tensor:
        return step.attention(layer=step.layer, queries="last", keys="visual")[0]  # [n_visual]

    def reduction_fields(self, step: PrefillStep) -> dict:
        """``auto``: the official contiguous re-numbering where the family defines it (1-D RoPE), else ``keep``."""
        return {"reindex_positions": resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, step.model)
                 == "reindex"}
