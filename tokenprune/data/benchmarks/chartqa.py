"""ChartQA test (2,500 questions about charts: human-written and augmented): relaxed accuracy (numbers within
5% of the answer, other answers by case-insensitive equality), overall and per split."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import register_dataset
from ..sample import Sample
from ..scorers import RelaxedAccuracy
from .hub import Benchmark, image_input

PROMPT = "{question}\nAnswer the question with a single word."
SPLIT_NAMES = {"human_test": "human", "augmented_test": "augmented"}


class ChartQAScore(RelaxedAccuracy):
    """lmms-eval's metric names: ``relaxed_overall``, ``relaxed_human_split``, ``relaxed_augmented_split``."""

    def __init__(self):
        super().__init__(headline="relaxed_overall", breakdown=("type",))

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        metrics = super().aggregate(records)
        return {(f"relaxed_{SPLIT_NAMES.get(k[5:], k[5:])}_split" if k.startswith("type/") else k): v
                for k, v in metrics.items()}


@register_dataset("chartqa")
@dataclass
class ChartQA(Benchmark):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/ChartQA", "lmms-lab-encoder/ChartQA"])
    split: str = "test"
    max_new_tokens: int = 16

    columns = ("type", "question", "answer", "image")
    download = "the lmms-lab/ChartQA dataset (now lmms-lab-encoder/ChartQA)"
    generation_source = 'lmms_eval/tasks/chartqa/chartqa.yaml'

    def make_scorer(self):
        return ChartQAScore()

    def build(self, row: dict, sample_id: str) -> Sample:
        return Sample(id=sample_id, question=PROMPT.format(question=row["question"]),
                      images=[image_input(row["image"])], answer=row["answer"], meta={"type": row["type"]})
