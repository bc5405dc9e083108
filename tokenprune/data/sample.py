"""One benchmark sample, as every dataset yields it and every model adapter consumes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """A question about zero or more images, or one video.

    ``images``: PIL images, or paths opened lazily by the adapter. ``video``: a video file path, or a
    ``VideoFrames`` of already decoded frames. ``answer``: the reference (a string, or a list of strings for
    VQA-style datasets). ``choices``: options of a multiple-choice question (already in ``question``).
    """

    id: str
    question: str
    images: list[Any] = field(default_factory=list)
    video: Any = None
    answer: Any = None
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class VideoFrames:
    """Decoded frames ``[n, 3, H, W]`` (float 0-255 or uint8) and where they were sampled from."""

    frames: Any
    fps: float  # frame rate of the source video
    frame_indices: list[int]  # indices of the sampled frames in the source video
    total_frames: int
