"""FastV (Chen et al., ECCV 2024): drop the visual tokens that receive the least attention in layer K-1.

Card: ``shared/methods/fastv.md``. tokenprune reproduces the official HF-LLaVA variant with a KV cache:
pruned once at prefill, layers >= K cache only the kept tokens, original positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PrefillStep, ModelInfo, check_choice, check_layer, check_ratio, keep_count, register
from .scored import ScoredMethod


@register("fastv")
@dataclass
class FastV(ScoredMethod):
    """At the input of ``layer`` (K), keep the visual tokens most attended in layer K-1.

    Scores: head-mean softmax attention (fp32) of the last prompt token (``query="last"``, all official
    code) or the mean over all rows (``query="mean"``, the paper's text). Kept count: ``keep`` if given,
    else ``round(N * keep_ratio)`` of the N visual tokens.
    """

    layer: int = 2
    keep_ratio: float = 0.5
    keep: int | None = None
    query: str = "last"

    def __post_init__(self):
        check_layer(self.name, "layer", self.layer)
        check_ratio(self.name, "keep_ratio", self.keep_ratio)
        check_choice(self.name, "query", self.query, ("last", "mean"))
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0):
            raise ValueError(f"{self.name}.keep must be a non-negative integer or null, got {self.keep!r}")

    def validate(self, model: ModelInfo) -> None:
        check_layer(self.name, "layer", self.layer, model)

    def prune_layers(self, layout) -> list[int]:
        return [self.layer]

    def kept_count(self, num_visual: int) -> int:
        if self.keep is not None:
            return min(self.keep, num_visual)
        return keep_count(num_visual, self.keep_ratio, "round")

    def count(self, step: PrefillStep, num_rows: int) -> int:
        return self.kept_count(num_rows)

    def score(self, step: PrefillStep) -> torch.Tensor:
        if self.query == "last":
            return step.attention(layer=self.layer - 1, queries="last", keys="visual")[0]  # [n_visual]
        return step.attention(layer=self.layer - 1, queries="all", keys="visual", reduce="mean")  # [n_visual]
