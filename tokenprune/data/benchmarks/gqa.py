"""GQA testdev-balanced (12,578 compositional questions): exact match, case- and punctuation-insensitive.

Questions and images are two configs of one hub dataset, joined on ``imageId`` = ``id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..base import DatasetError, register_dataset
from ..sample import Sample
from ..scorers import ExactMatch
from .hub import Benchmark, image_input, is_saved, load_split, prepare

PROMPT = "{question}\nAnswer the question using a single word or phrase."


@register_dataset("gqa")
@dataclass
class GQA(Benchmark):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/GQA", "lmms-lab-encoder/GQA"])
    config: str | None = "testdev_balanced_instructions"
    split: str = "testdev"
    max_new_tokens: int = 16
    images_config: str = "testdev_balanced_images"
    images_path: str | None = None  # the images table, when dataset.path holds only the questions

    columns = ("id", "imageId", "question", "answer")
    id_column = "id"
    image_columns = ()
    download = ("the lmms-lab/GQA dataset (now lmms-lab-encoder/GQA): configs testdev_balanced_instructions "
                "and testdev_balanced_images")
    generation_source = 'lmms_eval/tasks/gqa/gqa.yaml'

    def check(self) -> None:
        path = Path(self.path) if self.path else None
        if path is not None and not self.images_path and (path.is_file() or is_saved(path)):
            raise DatasetError(f"{self.name}: dataset.path={self.path!r} holds one table (the questions); give "
                               f"dataset.images_path for the {self.images_config} table (columns id, image)")

    def make_scorer(self):
        return ExactMatch(punctuation="delete", breakdown=("structural", "semantic"))

    def load(self):
        questions = super().load()
        images, source = load_split(self.name, self.images_path or self.path, self.hub_names, self.images_config,
                                    self.split)
        self._images = prepare(self.name, images, source, ("id", "image"), ("image",))
        self._image_rows = {image_id: row for row, image_id in enumerate(self._images["id"])}
        return questions

    def build(self, row: dict, sample_id: str) -> Sample:
        image_row = self._image_rows.get(row["imageId"])
        if image_row is None:
            raise DatasetError(f"{self.name}: image {row['imageId']!r} of question {row['id']!r} is not in the "
                               f"{self.images_config} table")
        types = row.get("types") if isinstance(row.get("types"), dict) else {}
        return Sample(id=sample_id, question=PROMPT.format(question=row["question"]),
                      images=[image_input(self._images[image_row]["image"])], answer=row["answer"],
                      meta={"structural": types.get("structural"), "semantic": types.get("semantic")})
