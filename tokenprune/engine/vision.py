"""Vision-encoder signals for pre-LLM methods: captured by the model family's hooks, computed only when asked.

A family that can serve them returns a ``SignalSource`` from ``FamilySpec.vision_signal_source`` (its file says
which encoder layer and how). The driver installs the source's capture hooks only when the applied method needs
vision signals (``Method.needs_vision_signals``), for the whole ``apply`` block: ``generate`` runs the encoder
itself before its first forward (``mm_encoder_outputs``), outside the outer model's call. The hooks keep only
references to the capture layer's inputs; ``SignalCapture.for_samples`` hands each sample a ``VisionSignals``
whose first request computes every group of the prefill once and maps the encoder's groups onto the samples'
layout groups. Captures are dropped after each prefill, and before an outer-model call that encodes pixels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from .contract import IMAGE, KIND_NAMES, VIDEO, GroupSignals, PruningInputError, TokenLayout, VisionSignals


class SignalSource(ABC):
    """What one model family captures from its vision encoder and how it turns the captures into signals.

    ``compute`` returns the groups in encoder order: the encoder's calls in order (images before videos, the order
    in which the stock models and ``generate`` encode them), then the items of each call (samples in batch order,
    images / videos in prompt order), then temporal steps; each group's tokens in the LLM's raster order.
    """

    family: str = ""
    has_cls: bool = False
    encoder_inputs: tuple[str, ...] = ("pixel_values", "pixel_values_videos")  # outer-model kwargs that encode

    @abstractmethod
    def hook(self, model, record: Callable[[dict], None]) -> list:
        """Register the capture hooks on ``model`` (``record(capture)`` stores one encoder call's capture, a dict
        whose ``"hidden"`` is the capture layer's input); return the handles. Called only for methods that need
        the signals."""

    @abstractmethod
    def compute(self, model, captures: list[dict], chunk_bytes: int) -> list[GroupSignals]:
        """Per-group signals from the captures of each encoder call, in encoder order."""

    def project(self, model, features: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"the {self.family} family has no projector of pre-projector features")

    def post_norm(self, model, features: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"the {self.family} family exposes no final encoder norm")


class SignalCapture:
    """The captures of one ``apply`` block (the family's hooks installed on ``model``).

    Scores are computed in blocks of at most ``max(min_chunk_bytes, 2 x the capture layer's input)`` bytes: no more
    than the encoder layer's own MLP activation, so the signals never raise the peak memory of the encoder."""

    def __init__(self, model, source: SignalSource, min_chunk_bytes: int):
        self.model = model
        self.source = source
        self.min_chunk_bytes = min_chunk_bytes
        self.captures: list[dict] = []
        self._handles: list = []

    def install(self) -> None:
        self._handles = self.source.hook(self.model, self.record)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def record(self, capture: dict) -> None:
        self.captures.append(capture)

    def clear(self) -> None:
        self.captures = []

    def encodes(self, kwargs: dict) -> bool:
        """Whether an outer-model call with these kwargs runs the encoder itself (then older captures are stale)."""
        return any(kwargs.get(name) is not None for name in self.source.encoder_inputs)

    def for_samples(self, layouts: list[TokenLayout]) -> list[VisionSignals]:
        """One lazy ``VisionSignals`` per sample of the current prefill (the captures taken so far)."""
        captures, source, model = self.captures, self.source, self.model
        computed: list[list[GroupSignals]] = []

        @torch.no_grad()
        def groups_of(b: int) -> list[GroupSignals]:
            if not computed:
                largest = max((c["hidden"].numel() * c["hidden"].element_size() for c in captures), default=0)
                chunk = max(self.min_chunk_bytes, 2 * largest)
                computed.extend(map_groups(source.compute(model, captures, chunk), layouts, source.family))
            return computed[b]

        return [VisionSignals(lambda b=b: groups_of(b), source.has_cls,
                              project=lambda x: source.project(model, x), post_norm=lambda x: source.post_norm(model, x),
                              family=source.family) for b in range(len(layouts))]


def map_groups(encoder_groups: list[GroupSignals], layouts: list[TokenLayout], family: str) -> list[list[GroupSignals]]:
    """The encoder's groups (images of every sample, then videos) assigned to each sample's layout groups; refused
    when they do not match the visual tokens (count or size): e.g. expanded inputs (beams) or an encoder call that
    no prefill consumed."""
    wanted = [(b, g) for kind in (IMAGE, VIDEO) for b, layout in enumerate(layouts)
              for g, group in enumerate(layout.groups) if group.kind == kind]
    sizes = [layouts[b].groups[g].size for b, g in wanted]
    found = [group.scores.numel() for group in encoder_groups]
    if found != sizes:
        kinds = [KIND_NAMES[layouts[b].groups[g].kind] for b, g in wanted]
        raise PruningInputError(
            f"the vision encoder's groups ({found} tokens) do not match the visual groups of this prefill "
            f"({list(zip(kinds, sizes))}) on the {family} family: vision signals need one encoder pass per prefill "
            "over exactly the prompt's images / videos (no expanded inputs such as beams)")
    per_sample: list[list] = [[None] * len(layout.groups) for layout in layouts]
    for (b, g), group in zip(wanted, encoder_groups):
        per_sample[b][g] = group
    return per_sample
