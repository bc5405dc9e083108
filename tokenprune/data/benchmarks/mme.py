"""MME (2,374 yes/no questions, two per image): per-category accuracy + accuracy+ (both questions of an image
right), summed into the perception (10 categories, max 2000) and cognition (4 categories, max 800) scores."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from ..base import Scorer, register_dataset
from ..sample import Sample
from ..scorers import parse_yes_no, percent, scored
from .hub import Benchmark, image_input

PROMPT = "{question}\nAnswer the question using a single word or phrase."
BUILT_IN_INSTRUCTION = " Please answer yes or no."  # replaced by the prompt's instruction, as lmms-eval does

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


class MMEScore(Scorer):
    """Per category: ``acc`` (percent of questions right) and ``acc_plus`` (percent of images with both
    questions right); the category score is their sum; perception and cognition sum their categories.

    Only complete pairs count: a question whose partner was not scored (left out by a subset, or an error
    record) is ignored and counted in ``unpaired_questions``. A group with no scored category is NaN.
    """

    headline = "perception_score"
    headline_unit = "points"
    headline_range = (0.0, 2000.0)  # 10 perception categories x (acc + acc+), 200 each

    def score(self, prediction: str, sample: Sample) -> float:
        return float(parse_yes_no(prediction) == str(sample.answer).lower().strip().replace(".", ""))

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        pairs = defaultdict(lambda: defaultdict(list))  # category -> question_id -> scores
        for record in scored(records):
            pairs[record["meta"]["category"]][record["meta"]["question_id"]].append(record["score"])
        categories, unpaired = {}, 0
        for category, questions in sorted(pairs.items()):
            complete = [scores for scores in questions.values() if len(scores) >= 2]
            unpaired += sum(len(scores) for scores in questions.values() if len(scores) < 2)
            if complete:
                acc = percent(s for scores in complete for s in scores)
                acc_plus = percent(float(all(s == 1.0 for s in scores)) for scores in complete)
                categories.update({f"{category}/acc": acc, f"{category}/acc_plus": acc_plus,
                                   f"{category}/score": acc + acc_plus})
        out = {}
        for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
            present = [categories[f"{c}/score"] for c in names if f"{c}/score" in categories]
            out[f"{group}_score"] = sum(present) if present else math.nan
        return {**out, "unpaired_questions": float(unpaired), **categories}


@register_dataset("mme")
@dataclass
class MME(Benchmark):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/MME", "lmms-lab-encoder/MME"])
    split: str = "test"
    max_new_tokens: int = 16

    columns = ("question_id", "question", "image", "answer", "category")
    download = "the lmms-lab/MME dataset (now lmms-lab-encoder/MME)"
    generation_source = 'lmms_eval/tasks/mme/mme.yaml'

    def make_scorer(self):
        return MMEScore()

    def groups(self, table) -> list:
        return list(table["question_id"])  # the two questions about one image

    def ids(self, table, rows: list[int]) -> list[str]:
        question_ids = list(table["question_id"])
        return [f"{question_ids[row]}#{row}" for row in rows]  # question_id is shared by the pair

    def build(self, row: dict, sample_id: str) -> Sample:
        question = row["question"].strip().replace(BUILT_IN_INSTRUCTION, "")
        return Sample(id=sample_id, question=PROMPT.format(question=question), images=[image_input(row["image"])],
                      answer=row["answer"], meta={"question_id": row["question_id"], "category": row["category"]})
