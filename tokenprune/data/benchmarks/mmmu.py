"""MMMU (Yue et al., CVPR 2024): college-level questions over 30 subjects, multiple choice and open, 1-7 images each.

``mmmu_val`` (900 questions) and ``mmmu_dev`` (150) with lmms-eval's default prompt and scoring (``lmms_eval/tasks/
mmmu/utils.py``, which follows the official MMMU evaluation): the question keeps its ``<image k>`` placeholders as
text, every image it (or its options) references comes first, in placeholder order; a multiple-choice answer is read
by MMMU's rules (a bracketed letter, then a letter before a space, then before a period, then in a long answer the text
of an option; several candidates: the one that occurs last), an open answer by MMMU's key-phrase and number parsing
(numbers to two decimals, text by containment). Accuracy is over questions, per subject and per domain too.

Two hub layouts load: lmms-eval's copy (``lmms-lab/MMMU``, one config, splits ``dev`` / ``validation`` / ``test``) and
the original ``MMMU/MMMU`` (one config per subject, each with the three splits).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..base import DatasetError, Scorer, register_dataset
from ..sample import Sample
from ..scorers import by_category, percent, scored
from .hub import Benchmark, image_input, load_split, local_configs, prepare

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, 8))
DOMAINS = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
SUBJECTS = tuple(sorted(subject for subjects in DOMAINS.values() for subject in subjects))
DOMAIN_OF = {subject: domain for domain, subjects in DOMAINS.items() for subject in subjects}


# ---------------------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------------------
def options_of(row: dict) -> list[str]:
    """The options (the hub stores the list as its Python repr); [] for open questions."""
    value = row.get("options")
    if isinstance(value, str):
        value = ast.literal_eval(value) if value.strip() else []
    return [str(option) for option in value or []]


def prompt(question: str, question_type: str, options: list[str]) -> str:
    if question_type == "multiple-choice":
        listed = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))
        return f"{question}\n{listed}\n\n{MC_INSTRUCTION}"
    return f"{question}\n\n{OPEN_INSTRUCTION}"


def referenced_images(text: str) -> list[str]:
    """The image columns the prompt's ``<image k>`` placeholders name, sorted, each once."""
    return sorted({f"image_{k}" for k in re.findall(r"<image (\d+)>", text)})


def subject_of(sample_id: str) -> str:
    """``validation_Art_Theory_12`` -> ``Art_Theory``."""
    match = re.fullmatch(r"[^_]+_(.+?)_\d+", sample_id)
    if not match:
        raise DatasetError(f"MMMU id {sample_id!r} is not <split>_<subject>_<number>")
    return match.group(1)


# ---------------------------------------------------------------------------------------------------------
# Scoring (MMMU's rules, as lmms-eval applies them)
# ---------------------------------------------------------------------------------------------------------
def parse_choice(response: str, options: list[str]) -> str | None:
    """The option letter MMMU's parser reads from ``response``, or None where it would pick one at random.

    Outer ``,.!?;:'`` are stripped one character kind after the other; then, in order: letters in brackets "(B)";
    letters before a space "B "; letters before a period "B."; only in an answer of more than five words, option
    texts (case-insensitive). Several candidates: the one occurring last ("(X)" for bracketed letters, " X " for
    the others, the option text for texts; a tie keeps the earlier letter)."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    for mark in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(mark)
    padded = f" {response} "
    candidates = [c for c in letters if f"({c})" in padded]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [c for c in letters if f"{c} " in padded]
    if not candidates:
        candidates = [c for c in letters if f"{c}." in padded]
    by_text = False
    if not candidates and len(padded.split()) > 5:
        candidates = [c for c, option in zip(letters, options) if option.lower() in padded.lower()]
        by_text = True
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        positions = [padded.lower().rfind(options[letters.index(c)].lower()) for c in candidates]
    elif bracketed:
        positions = [padded.rfind(f"({c})") for c in candidates]
    else:
        positions = [padded.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_open(text: str) -> list:
    """A number as [round(value, 2)]; text lower-cased; a single character padded (" x", "x ") against trivial
    matches."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def numbers_in(text: str) -> list[str]:
    """Numbers with thousands commas, in scientific notation and plain, in that order."""
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    plain = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return with_commas + scientific + plain


