"""A user's own samples from a JSON-lines file: one object per line with ``question``, ``answer`` and
``image`` (a path, or a list of paths) or ``video`` (a path); relative paths are resolved against the file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .base import Dataset, DatasetError, check_count, register_dataset
from .sample import Sample
from .scorers import ExactMatch, MultipleChoice, VQAAccuracy

SCORERS = {"exact_match": lambda: ExactMatch(), "first_word": lambda: ExactMatch(first_word=True),
           "vqa": VQAAccuracy, "multiple_choice": MultipleChoice}


@register_dataset("jsonl")
@dataclass
class JsonlDataset(Dataset):
    path: str = ""
    scorer_name: str = "exact_match"
    limit: int | None = None
    max_new_tokens: int = 16

    def __post_init__(self):
        check_count(self.name, "limit", self.limit)
        if self.scorer_name not in SCORERS:
            raise ValueError(f"{self.name}.scorer_name must be one of {sorted(SCORERS)}, got {self.scorer_name!r}")
        file = Path(self.path)
        if not self.path or not file.is_file():
            raise DatasetError(f"dataset.path={self.path!r} is not a JSON-lines file")
        self.scorer = SCORERS[self.scorer_name]()
        self._rows = []
        with file.open() as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = [key for key in ("question", "answer") if key not in row]
                if missing:
                    raise DatasetError(f"{file}:{number} lacks the field(s) {missing}")
                self._rows.append(row)
        if self.limit is not None:
            self._rows = self._rows[: self.limit]
        self._root = file.parent

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Sample:
        row = self._rows[index]
        images = row.get("image") or []
        images = [images] if isinstance(images, str) else images
        video = row.get("video")
        return Sample(id=str(row.get("id", index)), question=row["question"],
                      images=[str(self._root / p) for p in images],
                      video=str(self._root / video) if video else None, answer=row["answer"],
                      choices=row.get("choices"), meta={k: v for k, v in row.items() if k == "category"})
