"""Random visual-token pruning: an honest baseline (seeded, independent of content)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PrefillStep, Method, ModelInfo, Reduction, check_layer, check_ratio, keep_count, register


@register("random")
@dataclass
class RandomPrune(Method):
    """Keep a seeded uniform-random ``keep_ratio`` of each image's / frame's visual tokens at ``layer``.

    The default layer equals FastV's, so that at equal ``keep_ratio`` random, uniform and FastV have the
    same token schedule and FLOPs and differ only in which tokens they keep.
    """

    keep_ratio: float = 0.5
    layer: int = 2
    seed: int = 0

    def __post_init__(self):
        check_ratio(self.name, "keep_ratio", self.keep_ratio)
        check_layer(self.name, "layer", self.layer)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{self.name}.seed must be an integer, got {self.seed!r}")

    def validate(self, model: ModelInfo) -> None:
        check_layer(self.name, "layer", self.layer, model)

    def prune_layers(self, layout) -> list[int]:
        return [self.layer]

    def select(self, step: PrefillStep) -> Reduction:
        layout = step.layout
        generator = torch.Generator().manual_seed(self.seed)
        kept = []
        for group in range(len(layout.groups)):
            rows = layout.group_rows(group)
            if rows.numel() == 0:
                continue
            k = keep_count(rows.numel(), self.keep_ratio, "round")
            order = torch.randperm(rows.numel(), generator=generator)[:k].to(rows.device)
            kept.append(rows[order])
        visual = torch.cat(kept) if kept else layout.visual_rows()[:0]
        return step.keep_visual(visual)
