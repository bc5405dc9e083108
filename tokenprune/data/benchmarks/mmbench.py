"""MMBench dev, English (``mmbench_en``) and Chinese (``mmbench_cn``): multiple choice with circular evaluation.

The dev split holds each question several times with its options rotated (``index`` = question + k * 10^6);
a question counts as right only when every copy is right (MMBench's "circular" accuracy, its headline). Answers
are matched by letter extraction, not by the GPT matcher lmms-eval calls for free-form answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import register_dataset
from ..sample import Sample
from ..scorers import MultipleChoice
from .hub import Benchmark, image_input

OPTION_LETTERS = "ABCDE"
OPTIONS_HEADER = "There are several options:"
INSTRUCTIONS = {
    "en": "\nAnswer with the option's letter from the given choices directly.",
    "cn": "\n请直接使用所提供的选项字母作为答案回答。",
}
CIRCULAR = 1_000_000


def _present(value) -> bool:
    return value is not None and str(value) not in ("", "nan", "None")


def prompt(row: dict, language: str) -> tuple[str, list[str]]:
    """The lmms-eval prompt (hint, question, "There are several options:" and the lettered options, then the
    instruction after a blank line) and the option texts."""
    options = [(letter, row[letter]) for letter in OPTION_LETTERS if letter in row and _present(row[letter])]
    listing = "\n".join([OPTIONS_HEADER] + [f"{letter}. {text}" for letter, text in options])
    query = f"{row['hint']} {row['question']} {listing}" if _present(row.get("hint")) else f"{row['question']} {listing}"
    return f"{query}\n{INSTRUCTIONS[language]}", [str(text) for _, text in options]


@dataclass
class MMBench(Benchmark):
    split: str = "dev"

    columns = ("index", "question", "hint", "A", "B", "answer", "category", "image")
    id_column = "index"
    language = "en"

    def make_scorer(self):
        return MultipleChoice(headline="circular_accuracy", circular_key="question", breakdown=("category", "l2_category"))

    def groups(self, table) -> list:
        return [int(index) % CIRCULAR for index in table["index"]]

    def build(self, row: dict, sample_id: str) -> Sample:
        question, choices = prompt(row, self.language)
        return Sample(id=sample_id, question=question, images=[image_input(row["image"])],
                      answer=str(row["answer"]).strip(), choices=choices,
                      meta={"question": int(row["index"]) % CIRCULAR, "category": row["category"],
                            "l2_category": row.get("L2-category", row.get("l2-category"))})


@register_dataset("mmbench_en")
@dataclass
class MMBenchEN(MMBench):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/MMBench", "lmms-lab-encoder/MMBench"])
    config: str | None = "en"
    max_new_tokens: int = 1024
    stop: list[str] = field(default_factory=lambda: ["ASSISTANT:"])

    generation_source = "lmms_eval/tasks/mmbench/_default_template_mmbench_en_yaml"

    language = "en"
    download = "the lmms-lab/MMBench dataset (now lmms-lab-encoder/MMBench), config en"


@register_dataset("mmbench_cn")
@dataclass
class MMBenchCN(MMBench):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/MMBench", "lmms-lab-encoder/MMBench"])
    config: str | None = "cn"
    max_new_tokens: int = 256

    generation_source = "lmms_eval/tasks/mmbench/_default_template_mmbench_cn_yaml"

    language = "cn"
    download = "the lmms-lab/MMBench dataset (now lmms-lab-encoder/MMBench), config cn"
