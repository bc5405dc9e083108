"""Scorers shared by the synthetic datasets and the benchmarks: exact match, VQA accuracy, multiple choice."""

from __future__ import annotations

import re
from statistics import mean

from .base import Scorer
from .sample import Sample

# ---------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_simple(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", str(text).lower()).split())


class ExactMatch(Scorer):
    """1 if the normalised prediction equals the normalised answer (or, with ``first_word``, its first word)."""

    def __init__(self, first_word: bool = False):
        self.first_word = first_word

    def score(self, prediction: str, sample: Sample) -> float:
        predicted = normalize_simple(prediction)
        if self.first_word:
            predicted = predicted.split(" ")[0] if predicted else ""
        answers = sample.answer if isinstance(sample.answer, (list, tuple)) else [sample.answer]
        return float(any(predicted == normalize_simple(a) for a in answers))


# EvalAI VQA normalisation (the official VQA evaluation script's rules, as lmms-eval applies them).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "somebodyd": "somebody'd", "somebodys": "somebody's", "someoned": "someone'd",
    "someones": "someone's", "somethingd": "something'd", "somethings": "something's", "thats": "that's",
    "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_VQA_PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!"]


def _process_punctuation(text: str) -> str:
    out = text
    for p in _VQA_PUNCTUATION:
        if (p + " " in text or " " + p in text) or (re.search(_COMMA_STRIP, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _process_digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa(text: str) -> str:
    """EvalAI's answer normalisation: punctuation, number words to digits, articles, contractions."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


class VQAAccuracy(Scorer):
    """VQA accuracy: min(1, #matching human answers / 3), averaged over the 10 leave-one-out subsets."""

    def score(self, prediction: str, sample: Sample) -> float:
        answers = [normalize_vqa(a) for a in (sample.answer if isinstance(sample.answer, (list, tuple)) else [sample.answer])]
        predicted = normalize_vqa(prediction)
        if len(answers) == 1:
            return float(predicted == answers[0])
        accuracies = []
        for held_out in range(len(answers)):
            others = answers[:held_out] + answers[held_out + 1:]
            accuracies.append(min(1.0, sum(a == predicted for a in others) / 3.0))
        return mean(accuracies)


# ---------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------
def extract_choice(prediction: str, letters: str = "ABCDE", options: list[str] | None = None) -> str | None:
    """The option letter a free-form answer picks: "B", "(B)", "B.", "B. cat", "The answer is B", "[B]",
    "Answer: B", "b)", or the text of exactly one option. None when no letter can be found."""
    text = str(prediction).strip()
    if not text:
        return None
    allowed = set(letters.upper())
    patterns = [
        r"^\(?\[?([A-Za-z])\]?\)?(?:[.:)\s]|$)",  # "B", "(B)", "[B]", "B.", "B)", "B: cat", "b"
        r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?\[?([A-Za-z])\]?\)?(?:[.:)\s,]|$)",  # "The answer is B"
        r"\(([A-Za-z])\)",  # "... (B) ..."
        r"(?:^|\s)([A-Z])(?:[.:)]|$)",  # "... B." at the end
    ]
    for pattern in patterns:
        for match in re.finditer(pattern, text, flags=re.IGNORECASE if "answer" in pattern or pattern.startswith("^") else 0):
            letter = match.group(1).upper()
            if letter in allowed and (pattern.startswith("^") or pattern.startswith("(?:answer") or match.group(1).isupper()):
                return letter
    if options:
        lowered = normalize_simple(text)
        hits = [letters[i] for i, option in enumerate(options) if normalize_simple(option) and normalize_simple(option) in lowered]
        if len(hits) == 1:
            return hits[0]
    return None


class MultipleChoice(Scorer):
    """1 if the extracted option letter equals the answer letter."""

    def score(self, prediction: str, sample: Sample) -> float:
        letters = "ABCDEFGH"[: len(sample.choices)] if sample.choices else "ABCDE"
        picked = extract_choice(prediction, letters, sample.choices)
        return float(picked is not None and picked == str(sample.answer).strip().upper())
