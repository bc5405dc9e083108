"""HiMAP (Yin, Si, Wang, CVPR 2025): two-stage hierarchical pruning of the visual tokens.

Card: ``shared/methods/himap.md``. Stage 1, at the input of ``text_layer`` (K1): the text rows after the last
visual token rank the visual tokens by the head-mean attention they pay to them in layer K1-1 (column sums);
the top ``floor(N * text_keep)`` survive. Stage 2, at the input of ``image_layer`` (K2): the surviving visual
rows rank each other by the head-mean attention in layer K2-1 (column sums of the image x image block,
diagonal included); the top ``floor(N * image_keep)`` survive. N is the original number of visual tokens
(images and, on Qwen2.5-VL, video frames). Positions are kept; pruning happens once, at prefill.

Scores are recomputed from layers K1-1 and K2-1's own projections for |Q_T| and k1 query rows: no attention
map of the main pass, no eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PrefillStep, ModelInfo, check_layer, check_ratio, keep_count, register
from .scored import ScoredMethod


@register("himap")
@dataclass
class HiMAP(ScoredMethod):
    """Prune visual tokens at ``text_layer`` by text->image attention, then at ``image_layer`` by image<->image
    attention. ``text_keep`` and ``image_keep`` are fractions of the original visual tokens (nested sets)."""

    text_layer: int = 2
    image_layer: int = 8
    text_keep: float = 0.5
    image_keep: float = 0.125

    def __post_init__(self):
        check_layer(self.name, "text_layer", self.text_layer)
        check_layer(self.name, "image_layer", self.image_layer)
        if self.image_layer <= self.text_layer:
            raise ValueError(f"{self.name}.image_layer must be greater than {self.name}.text_layer, got "
                             f"image_layer={self.image_layer}, text_layer={self.text_layer}")
        check_ratio(self.name, "text_keep", self.text_keep)
        check_ratio(self.name, "image_keep", self.image_keep)
        if self.image_keep > self.text_keep:
            raise ValueError(f"{self.name}.image_keep must be <= {self.name}.text_keep (stage 2 prunes the "
                             f"survivors of stage 1), got image_keep={self.image_keep}, text_keep={self.text_keep}")

    def validate(self, model: ModelInfo) -> None:
        check_layer(self.name, "text_layer", self.text_layer, model)
        check_layer(self.name, "image_layer", self.image_layer, model)

    def prune_layers(self, layout) -> list[int]:
        if layout.num_visual and layout.text_after_visual_rows().numel() == 0:
            raise ValueError(f"{self.name}: the prompt ends with a visual token; stage 1 ranks visual tokens by the "
                             "attention of the text tokens after the last visual token, and there are none")
        return [self.text_layer, self.image_layer]

    def count(self, step: PrefillStep, num_rows: int) -> int:
        fraction = self.text_keep if step.layer == self.text_layer else self.image_keep
        return keep_count(step.layout.original_num_visual, fraction, "floor")  # of the original N (nested sets)

    def score(self, step: PrefillStep) -> torch.Tensor:
        # stage 1: text rows after the last visual token (|Q_T| queries); stage 2: the surviving visual rows (k1)
        queries = "text" if step.layer == self.text_layer else "visual"
        return step.attention(layer=step.layer - 1, queries=queries, keys="visual", reduce="sum")  # [n_visual]
