"""OCRBench (1,000 OCR questions in 10 types): a prediction is right when it contains a reference answer; the
final score is the number right (out of 1,000 on the full benchmark), with per-type counts."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from ..base import Scorer, register_dataset
from ..sample import Sample
from ..scorers import percent, scored
from .hub import Benchmark, image_input

RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
               "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
OTHER_TYPES = ("Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
               "Handwritten Mathematical Expression Recognition")
FORMULA_SOURCE = "HME100k"  # handwritten formulas: compared with all spaces removed, case-sensitively


def fold_fullwidth(text: str) -> str:
    """Full-width ASCII (U+FF01-U+FF5E) to ASCII, the ideographic space to a space."""
    return "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else " " if c == "\u3000" else c for c in text)


def ocrbench_match(prediction: str, answers: list[str], source: str | None) -> bool:
    prediction = str(prediction).strip()
    if source == FORMULA_SOURCE:
        squeeze = lambda text: text.strip().replace("\n", " ").replace(" ", "")  # noqa: E731
        return any(squeeze(answer) in squeeze(prediction) for answer in answers)
    normal = lambda text: fold_fullwidth(text).lower().strip().replace("\n", " ")  # noqa: E731
    return any(normal(answer) in normal(prediction) for answer in answers)


class OCRBenchScore(Scorer):
    headline = "final_score"
    headline_unit = "answers"
    headline_range = (0.0, 1000.0)  # one point per question

    def score(self, prediction: str, sample: Sample) -> float:
        answers = sample.answer if isinstance(sample.answer, list) else [sample.answer]
        return float(ocrbench_match(prediction, [str(a) for a in answers], sample.meta.get("dataset")))

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        ok = scored(records)
        counts = defaultdict(float)
        for record in ok:
            counts[record["meta"]["question_type"]] += record["score"]
        recognition = sum(counts[t] for t in RECOGNITION)
        return {"final_score": sum(counts.values()) if ok else math.nan,
                "accuracy": percent(r["score"] for r in ok),
                "Text Recognition": recognition,
                **{t: counts[t] for t in RECOGNITION + OTHER_TYPES},
                **{t: v for t, v in counts.items() if t not in RECOGNITION + OTHER_TYPES}}


@register_dataset("ocrbench")
@dataclass
class OCRBench(Benchmark):
    hub_names: list[str] = field(default_factory=lambda: ["echo840/OCRBench"])
    split: str = "test"
    max_new_tokens: int = 128

    columns = ("dataset", "question", "question_type", "answer", "image")
    download = "the echo840/OCRBench dataset"
    generation_source = 'lmms_eval/tasks/ocrbench/ocrbench.yaml'

    def make_scorer(self):
        return OCRBenchScore()

    def build(self, row: dict, sample_id: str) -> Sample:
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        return Sample(id=sample_id, question=row["question"].strip(), images=[image_input(row["image"])],
                      answer=[str(a) for a in answers],
                      meta={"question_type": row["question_type"], "dataset": row["dataset"]})
