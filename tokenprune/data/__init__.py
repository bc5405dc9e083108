"""Datasets (embedded synthetic, local files, benchmarks) and their scorers; modules register themselves."""

import importlib
import pkgutil

from .base import Dataset, DatasetError, Scorer, available_datasets, create_dataset, dataset_class, register_dataset
from .sample import Sample, VideoFrames

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "sample"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Dataset", "DatasetError", "Sample", "Scorer", "VideoFrames", "available_datasets", "create_dataset",
           "dataset_class", "register_dataset"]