KEY_PHRASES = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def parse_open(response: str) -> list:
    """MMMU's reading of an open answer: per sentence, the shortest tail after a key phrase ("is ", "so ", "answer ",
    ...; the last sentence also after "="), else the whole answer; plus every number in those tails; normalised."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    tails = []
    for index, sentence in enumerate(sentences):
        phrases = KEY_PHRASES + (("=",) if index == len(sentences) - 1 else ())
        shortest = None
        for phrase in phrases:
            if phrase in sentence:
                tail = sentence.split(phrase)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in TRIVIAL:
            tails.append(shortest)
    if not tails:
        tails = [response]
    readings = tails + [number for tail in tails for number in numbers_in(tail)]
    normalized = []
    for reading in readings:
        normalized += normalize_open(reading)
    return list(dict.fromkeys(normalized))


def open_answers(answer) -> list:
    """The reference answers of an open question, normalised: one string, or a list written as its Python repr
    ("['1.5', '3/2']"; the official MMMU data keeps such answers as lists)."""
    if isinstance(answer, str) and answer.strip().startswith("["):
        try:
            answer = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            pass
    references = []
    for value in (answer if isinstance(answer, (list, tuple)) else [answer]):
        references += normalize_open(str(value))
    return references


def open_correct(answer, response: str) -> bool:
    """A text reading containing a text reference, or a number reading equal to a number reference."""
    references = open_answers(answer)
    for reading in parse_open(response):
        if isinstance(reading, str):
            if any(isinstance(ref, str) and ref in reading for ref in references):
                return True
        elif reading in references:
            return True
    return False


class MMMUScore(Scorer):
    """Per question 1 or 0 by MMMU's rules; accuracy over questions, per subject, domain and question type."""

    headline = "accuracy"

    def score(self, prediction: str, sample: Sample) -> float:
        if sample.meta.get("question_type") == "multiple-choice":
            return float(parse_choice(str(prediction or ""), sample.choices or []) == sample.answer)
        return float(open_correct(sample.answer, str(prediction or "")))

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        ok = scored(records)
        return {"accuracy": percent(r["score"] for r in ok),
                **by_category(ok, ("domain", "subject", "question_type"))}


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------
@dataclass
class MMMU(Benchmark):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/MMMU", "lmms-lab-encoder/MMMU"])
    split: str = "validation"
    max_new_tokens: int = 128
    subjects: list[str] | None = None  # null: every subject of the copy

    columns = ("id", "question", "options", "answer", "question_type")
    id_column = "id"
    image_columns = IMAGE_COLUMNS
    download = ("the lmms-lab/MMMU dataset (now lmms-lab-encoder/MMMU), or the original MMMU/MMMU (one config per "
                "subject)")
    generation_source = "lmms_eval/tasks/mmmu/_default_template_yaml"

    def check(self) -> None:
        if self.subjects is not None:
            self.subjects = list(self.subjects)
            unknown = [s for s in self.subjects if s not in SUBJECTS]
            if unknown or not self.subjects:
                raise ValueError(f"{self.name}.subjects must be null or a non-empty subset of {list(SUBJECTS)}; "
                                 f"unknown: {unknown}")

    def make_scorer(self):
        return MMMUScore()

    def load(self):
        """One table of the split: lmms-eval's single config, or the subject configs of MMMU/MMMU one after another."""
        import datasets

        configs = [c for c in (local_configs(Path(self.path)) if self.path else ()) if c in SUBJECTS]
        if not configs:
            table, source = load_split(self.name, self.path, self.hub_names, None, self.split)
            table = prepare(self.name, table, source, self.columns, self.image_columns)
            if self.subjects is not None:
                wanted = set(self.subjects)
                table = table.filter(lambda row: subject_of(row["id"]) in wanted)
            return table
        wanted = configs if self.subjects is None else self.subjects
        missing = [s for s in wanted if s not in configs]
        if missing:
            raise DatasetError(f"{self.name}: dataset.path={self.path!r} has no subject(s) {missing}; it has {configs}")
        parts = []
        for subject in wanted:
            table, source = load_split(self.name, self.path, self.hub_names, subject, self.split, config_required=True)
            parts.append(prepare(self.name, table, f"{source} (subject {subject})", self.columns, self.image_columns))
        return datasets.concatenate_datasets(parts)

    def build(self, row: dict, sample_id: str) -> Sample:
        options = options_of(row)
        text = prompt(row["question"], row["question_type"], options)
        images = []
        for column in referenced_images(text):
            image = image_input(row.get(column))
            if image is None:
                raise DatasetError(f"{self.name}: {sample_id} references <{column.replace('_', ' ')}> but has no {column}")
            images.append(image)
        subject = subject_of(sample_id)
        multiple_choice = row["question_type"] == "multiple-choice"
        return Sample(id=sample_id, question=text, images=images, answer=row["answer"],
                      choices=options if multiple_choice else None,
                      meta={"question_type": row["question_type"], "subject": subject,
                            "domain": DOMAIN_OF.get(subject, "unknown")})


@register_dataset("mmmu_val")
@dataclass
class MMMUVal(MMMU):
    split: str = "validation"


@register_dataset("mmmu_dev")
@dataclass
class MMMUDev(MMMU):
    split: str = "dev"

    generation_note = "lmms-eval has no dev task: the settings of its MMMU template"
