"""Random visual-token pruning: an honest baseline (seeded, independent of content)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PrefillStep, ModelInfo, check_layer, check_ratio, keep_count, register
from .scored import ScoredMethod


@register("random")
@dataclass
class RandomPrune(ScoredMethod):
    """Keep a seeded uniform-random ``keep_ratio`` of each image's / frame's visual tokens at ``layer``.

    The default layer equals FastV's, so that at equal ``keep_ratio`` random, uniform and FastV have the
    same token schedule and FLOPs and differ only in which tokens they keep.
    """

    keep_ratio: float = 0.5
    layer: int = 2
    seed: int = 0

    pool = "group"

    def __post_init__(self):
        check_ratio(self.name, "keep_ratio", self.keep_ratio)
        check_layer(self.name, "layer", self.layer)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{self.name}.seed must be an integer, got {self.seed!r}")

    def validate(self, model: ModelInfo) -> None:
        check_layer(self.name, "layer", self.layer, model)

    def prune_layers(self, layout) -> list[int]:
        return [self.layer]

    def count(self, step: PrefillStep, num_rows: int) -> int:
        return keep_count(num_rows, self.keep_ratio, "round")

    def score(self, step: PrefillStep) -> torch.Tensor:
        """A seeded random permutation per group (groups in order): the first of it scores highest."""
        layout = step.layout
        group = layout.group[layout.visual_rows()]  # [n_visual]
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.zeros(group.numel())
        for g in range(len(layout.groups)):
            members = (group == g).nonzero().flatten().cpu()
            if members.numel():
                order = torch.randperm(members.numel(), generator=generator)
                scores[members[order]] = torch.arange(members.numel(), 0, -1, dtype=scores.dtype)
        return scores.to(group.device)
