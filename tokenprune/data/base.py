"""The Dataset and Scorer protocols, and the dataset registry.

A dataset is a dataclass registered by name (``@register_dataset("textvqa_val")``) whose fields are its
configuration (``conf/dataset/<name>.yaml`` holds the same fields and defaults). It yields ``Sample``s by
index, deterministically, and carries the benchmark's official scorer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from abc import ABC, abstractmethod
from typing import Any

from .sample import Sample


class DatasetError(ValueError):
    """A dataset that cannot be loaded (missing files, wrong columns, unknown split); names what is wrong."""


log = logging.getLogger("tokenprune")


class Scorer(ABC):
    """Scores one prediction; aggregates scored records into the benchmark's own metrics."""

    headline: str = "accuracy"  # the name of the benchmark's headline metric in ``aggregate``
    headline_unit: str = "%"  # the headline's unit (plots, tables)
    headline_range: tuple[float, float] = (0.0, 100.0)  # the values the headline can take

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """A per-sample score in [0, 1] (1 = correct)."""

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Benchmark metrics from scored records (records with an error are excluded, and counted)."""
        scores = [r["score"] for r in records if r.get("error") is None and r.get("score") is not None]
        return {self.headline: 100.0 * sum(scores) / len(scores) if scores else math.nan}


class Dataset(ABC):
    """Indexable, deterministic samples plus their scorer. Subclasses are dataclasses."""

    name: str = "dataset"
    max_new_tokens: int = 16  # enough for the dataset's answers
    stop: list[str] = ()  # strings that end an answer (generation stops there; the answer is cut before them)
    scorer: Scorer

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Sample: ...

    def sample_id(self, index: int) -> str:
        """The id of sample ``index`` (datasets override this when building the sample is expensive)."""
        return self[index].id

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def describe(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"dataset": self.name, **fields}


_DATASETS: dict[str, type[Dataset]] = {}


def register_dataset(name: str):
    def decorator(cls):
        cls.name = name
        _DATASETS[name] = cls
        return cls

    return decorator


def available_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_class(name: str) -> type[Dataset]:
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available datasets: {', '.join(available_datasets())}")
    return _DATASETS[name]


def create_dataset(name: str, **fields) -> Dataset:
    cls = dataset_class(name)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"dataset {name!r} has no field(s) {', '.join(unknown)}; its fields are: {', '.join(sorted(known))}")
    return cls(**fields)


def check_count(owner: str, field_name: str, value, allow_none: bool = True, minimum: int = 0) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise ValueError(f"{owner}.{field_name} must be {allowed}, got {value!r}")


def check_stop(owner: str, value) -> list[str]:
    """``stop`` as a list of non-empty strings, or an error naming the field."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}.stop must be a list of non-empty strings, got {value!r}")
    return list(value)


def check_seed(owner: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{owner}.seed must be an integer or null, got {value!r}")


def select_rows(owner: str, n: int, limit: int | None, seed: int | None, groups: list | None = None) -> list[int]:
    """``dataset.limit`` on a table of ``n`` rows: at most ``limit`` row indices, in table order — a seeded random
    subset (``seed``), or the first rows (``seed`` null). Every dataset gives ``limit`` and ``seed`` this meaning.

    With ``groups`` (one key per row), rows of a group are taken together or not at all (MME's question pairs,
    MMBench's rotated copies), so the subset may hold slightly fewer than ``limit`` rows. Asking for more rows than
    there are takes them all, and says so.
    """
    if limit is not None and limit > n:
        log.warning("dataset.limit=%d but %s has %d samples: running all %d", limit, owner, n, n)
    if limit is None or limit >= n:
        return list(range(n))
    members: dict[Any, list[int]] = {}
    for row, key in enumerate(groups if groups is not None else range(n)):
        members.setdefault(key, []).append(row)
    keys = list(members)
    if seed is not None:
        keys = random.Random(seed).sample(keys, len(keys))
    chosen: list[int] = []
    for key in keys:
        if len(chosen) + len(members[key]) <= limit:
            chosen += members[key]
    return sorted(chosen)


def deprecated_count(owner: str, old: str, value, limit):
    """The value of ``limit`` when a deprecated count field (``n_samples``) is given instead; says so."""
    if value is None:
        return limit
    log.warning("%s.%s is deprecated: use dataset.limit=%s (dataset.seed picks which samples)", owner, old, value)
    return value
