"""A user's own samples from a JSON-lines file: one object per line with ``question``, ``answer`` and
``image`` (a path, or a list of paths) or ``video`` (a path); relative paths are resolved against the file.

An optional ``id`` names a sample (default: its line's position among the samples); ids must be unique, since
resuming a run finds finished samples by id. A line that is not a JSON object is refused with its line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .base import Dataset, DatasetError, check_count, check_seed, register_dataset, select_rows
from .sample import Sample
from .scorers import ExactMatch, MultipleChoice, VQAAccuracy

SCORERS = {"exact_match": lambda: ExactMatch(), "first_word": lambda: ExactMatch(first_word=True),
           "vqa": VQAAccuracy, "multiple_choice": MultipleChoice}


@register_dataset("jsonl")
@dataclass
class JsonlDataset(Dataset):
    path: str = ""
    scorer_name: str = "exact_match"
    limit: int | None = None  # at most this many samples
    seed: int | None = 0  # which samples under limit: a seeded random subset; null: the first ones
    max_new_tokens: int = 16

    def __post_init__(self):
        check_count(self.name, "limit", self.limit)
        check_seed(self.name, self.seed)
        if self.scorer_name not in SCORERS:
            raise ValueError(f"{self.name}.scorer_name must be one of {sorted(SCORERS)}, got {self.scorer_name!r}")
        file = Path(self.path)
        if not self.path or not file.is_file():
            raise DatasetError(f"dataset.path={self.path!r} is not a JSON-lines file")
        self.scorer = SCORERS[self.scorer_name]()
        rows, lines = [], []
        with file.open() as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{file}:{number}: not valid JSON ({error.msg}, column {error.colno})") from error
                if not isinstance(row, dict):
                    raise DatasetError(f"{file}:{number}: a line must be a JSON object, got {type(row).__name__}")
                missing = [key for key in ("question", "answer") if key not in row]
                if missing:
                    raise DatasetError(f"{file}:{number} lacks the field(s) {missing}")
                rows.append(row)
                lines.append(number)
        ids = [str(row.get("id", index)) for index, row in enumerate(rows)]
        first_line: dict[str, int] = {}
        duplicates = []
        for sample_id, number in zip(ids, lines):
            if sample_id in first_line:
                duplicates.append(f"{sample_id!r} (lines {first_line[sample_id]} and {number})")
            first_line.setdefault(sample_id, number)
        if duplicates:
            raise DatasetError(f"{file}: sample ids must be unique (a resumed run finds finished samples by id); "
                               f"repeated: {', '.join(duplicates[:10])}" + (" ..." if len(duplicates) > 10 else ""))
        chosen = select_rows(self.name, len(rows), self.limit, self.seed)
        self._rows = [rows[i] for i in chosen]
        self._ids = [ids[i] for i in chosen]
        self._root = file.parent

    def __len__(self) -> int:
        return len(self._rows)

    def sample_id(self, index: int) -> str:
        return self._ids[index]

    def __getitem__(self, index: int) -> Sample:
        row = self._rows[index]
        images = row.get("image") or []
        images = [images] if isinstance(images, str) else images
        video = row.get("video")
        return Sample(id=self._ids[index], question=row["question"],
                      images=[str(self._root / p) for p in images],
                      video=str(self._root / video) if video else None, answer=row["answer"],
                      choices=row.get("choices"), meta={k: v for k, v in row.items() if k == "category"})
