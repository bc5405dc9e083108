"""TextVQA validation (5,000 questions about text in images), scored by VQA accuracy over 10 human answers."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import register_dataset
from ..sample import Sample
from ..scorers import VQAAccuracy
from .hub import Benchmark, image_input

PROMPT = "{question}\nAnswer the question using a single word or phrase."


@register_dataset("textvqa_val")
@dataclass
class TextVQA(Benchmark):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/textvqa", "lmms-lab-encoder/textvqa"])
    split: str = "validation"
    max_new_tokens: int = 1024
    stop: list[str] = field(default_factory=lambda: ['ASSISTANT:'])

    columns = ("question_id", "question", "image", "answers")
    id_column = "question_id"
    download = "the lmms-lab/textvqa dataset (now lmms-lab-encoder/textvqa)"
    generation_source = "lmms_eval/tasks/textvqa/_default_template_textvqa_yaml"
    generation_note = "the task sets no max_new_tokens: lmms-eval's llava_hf model default (1024) applies"

    def make_scorer(self):
        return VQAAccuracy()

    def build(self, row: dict, sample_id: str) -> Sample:
        # lmms-eval capitalises the question (str.capitalize also lower-cases the rest)
        return Sample(id=sample_id, question=PROMPT.format(question=row["question"].capitalize()),
                      images=[image_input(row["image"])], answer=list(row["answers"]),
                      meta={"question_id": row["question_id"]})
