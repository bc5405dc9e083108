"""TokenLayout: where the system, visual (per image / per video frame, with its grid) and text tokens are.

A layout is found per sample from ``input_ids`` (the image / video placeholder ids), never from hard-coded
offsets. It travels with the sequence through the decoder: every selection gathers it, so a method always
knows, for each current row, whether it is visual, which image or frame it belongs to, where it sits in
that grid and which row of the original prompt it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2
KIND_NAMES = {TEXT: "text", IMAGE: "image", VIDEO: "video"}


@dataclass(frozen=True)
class VisualGroup:
    """One image, or one temporal step (two sampled frames) of a video, as a grid of LLM tokens."""

    kind: int  # IMAGE or VIDEO
    source: int  # index of the image / video within the sample
    frame: int  # temporal grid index within the video (0 for images)
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class VisualSpec:
    """What the adapter knows about one sample's visual inputs, in LLM-token units.

    ``image_grids`` / ``video_grids`` hold one ``(t, rows, cols)`` triple per image / video in prompt order
    (images have ``t == 1``); ``rows * cols`` tokens per temporal step.
    """

    image_token_id: int
    video_token_id: int | None = None
    image_grids: tuple[tuple[int, int, int], ...] = ()
    video_grids: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class TokenLayout:
    """Per-row description of one sample's current sequence (length L).

    Tensors (all shape ``[L]``, int64, on the sequence's device):
      * ``kind``: TEXT / IMAGE / VIDEO
      * ``group``: index into ``groups`` for visual rows, -1 for text rows
      * ``cell``: raster index inside the group's grid (row * cols + col), -1 for text rows and merged tokens
      * ``original``: row index in the original, unpruned prompt (merged tokens: their first member)
    """

    kind: torch.Tensor
    group: torch.Tensor
    cell: torch.Tensor
    original: torch.Tensor
    groups: tuple[VisualGroup, ...]
    original_length: int
    original_num_visual: int
    meta: dict = field(default_factory=dict, compare=False)  # method annotations (e.g. video segments)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_input_ids(cls, input_ids: torch.Tensor, spec: VisualSpec) -> "TokenLayout":
        """Find the layout of one sample. ``input_ids``: ``[L]``."""
        if input_ids.dim() != 1:
            raise ValueError(f"TokenLayout.from_input_ids expects one sample [L], got shape {tuple(input_ids.shape)}")
        device = input_ids.device
        length = input_ids.shape[0]
        kind = torch.full((length,), TEXT, dtype=torch.long, device=device)
        group = torch.full((length,), -1, dtype=torch.long, device=device)
        cell = torch.full((length,), -1, dtype=torch.long, device=device)
        groups: list[VisualGroup] = []
        for token_kind, token_id, grids in (
            (IMAGE, spec.image_token_id, spec.image_grids),
            (VIDEO, spec.video_token_id, spec.video_grids),
        ):
            if token_id is None:
                continue
            rows_of_kind = (input_ids == token_id).nonzero().flatten()
            expected = sum(t * h * w for t, h, w in grids)
            if rows_of_kind.numel() != expected:
                raise ValueError(
                    f"found {rows_of_kind.numel()} {KIND_NAMES[token_kind]} placeholder tokens (id {token_id}) "
                    f"but the visual grids {list(grids)} need {expected}"
                )
            offset = 0
            for source, (t, h, w) in enumerate(grids):
                for frame in range(t):
                    rows = rows_of_kind[offset : offset + h * w]
                    kind[rows] = token_kind
                    group[rows] = len(groups)
                    cell[rows] = torch.arange(h * w, device=device)
                    groups.append(VisualGroup(token_kind, source, frame, h, w))
                    offset += h * w
        # Groups must be numbered in prompt order (images and videos may interleave).
        if groups:
            first_row = torch.full((len(groups),), length, dtype=torch.long, device=device)
            rows = torch.arange(length, device=device)
            visual = group >= 0
            first_row = first_row.scatter_reduce(0, group[visual], rows[visual], reduce="amin")
            order = torch.argsort(first_row)
            renumber = torch.empty_like(order)
            renumber[order] = torch.arange(len(groups), device=device)
            group = torch.where(visual, renumber[group.clamp(min=0)], group)
            groups = [groups[i] for i in order.tolist()]
        return cls(
            kind=kind,
            group=group,
            cell=cell,
            original=torch.arange(length, device=device),
            groups=tuple(groups),
            original_length=length,
            original_num_visual=int((kind != TEXT).sum()),
        )

    # ------------------------------------------------------------------ queries
    @property
    def length(self) -> int:
        return self.kind.shape[0]

    @cached_property
    def is_visual(self) -> torch.Tensor:
        """``[L]`` bool."""
        return self.kind != TEXT

    @cached_property
    def num_visual(self) -> int:
        """Counted once per layout (one host-device sync), not once per layer."""
        return int(self.is_visual.sum())

    def visual_rows(self) -> torch.Tensor:
        """Current row indices of visual tokens, ascending. ``[n_visual]``."""
        return self.is_visual.nonzero().flatten()

    def text_rows(self) -> torch.Tensor:
        """Current row indices of every non-visual token (system, template, question). ``[L - n_visual]``."""
        return (~self.is_visual).nonzero().flatten()

    def text_after_visual_rows(self) -> torch.Tensor:
        """Non-visual rows after the last visual token (the instruction that follows the image / video)."""
        visual = self.visual_rows()
        if visual.numel() == 0:
            return self.text_rows()
        rows = torch.arange(self.length, device=self.kind.device)
        return rows[(rows > visual[-1]) & ~self.is_visual]

    def group_rows(self, group_index: int) -> torch.Tensor:
        """Current rows of one visual group, ascending."""
        return (self.group == group_index).nonzero().flatten()

    # ------------------------------------------------------------------ transformation
    def gather(self, index: torch.Tensor) -> "TokenLayout":
        """Layout of ``sequence[index]`` (``index``: ``[L']`` ascending rows of the current sequence)."""
        return TokenLayout(
            kind=self.kind[index],
            group=self.group[index],
            cell=self.cell[index],
            original=self.original[index],
            groups=self.groups,
            original_length=self.original_length,
            original_num_visual=self.original_num_visual,
            meta=dict(self.meta),
        )

    def with_rows(self, kind, group, cell, original, meta: dict | None = None) -> "TokenLayout":
        """A layout with new per-row tensors (pre-LLM merging builds new rows)."""
        return TokenLayout(
            kind=kind,
            group=group,
            cell=cell,
            original=original,
            groups=self.groups,
            original_length=self.original_length,
            original_num_visual=self.original_num_visual,
            meta=dict(self.meta if meta is None else meta),
        )

    def describe(self) -> str:
        n_text = self.length - self.num_visual
        return (
            f"TokenLayout(length={self.length}, visual={self.num_visual}/{self.original_num_visual}, "
            f"text={n_text}, groups={len(self.groups)})"
        )
