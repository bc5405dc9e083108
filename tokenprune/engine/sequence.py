"""The sequence value that travels between decoder layers during one prefill (every sample of the batch).

``PrefillSequence`` holds what the next layer needs about the current rows — hidden states, rotary positions and
tables, layouts, masks, per-row side inputs and the previous layer's input (for scores of that layer) — and
``gather`` / ``reduce`` transform all of them together, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .contract import PruningInputError, Reduction, TokenLayout


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x``: ``[B or 1, L, ...]``; ``rows``: ``[B, L']`` → ``[B, L', ...]`` (a batch-1 table is shared by the batch)."""
    x = x.expand(rows.shape[0], *x.shape[1:])
    index = rows.view(*rows.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


@dataclass
class PrefillSequence:
    """The rows entering the next decoder layer.

    ``hidden`` ``[B, L, d]``: embeddings before layer 0, then each layer's input (refreshed from the stock loop);
    ``positions`` ``[B, P, L]``; ``tables``: the rotary ``(cos, sin)`` ``[B or 1, L, hd]`` of the rows (the stock
    loop's own while the rows are the stock ones); ``layouts``: one per sample; ``side``: ``{layer: [B, L, d]}``
    side inputs still to be added at that layer's input; ``previous``: the previous layer's input ``[B, L, d]``
    (kept only where a selection at the next layer scores with that layer); ``changed``: the rows differ from the
    stock loop's; ``masks``: the attention masks of the current rows per layer type (when changed).
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    layouts: list[TokenLayout]
    tables: tuple[torch.Tensor, torch.Tensor] | None = None
    side: dict[int, torch.Tensor] = field(default_factory=dict)
    previous: torch.Tensor | None = None
    changed: bool = False
    masks: dict | None = None

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    def add_side_input(self, layer: int) -> None:
        """Add the side inputs that enter ``layer`` (before anything at that layer reads the hidden states)."""
        values = self.side.pop(layer, None)
        if values is not None:
            self.hidden = self.hidden + values.to(self.hidden.dtype)

    # -- the two transformations ------------------------------------------------------------------------
    def gather(self, rows: torch.Tensor, layouts: list[TokenLayout]) -> "PrefillSequence":
        """Keep ``rows`` ``[B, L']`` (ascending per sample) of every per-row tensor; ``layouts``: the new layouts."""
        tables = None if self.tables is None else tuple(gather_rows(t, rows) for t in self.tables)
        return replace(
            self, hidden=gather_rows(self.hidden, rows), layouts=layouts, tables=tables,
            positions=self.positions.gather(2, rows[:, None].expand(-1, self.positions.shape[1], -1)),
            side={layer: gather_rows(values, rows) for layer, values in self.side.items()},
            previous=None if self.previous is None else gather_rows(self.previous, rows),
            changed=True, masks=None,
        )

    def reduce(self, reductions: list[Reduction], rotary: Callable) -> "PrefillSequence":
        """The sequence after one ``Reduction`` per sample (equal new lengths). Kept rows only: one batched gather of
        every tensor; merged rows or given positions: per sample by the reduction's rules, rotary tables recomputed by
        ``rotary(hidden, positions)`` (the family's tables for any positions)."""
        lengths = {reduction.new_length() for reduction in reductions}
        if len(lengths) != 1:
            raise PruningInputError(f"the samples of this batch reduce to different lengths ({sorted(lengths)}); "
                                    "run them with batch size 1")
        layouts = [reduction.layout(layout) for reduction, layout in zip(reductions, self.layouts)]
        if all(reduction.merged is None and reduction.sequence_positions is None for reduction in reductions):
            return self.gather(torch.stack([reduction.keep for reduction in reductions]), layouts)

        def per_sample(x: torch.Tensor, apply) -> torch.Tensor:
            x = x.expand(self.batch, *x.shape[1:])
            return torch.stack([apply(reduction, x[b]) for b, reduction in enumerate(reductions)])

        hidden = per_sample(self.hidden, lambda r, x: r.hidden(x))
        positions = per_sample(self.positions, lambda r, x: r.positions(x))
        return replace(
            self, hidden=hidden, positions=positions, layouts=layouts, tables=rotary(hidden, positions),
            side={layer: per_sample(values, lambda r, x: r.rows(x, 0)) for layer, values in self.side.items()},
            previous=None if self.previous is None else per_sample(self.previous, lambda r, x: r.rows(x, 0)),
            changed=True, masks=None,
        )

    def to(self, device: torch.device) -> "PrefillSequence":
        """Every per-row value on ``device`` (a model spread over devices: each layer's pre-hook moves the rows to the
        layer's device). Itself when everything is there already."""
        values = [self.hidden, self.positions, *(layout.kind for layout in self.layouts), *(self.tables or ()),
                  *self.side.values(), self.previous, *(self.masks or {}).values()]
        if all(value.device == device for value in values if isinstance(value, torch.Tensor)):
            return self
        move = lambda value: value.to(device) if isinstance(value, torch.Tensor) else value  # noqa: E731
        return replace(
            self, hidden=move(self.hidden), positions=move(self.positions),
            layouts=[layout.to(device) for layout in self.layouts],
            tables=None if self.tables is None else tuple(move(t) for t in self.tables),
            side={layer: move(values) for layer, values in self.side.items()}, previous=move(self.previous),
            masks=None if self.masks is None else {kind: move(mask) for kind, mask in self.masks.items()},
        )

    def sample(self, b: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Sample ``b``'s hidden ``[1, L, d]``, positions ``[1, P, L]`` and tables ``[1, L, hd]``."""
        tables = tuple(t.expand(self.batch, *t.shape[1:])[b : b + 1] for t in self.tables)
        return self.hidden[b : b + 1], self.positions[b : b + 1], tables
