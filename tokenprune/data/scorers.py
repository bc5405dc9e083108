"""Scorers shared by the synthetic datasets and the benchmarks.

Exact match, VQA accuracy (EvalAI normaliser), multiple choice (letter extraction), yes/no classification
(POPE-style accuracy / precision / recall / F1) and ChartQA's relaxed accuracy. Each scorer gives a per-sample
score in [0, 1]; ``aggregate`` turns scored records (``{"prediction", "answer", "score", "error", "meta"}``)
into the benchmark's metrics, in percent, with optional per-category breakdowns read from ``record["meta"]``.
Records with an error are left out of every metric (the runner counts them).
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from statistics import mean

from .base import Scorer
from .sample import Sample


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------
def scored(records: list[dict]) -> list[dict]:
    """The records that have a score (no error)."""
    return [r for r in records if r.get("error") is None and r.get("score") is not None]


def percent(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else math.nan


def by_category(records: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    """Mean score in percent per value of each ``meta`` key: ``{"<key>/<value>": accuracy}``."""
    metrics = {}
    for key in keys:
        groups = defaultdict(list)
        for record in records:
            value = (record.get("meta") or {}).get(key)
            if value is not None:
                groups[str(value)].append(record["score"])
        metrics.update({f"{key}/{value}": percent(scores) for value, scores in sorted(groups.items())})
    return metrics


class _Accuracy(Scorer):
    """Mean per-sample score (percent) under ``headline``, plus per-category breakdowns."""

    def __init__(self, breakdown: tuple[str, ...] = (), headline: str = "accuracy"):
        self.breakdown = tuple(breakdown)
        self.headline = headline

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        ok = scored(records)
        return {self.headline: percent(r["score"] for r in ok), **by_category(ok, self.breakdown)}


def _answers(sample: Sample) -> list[str]:
    return list(sample.answer) if isinstance(sample.answer, (list, tuple)) else [sample.answer]


# ---------------------------------------------------------------------------------------------------------
# Exact match
# ---------------------------------------------------------------------------------------------------------
_PUNCTUATION = re.compile(r"[^\w\s]")
_STRIP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_simple(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", str(text).lower()).split())


def normalize_exact(text: str) -> str:
    """Lower case, ASCII punctuation deleted, outer whitespace stripped: the ``exact_match`` metric of
    Hugging Face ``evaluate`` with ``ignore_case`` and ``ignore_punctuation`` (lmms-eval's GQA metric)."""
    return str(text).lower().translate(_STRIP_PUNCTUATION).strip()


class ExactMatch(_Accuracy):
    """1 if the normalised prediction equals a normalised reference answer.

    ``punctuation="space"`` replaces punctuation by spaces and collapses whitespace; ``"delete"`` deletes it
    (``normalize_exact``). ``first_word`` compares only the first word of the prediction.
    """

    def __init__(self, first_word: bool = False, punctuation: str = "space", breakdown: tuple[str, ...] = (),
                 headline: str = "accuracy"):
        super().__init__(breakdown, headline)
        if punctuation not in ("space", "delete"):
            raise ValueError(f"ExactMatch punctuation must be 'space' or 'delete', got {punctuation!r}")
        self.first_word = first_word
        self.normalize = normalize_simple if punctuation == "space" else normalize_exact

    def score(self, prediction: str, sample: Sample) -> float:
        predicted = self.normalize(prediction)
        if self.first_word:
            predicted = predicted.split()[0] if predicted.split() else ""
        return float(any(predicted == self.normalize(a) for a in _answers(sample) if a is not None))


# ---------------------------------------------------------------------------------------------------------
# VQA accuracy (EvalAI's answer normalisation, as the official VQA evaluation and lmms-eval apply it)
# ---------------------------------------------------------------------------------------------------------
# The official table, quirks included ("somebody'd" maps to "somebodyd"; capitalised keys never match
# because the text is lower-cased first), so that scores equal the official script's.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern (a period not before a digit)
_VQA_PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!"]


def _process_punctuation(text: str) -> str:
    out = text
    for p in _VQA_PUNCTUATION:
        # a mark next to a space is deleted; one inside a word ("t-shirt") becomes a space
        out = out.replace(p, "" if (p + " " in text or " " + p in text) else " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)  # sic: the official call passes re.UNICODE as count


def _process_digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa(text: str) -> str:
    """EvalAI's answer normalisation: lower case; commas, question marks and most punctuation removed;
    periods not inside numbers removed; number words to digits; articles dropped; contractions fixed."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


class VQAAccuracy(_Accuracy):
    """VQA accuracy: min(1, #matching human answers / 3), averaged over the leave-one-out subsets of the
    reference answers (10 for TextVQA / VQAv2); a single reference answer is scored by exact match."""

    def score(self, prediction: str, sample: Sample) -> float:
        answers = [normalize_vqa(a) for a in _answers(sample) if a is not None]
        predicted = normalize_vqa(prediction)
        if len(answers) <= 1:
            return float(bool(answers) and predicted == answers[0])
        accuracies = []
        for held_out in range(len(answers)):
            others = answers[:held_out] + answers[held_out + 1:]
            accuracies.append(min(1.0, sum(a == predicted for a in others) / 3.0))
        return mean(accuracies)


# ---------------------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)
# ---------------------------------------------------------------------------------------------------------
def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed correctness: numbers within ``tolerance`` relative error of a non-zero target
    ("12%" reads as 0.12); anything else by case-insensitive string equality."""
    predicted, expected = _to_float(prediction), _to_float(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= tolerance
    return prediction.lower() == target.lower()


class RelaxedAccuracy(_Accuracy):
    """1 if ``relaxed_match`` holds for any reference answer."""

    def __init__(self, tolerance: float = 0.05, breakdown: tuple[str, ...] = (), headline: str = "relaxed_accuracy"):
        super().__init__(breakdown, headline)
        self.tolerance = tolerance

    def score(self, prediction: str, sample: Sample) -> float:
        return float(any(relaxed_match(str(prediction), str(a), self.tolerance) for a in _answers(sample)))


# ---------------------------------------------------------------------------------------------------------
# Yes / no (MME, POPE)
# ---------------------------------------------------------------------------------------------------------
def parse_yes_no(prediction: str) -> str:
    """"yes", "no" or "other" (MME's rule): periods removed; "yes" / "no"; a lone "y" / "n"; otherwise "yes"
    or "no" within the first four characters ("Yes, there is", "No."), else "other"."""
    text = str(prediction).lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


class YesNo(Scorer):
    """Binary yes/no questions (POPE): accuracy, precision / recall / F1 of "yes" (the positive class) and the
    ratio of "yes" predictions, overall and per category; answers are parsed with ``parse_yes_no``.

    F1 is pooled over all records (lmms-eval's definition); ``f1_category_mean`` averages the per-category F1
    as the LLaVA / POPE papers report it. ``yes_ratio`` counts predictions (POPE's definition).
    """

    def __init__(self, breakdown: tuple[str, ...] = ("category",), headline: str = "f1"):
        self.breakdown = tuple(breakdown)
        self.headline = headline

    def score(self, prediction: str, sample: Sample) -> float:
        return float(parse_yes_no(prediction) == parse_yes_no(sample.answer))

    @staticmethod
    def metrics(records: list[dict]) -> dict[str, float]:
        if not records:
            return {k: math.nan for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        predicted = [parse_yes_no(r["prediction"]) == "yes" for r in records]
        actual = [parse_yes_no(r["answer"]) == "yes" for r in records]
        tp = sum(p and a for p, a in zip(predicted, actual))
        fp = sum(p and not a for p, a in zip(predicted, actual))
        fn = sum(a and not p for p, a in zip(predicted, actual))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"accuracy": percent(r["score"] for r in records), "precision": 100.0 * precision,
                "recall": 100.0 * recall, "f1": 100.0 * f1, "yes_ratio": percent(predicted)}

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        ok = scored(records)
        out = self.metrics(ok)
        for key in self.breakdown:
            groups = defaultdict(list)
            for record in ok:
                value = (record.get("meta") or {}).get(key)
                if value is not None:
                    groups[str(value)].append(record)
            per_group = {value: self.metrics(group) for value, group in sorted(groups.items())}
            for value, metrics in per_group.items():
                out.update({f"{key}/{value}/{name}": v for name, v in metrics.items()})
            if key == "category":
                out["f1_category_mean"] = mean(m["f1"] for m in per_group.values()) if per_group else math.nan
        return out


# ---------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------
# Full-width letters and punctuation (Chinese answers) read as their ASCII forms.
_FULL_WIDTH = str.maketrans({**{chr(0xFF21 + i): chr(0x41 + i) for i in range(26)},
                             **{chr(0xFF41 + i): chr(0x61 + i) for i in range(26)},
                             "（": "(", "）": ")", "【": "[", "】": "]", "：": ":", "，": ",", "；": ";", "！": "!",
                             "？": "?", "“": '"', "”": '"', "‘": "'", "’": "'"})
_OPEN = r"[\s(\[{<\"']*"
_CLOSE = r"[\s)\]}>\"'.,:;!?。、]*"
_LONE = re.compile(_OPEN + r"([A-Za-z])" + _CLOSE)
_WORD_CHAR = re.compile(r"[A-Za-z0-9_'-]")  # letters glued to these are part of a word ("A-level", "it's")
# Words that follow an option letter in a sentence but never follow the article "a" or the pronoun "I":
# "A is correct", "A because it fits", "A would be my choice", "A and B", "I or J".
_AFTER_LETTER = frozenset(
    "is was are were be being been would will should could might may must can seems seem appears looks fits "
    "matches describes corresponds answers best because since as and or nor but so then vs versus only also too "
    "here".split())
_PHRASE = re.compile(
    r"(?i:\b(?:(?:the\s+|my\s+|your\s+)?(?:final\s+|correct\s+|best\s+|right\s+|most\s+likely\s+)?"
    r"(?:answer|option|choice)s?(?:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be|seems\s+to\s+be|"
    r"appears\s+to\s+be|here\s+is))?"
    r"|i\s+(?:would\s+|will\s+|'d\s+|'ll\s+)?(?:choose|select|pick|go\s+(?:with|for))"
    r"|choose|select|pick)\b"
    r"|正确答案是|正确答案为|正确答案|正确的选项是|正确选项是|答案应该是|答案应为|答案是|答案为|答案|答|应该选|应选择|应选|选择|选项|我选|故选|选)"
    r"\s*[:=]?[\s(\[{<\"']*(?:(?i:option)\s+|选项\s*)?([A-Za-z])")


def _reads_as_option(text: str, start: int, lower_case: bool) -> bool:
    """Whether the letter at ``text[start]`` stands alone as an option letter.

    It must not be glued to a word ("Bird", "it's", "X-ray"); in brackets it always is one ("(a)"). An upper-case
    "A" or "I" followed by a lower-case word is the article or the pronoun ("A cat", "I think") unless the word is
    one that follows option letters only ("A is correct", "A because ...", "A or B"). A lower-case letter
    (``lower_case``) counts only at the end of the text or before punctuation ("answer: a", "is b.").
    """
    before, after = text[start - 1: start], text[start + 1:]
    if (before and _WORD_CHAR.match(before)) or (after and _WORD_CHAR.match(after[0])):
        return False
    if before in ("(", "[", "{", "<") and after[:1] in (")", "]", "}", ">"):
        return True
    letter = text[start]
    rest = after.lstrip(" \t")
    if letter.islower():
        return lower_case and (not rest or rest[0] in ".,:;!?)]}>\"'\n。、")
    word = re.match(r"\s+([a-z][A-Za-z]*)", after)
    return not (letter in "AI" and word and word.group(1).lower() not in _AFTER_LETTER)


def extract_choice(prediction: str, letters: str = "ABCDE", options: list[str] | None = None) -> str | None:
    """The option letter a free-form answer picks, or None (it never guesses).

    Read in order, as a careful reader would:

    1. the answer is a letter alone: "B", "(B)", "b", "**B**", "[B].", "Ｂ";
    2. an answer phrase names a letter: "The answer is B", "answer: a", "The correct option is (C)", "I choose B",
       "答案是B", "选C", "正确答案：Ｄ" (lower case only at the end or before punctuation: "the answer is a dog" is
       not option A);
    3. the first stand-alone letter: "B. cat", "C because ...", "A is correct", "我认为是B"; a hedge ("A or B",
       "B and A") gives its first letter, as lmms-eval's parsers do; "A cat" and "I think" are an article and a
       pronoun, not options;
    4. the text of exactly one option, inside English or Chinese text ("cat", "答案是红色"; "cat food" rather than
       "cat" inside it).

    Letters outside ``letters`` are never returned.
    """
    text = str(prediction or "").translate(_FULL_WIDTH).replace("*", "").replace("`", "").strip()
    allowed = letters.upper()
    if not text:
        return None
    lone = _LONE.fullmatch(text)
    if lone:
        letter = lone.group(1).upper()
        return letter if letter in allowed else None
    for match in _PHRASE.finditer(text):
        if match.group(1).upper() in allowed and _reads_as_option(text, match.start(1), lower_case=True):
            return match.group(1).upper()
    for match in re.finditer(r"[A-Z]", text):
        if match.group(0) in allowed and _reads_as_option(text, match.start(), lower_case=False):
            return match.group(0)
    if options:
        return _match_option_text(text, letters, options)
    return None


def _match_option_text(text: str, letters: str, options: list[str]) -> str | None:
    answer = normalize_simple(text)
    texts = {letters[i]: normalize_simple(o) for i, o in enumerate(options[: len(letters)]) if normalize_simple(o)}
    exact = [letter for letter, option in texts.items() if option == answer]
    if len(exact) == 1:
        return exact[0]
    # Bounded by anything but a Latin letter or digit, so that an option matches inside a Chinese sentence
    # ("答案是红色") but "red" does not match inside "reddish".
    hits = [letter for letter, option in texts.items()
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(option)}(?![A-Za-z0-9])", answer)]
    # "cat food" also contains "cat": keep the options no other hit contains
    hits = [h for h in hits if not any(h != o and texts[h] in texts[o] for o in hits)]
    return hits[0] if len(hits) == 1 else None


class MultipleChoice(_Accuracy):
    """1 if the option letter extracted from the prediction equals the answer letter.

    ``sample.answer`` is the letter; ``sample.choices`` the option texts (their count sets the allowed letters).
    With ``circular_key``, ``aggregate`` also reports MMBench's circular accuracy: a question counts as right
    only if every one of its records (the same question with rotated options, grouped by that ``meta`` key)
    is right; breakdowns then count questions the same way.
    """

    def __init__(self, breakdown: tuple[str, ...] = (), headline: str = "accuracy", circular_key: str | None = None):
        super().__init__(breakdown, headline)
        self.circular_key = circular_key

    def score(self, prediction: str, sample: Sample) -> float:
        letters = "ABCDEFGHIJ"[: len(sample.choices)] if sample.choices else "ABCDE"
        picked = extract_choice(prediction, letters, sample.choices)
        return float(picked is not None and picked == str(sample.answer).strip().upper())

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        if self.circular_key is None:
            return super().aggregate(records)
        ok = scored(records)
        questions = defaultdict(list)
        for record in ok:
            questions[record["meta"][self.circular_key]].append(record)
        merged = [{"score": float(all(r["score"] == 1.0 for r in group)), "meta": group[0].get("meta") or {}}
                  for group in questions.values()]
        return {self.headline: percent(r["score"] for r in merged), "accuracy_per_record": percent(r["score"] for r in ok),
                **by_category(merged, self.breakdown)}
