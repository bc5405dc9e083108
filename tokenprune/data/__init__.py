"""Datasets and scorers."""

from .sample import Sample, VideoFrames

__all__ = ["Sample", "VideoFrames"]
