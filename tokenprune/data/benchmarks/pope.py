"""POPE (9,000 yes/no object-hallucination questions; adversarial / popular / random): accuracy, precision,
recall, F1 and the yes-ratio, overall and per category."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import register_dataset
from ..sample import Sample
from ..scorers import YesNo
from .hub import Benchmark, image_input

PROMPT = "{question}\nAnswer the question using a single word or phrase."


@register_dataset("pope")
@dataclass
class POPE(Benchmark):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/POPE", "lmms-lab-encoder/POPE"])
    split: str = "test"
    max_new_tokens: int = 128
    config: str | None = None  # "Full": one split per category (adversarial, popular, random)

    columns = ("id", "question", "answer", "image", "category")
    id_column = "id"  # question_id repeats across the three categories
    download = "the lmms-lab/POPE dataset (now lmms-lab-encoder/POPE)"
    generation_source = 'lmms_eval/tasks/pope/pope.yaml'

    def make_scorer(self):
        return YesNo(breakdown=("category",))

    def build(self, row: dict, sample_id: str) -> Sample:
        return Sample(id=sample_id, question=PROMPT.format(question=row["question"].strip()),
                      images=[image_input(row["image"])], answer=row["answer"],
                      meta={"category": row["category"], "question_id": row.get("question_id")})
