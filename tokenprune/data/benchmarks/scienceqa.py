"""ScienceQA-IMG (2,017 test questions with an image): multiple choice, answered with the option's letter."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import register_dataset
from ..sample import Sample
from ..scorers import MultipleChoice
from .hub import Benchmark, image_input

LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


def prompt(hint: str | None, question: str, choices: list[str]) -> str:
    context = f"Context: {hint}\n" if hint else ""
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{context}{question}\n{options}{INSTRUCTION}"


@register_dataset("scienceqa_img")
@dataclass
class ScienceQAImg(Benchmark):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/ScienceQA", "lmms-lab-encoder/ScienceQA"])
    config: str | None = "ScienceQA-IMG"
    split: str = "test"
    max_new_tokens: int = 16

    columns = ("image", "question", "choices", "answer", "hint")
    download = "the lmms-lab/ScienceQA dataset (now lmms-lab-encoder/ScienceQA), config ScienceQA-IMG"
    generation_source = 'lmms_eval/tasks/scienceqa/scienceqa_img.yaml'

    def make_scorer(self):
        return MultipleChoice(breakdown=("subject",))

    def build(self, row: dict, sample_id: str) -> Sample:
        choices = list(row["choices"])
        image = image_input(row["image"])
        return Sample(id=sample_id, question=prompt(row["hint"], row["question"], choices),
                      images=[image] if image is not None else [], answer=LETTERS[int(row["answer"])],
                      choices=choices, meta={"subject": row.get("subject")})
