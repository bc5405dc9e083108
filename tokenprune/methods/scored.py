"""The scored base (as kvpress's ``ScorerPress``): a method that defines only where it prunes, a score per visual row
and how many rows survive; the base does the top-k, the ties and the reduction.

    @register("mine")
    @dataclass
    class Mine(ScoredMethod):
        layer: int = 2
        keep_ratio: float = 0.5

        def prune_layers(self, layout):
            return [self.layer]

        def score(self, step):                       # [n_visual], one per current visual row, higher = kept
            return step.attention(layer=self.layer - 1, queries="last", keys="visual")[0]

        def count(self, step, num_rows):             # rows kept out of a pool of num_rows
            return round(num_rows * self.keep_ratio)

* ``pool = "visual"``: one top-k over every visual row; ``"group"``: one per visual group (image / temporal step),
  ``count`` called with each group's current size.
* Ties: the lower row first (a stable descending sort), so equal scores keep the earlier tokens.
* A pool whose count keeps all its rows, or none, is decided without calling ``score`` (no scoring work).
* ``reduction_fields(step)``: extra ``Reduction`` fields (e.g. ``reindex_positions``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .base import Method, PrefillStep, Reduction, topk_rows

POOLS = ("visual", "group")


class ScoredMethod(Method, ABC):
    """Base of the methods that keep the top-``count`` visual rows by a ``score`` (see the module docstring)."""

    pool: str = "visual"  # class attribute: "visual" (one top-k) or "group" (one per visual group)

    @abstractmethod
    def score(self, step: PrefillStep) -> torch.Tensor:
        """``[n_visual]`` scores of the current visual rows (``step.layout.visual_rows()`` order); higher = kept."""

    @abstractmethod
    def count(self, step: PrefillStep, num_rows: int) -> int:
        """Rows kept out of a pool of ``num_rows`` current visual rows."""

    def reduction_fields(self, step: PrefillStep) -> dict:
        """Extra fields of the ``Reduction`` (default: none)."""
        return {}

    def select(self, step: PrefillStep) -> Reduction:
        layout = step.layout
        visual = layout.visual_rows()  # [n_visual]
        if self.pool == "visual":
            pools = [torch.arange(visual.numel(), device=visual.device)]
        elif self.pool == "group":
            # positions within ``visual`` of each group's rows (groups in layout order, empty ones skipped)
            positions = [(layout.group[visual] == g).nonzero().flatten() for g in range(len(layout.groups))]
            pools = [p for p in positions if p.numel()]
        else:
            raise ValueError(f"{type(self).__name__}.pool must be one of {list(POOLS)}, got {self.pool!r}")
        counts = [max(0, min(p.numel(), self.count(step, p.numel()))) for p in pools]
        scores = None
        kept = []
        for members, k in zip(pools, counts):
            if k == members.numel():
                kept.append(members)
            elif k:
                scores = self.score(step) if scores is None else scores  # once per selection, for every pool
                kept.append(topk_rows(scores[members], members, k))
        chosen = torch.cat(kept) if kept else visual[:0]
        return step.keep_visual(visual[chosen], **self.reduction_fields(step))
