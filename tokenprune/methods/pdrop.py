"""PyramidDrop (Xing et al., CVPR 2025): keep a shrinking fraction of the visual tokens at each stage boundary.

Card: ``shared/methods/pdrop.md``. At the input of layer ``l_s`` the last prompt token's head-mean attention,
recomputed with layer ``l_s``'s own projections on its input, ranks the surviving visual tokens; the top
``floor(N * r_s)`` of the original N survive (nested sets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import PrefillStep, ModelInfo, check_choice, check_layer, check_ratio, keep_count, register
from .scored import ScoredMethod


@register("pdrop")
@dataclass
class PDrop(ScoredMethod):
    layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])
    positions: str = "keep"  # "keep": original positions; "reindex": contiguous after each drop (1-D RoPE only)

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
        check_choice(self.name, "positions", self.positions, ("keep", "reindex"))

    def validate(self, model: ModelInfo) -> None:
        for i, layer in enumerate(self.layers):
            check_layer(self.name, f"layers[{i}]", layer, model)
        if self.positions == "reindex" and not model.reindex_positions:
            raise ValueError("pdrop.positions='reindex' is defined for 1-D RoPE only (LLaVA); "
                             f"this model uses {model.rope}: use positions='keep'")

    def prune_layers(self, layout) -> list[int]:
        return list(self.layers)

    def count(self, step: PrefillStep, num_rows: int) -> int:
        stage = self.layers.index(step.layer)
        return keep_count(step.layout.original_num_visual, self.ratios[stage], "floor")  # of the original N

    def score(self, step: PrefillStep) -> torch.Tensor:
        return step.attention(layer=step.layer, queries="last", keys="visual")[0]  # [n_visual]

    def reduction_fields(self, step: PrefillStep) -> dict:
        return {"reindex_positions": self.positions == "reindex"}
