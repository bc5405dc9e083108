"""Scorers against hand-computed expectations: VQA accuracy and its normaliser, exact match, yes/no (MME, POPE),
multiple-choice letter extraction, MMBench circular accuracy, ChartQA relaxed accuracy, OCRBench."""

import math

import pytest

from tokenprune.data import Sample
from tokenprune.data.benchmarks.chartqa import ChartQAScore
from tokenprune.data.benchmarks.mme import MMEScore
from tokenprune.data.benchmarks.ocrbench import OCRBenchScore, ocrbench_match
from tokenprune.data.scorers import (ExactMatch, MultipleChoice, VQAAccuracy, YesNo, extract_choice, normalize_exact,
                                     normalize_vqa, parse_yes_no, relaxed_match)


def sample(answer, choices=None, **meta):
    return Sample(id="s", question="q", answer=answer, choices=choices, meta=meta)


def record(prediction, answer, score, error=None, **meta):
    return {"prediction": prediction, "answer": answer, "score": score, "error": error, "meta": meta}


# ---------------------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------------------
# 10 answers, k of them "2": each leave-one-out subset of 9 holds k - 1 matches when a match is held out
# (k of the 10 subsets) and k matches otherwise; accuracy = mean(min(1, matches / 3)).
#   k=0: 0;  k=1: (1*0 + 9*1/3)/10 = 0.3;  k=2: (2*1/3 + 8*2/3)/10 = 0.6;  k=3: (3*2/3 + 7*1)/10 = 0.9;
#   k=4: (4*1 + 6*1)/10 = 1.0
@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_number_of_matching_answers(matches, expected):
    answers = ["2"] * matches + ["7"] * (10 - matches)
    assert VQAAccuracy().score("2", sample(answers)) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, answer", [
    ("two", "2"),                 # number words become digits
    ("a dog", "dog"),             # articles dropped
    ("The Dog", "dog"),           # case
    ("yes.", "yes"),              # a trailing period
    ("Yes!", "yes"),              # other punctuation
    ("dont", "don't"),            # contractions
    ("1,000", "1000"),            # commas in numbers
    ("t-shirt", "t shirt"),       # a hyphen inside a word becomes a space
    ("red, white", "red white"),  # a comma next to a space is deleted
])
def test_vqa_normalisation_makes_equivalent_answers_match(prediction, answer):
    assert normalize_vqa(prediction) == normalize_vqa(answer)
    assert VQAAccuracy().score(prediction, sample([answer] * 10)) == 1.0


@pytest.mark.parametrize("text, expected", [
    ("Two dogs!", "2 dogs"), ("the t-shirt", "t shirt"), ("3.5", "3.5"), ("man's hat", "man 's hat"),
    ("hello, world", "hello world"), ("An apple", "apple"), ("Nokia.", "nokia"), ("  ten\tpast\n", "10 past"),
    ("(a) b", "b"),
])
def test_vqa_normaliser_outputs(text, expected):
    assert normalize_vqa(text) == expected


def test_vqa_accuracy_keeps_different_numbers_apart():
    assert VQAAccuracy().score("3.5", sample(["35"] * 10)) == 0.0
    assert VQAAccuracy().score("nokia phone", sample(["nokia"] * 10)) == 0.0


def test_vqa_accuracy_with_a_single_reference_is_exact_match():
    assert VQAAccuracy().score("Two", sample("2")) == 1.0
    assert VQAAccuracy().score("three", sample("2")) == 0.0


def test_accuracy_aggregate_leaves_error_records_out_and_breaks_down_by_category():
    records = [record("a", "a", 1.0, category="x"), record("b", "a", 0.0, category="x"),
               record("a", "a", 1.0, category="y"), record(None, "a", None, error="ModelInputError: gone", category="y")]
    assert VQAAccuracy().aggregate(records) == {"accuracy": pytest.approx(200 / 3)}
    assert ExactMatch(breakdown=("category",)).aggregate(records) == {
        "accuracy": pytest.approx(200 / 3), "category/x": 50.0, "category/y": 100.0}
    assert math.isnan(VQAAccuracy().aggregate([])["accuracy"])


# ---------------------------------------------------------------------------------------------------------
# Exact match (GQA: lmms-eval's exact_match with ignore_case and ignore_punctuation)
# ---------------------------------------------------------------------------------------------------------
def test_exact_match_with_deleted_punctuation():
    gqa = ExactMatch(punctuation="delete")
    assert normalize_exact(" Left. ") == "left"
    assert gqa.score("Left.", sample("left")) == 1.0
    assert gqa.score("t-shirt", sample("tshirt")) == 1.0
    assert gqa.score("t-shirt", sample("t shirt")) == 0.0  # deleted, not replaced by a space
    assert gqa.score("left side", sample("left")) == 0.0
    assert ExactMatch().score("t-shirt", sample("t shirt")) == 1.0  # the default replaces punctuation by spaces


def test_exact_match_first_word_for_the_synthetic_tasks():
    assert ExactMatch(first_word=True).score("Red object", sample("red")) == 1.0
    assert ExactMatch(first_word=True).score("", sample("red")) == 0.0
    with pytest.raises(ValueError, match="punctuation"):
        ExactMatch(punctuation="keep")


# ---------------------------------------------------------------------------------------------------------
# Yes / no: MME and POPE
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("Yes", "yes"), ("no.", "no"), ("Yes, there is a dog.", "yes"),
                                            ("No, there is not", "no"), ("Y", "yes"), ("n", "no"),
                                            ("maybe", "other"), ("Yeah", "other"), ("", "other")])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def mme_record(question_id, category, right):
    return record("Yes" if right else "No", "Yes", 1.0 if right else 0.0, question_id=question_id, category=category)


def test_mme_acc_plus_pairs_the_two_questions_of_an_image():
    records = [
        mme_record("e/1", "existence", True), mme_record("e/1", "existence", True),     # pair right
        mme_record("e/2", "existence", True), mme_record("e/2", "existence", False),    # pair half right
        mme_record("c/1", "count", False), mme_record("c/1", "count", False),           # pair wrong
        mme_record("k/1", "code_reasoning", True), mme_record("k/1", "code_reasoning", True),
        mme_record("k/2", "code_reasoning", True),                                       # partner missing
        {**mme_record("k/3", "code_reasoning", True), "score": None, "error": "ModelInputError: bad image"},
        mme_record("k/3", "code_reasoning", True),                                       # partner failed
    ]
    metrics = MMEScore().aggregate(records)
    # existence: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; count: 0 + 0; code_reasoning: only k/1 is complete -> 200
    assert metrics["existence/acc"] == 75.0
    assert metrics["existence/acc_plus"] == 50.0
    assert metrics["existence/score"] == 125.0
    assert metrics["count/score"] == 0.0
    assert metrics["code_reasoning/score"] == 200.0
    assert metrics["perception_score"] == 125.0
    assert metrics["cognition_score"] == 200.0
    assert metrics["unpaired_questions"] == 2.0
    assert MMEScore.headline == "perception_score"


def test_mme_score_parses_answers_and_reports_missing_groups_as_nan():
    assert MMEScore().score("Yes, it is.", sample("Yes")) == 1.0
    assert MMEScore().score("No", sample("Yes")) == 0.0
    assert MMEScore().score("I cannot tell", sample("No")) == 0.0
    metrics = MMEScore().aggregate([mme_record("e/1", "existence", True)] * 2)
    assert metrics["perception_score"] == 200.0 and math.isnan(metrics["cognition_score"])


def test_pope_accuracy_precision_recall_f1_and_yes_ratio():
    # category a: TP 3, FN 1, FP 1, TN 1; category b: TP 1, FP 1, TN 1, and one unparseable answer: wrong for
    # accuracy, and not a "yes" prediction for precision / recall / yes-ratio
    pairs_a = [("Yes", "yes")] * 3 + [("No", "yes"), ("Yes", "no"), ("No", "no")]
    pairs_b = [("yes.", "yes"), ("Yes", "no"), ("no", "no"), ("I am not sure", "no")]
    records = [record(p, a, YesNo().score(p, sample(a)), category=c)
               for c, pairs in (("a", pairs_a), ("b", pairs_b)) for p, a in pairs]
    records.append(record(None, "yes", None, error="ModelInputError: bad image", category="a"))
    metrics = YesNo().aggregate(records)
    # overall: TP 4, FP 2, FN 1, TN 2, other 1 -> accuracy 6/10, precision 4/6, recall 4/5, F1 = 2PR/(P+R) = 8/11
    assert metrics["accuracy"] == pytest.approx(60.0)
    assert metrics["precision"] == pytest.approx(200 / 3)
    assert metrics["recall"] == pytest.approx(80.0)
    assert metrics["f1"] == pytest.approx(800 / 11)
    assert metrics["yes_ratio"] == pytest.approx(60.0)
    # a: P 3/4, R 3/4, F1 3/4; b: P 1/2, R 1, F1 2/3
    assert metrics["category/a/f1"] == pytest.approx(75.0)
    assert metrics["category/b/f1"] == pytest.approx(200 / 3)
    assert metrics["category/b/yes_ratio"] == pytest.approx(50.0)
    assert metrics["f1_category_mean"] == pytest.approx((75.0 + 200 / 3) / 2)


def test_pope_f1_is_zero_without_positive_predictions():
    records = [record("no", "yes", 0.0), record("no", "no", 1.0)]
    assert YesNo(breakdown=()).aggregate(records) == {"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                     "yes_ratio": 0.0}


# ---------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------
OPTIONS = ["dog", "cat", "cat food", "bird"]


@pytest.mark.parametrize("prediction, expected", [
    ("B", "B"),                                   # 1  a bare letter
    ("(B)", "B"),                                 # 2  in parentheses
    ("B.", "B"),                                  # 3  with a period
    ("B. cat", "B"),                              # 4  letter and option text
    ("The answer is B", "B"),                     # 5  an answer phrase
    ("The answer is (C).", "C"),                  # 6  phrase and parentheses
    ("Answer: D", "D"),                           # 7  "Answer:"
    ("[B]", "B"),                                 # 8  brackets
    ("b", "B"),                                   # 9  lower case alone
    ("B) cat", "B"),                              # 10 closing parenthesis
    ("Option B", "B"),                            # 11 "Option"
    ("I choose B because it purrs.", "B"),        # 12 "I choose"
    ("**B**", "B"),                               # 13 markdown
    ("B: cat", "B"),                              # 14 colon
    (" B\n", "B"),                                # 15 whitespace
    ("答案是B", "B"),                              # 16 Chinese answer phrase
    ("So the best option must be D.", "D"),       # 17 a stand-alone letter at the end
    ("I think (A) is right", "A"),                # 18 the only bracketed letter
    ("cat", "B"),                                 # 19 the text of one option
    ("A cat", "B"),                               # 20 "A" is an article here: the option text decides
    ("cat food", "C"),                            # 21 the longer option, not "cat" inside it
    ("A. dog", "A"),                              # 22 "A" with a delimiter is the letter
    ("E", None),                                  # 23 not an option
    ("I don't know", None),                       # 24 nothing
    ("", None),                                   # 25 empty
    ("a bird or a dog", None),                    # 26 two options
])
def test_extract_choice_answer_styles(prediction, expected):
    assert extract_choice(prediction, "ABCD", OPTIONS) == expected


def test_multiple_choice_score_uses_the_answer_letter_and_the_number_of_options():
    two = ["yes", "no"]
    assert MultipleChoice().score("B. no", sample("B", two)) == 1.0
    assert MultipleChoice().score("C", sample("B", two)) == 0.0   # only A and B exist
    assert MultipleChoice().score("no", sample("B", two)) == 1.0
    assert MultipleChoice().score("The answer is A", sample("B", two)) == 0.0


def test_circular_accuracy_needs_every_rotation_right():
    records = [record("A", "A", 1.0, question=0, category="x"), record("C", "C", 1.0, question=0, category="x"),
               record("A", "A", 1.0, question=1, category="y"), record("B", "C", 0.0, question=1, category="y"),
               record("B", "B", 1.0, question=2, category="y"),
               record(None, "A", None, error="ModelInputError", question=3, category="y")]
    metrics = MultipleChoice(headline="circular_accuracy", circular_key="question", breakdown=("category",)).aggregate(records)
    # questions 0 and 2 right, 1 wrong (one rotation wrong), 3 has no scored record
    assert metrics == {"circular_accuracy": pytest.approx(200 / 3), "accuracy_per_record": 80.0,
                       "category/x": 100.0, "category/y": 50.0}


# ---------------------------------------------------------------------------------------------------------
# ChartQA and OCRBench
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction, target, expected", [
    ("10.4", "10", True), ("10.5", "10", True), ("10.6", "10", False), ("9.5", "10", True),   # within 5%
    ("12%", "0.12", True), ("12", "12%", False),                                               # percentages
    ("Apple", "apple", True), ("apples", "apple", False),                                      # text: equality
    ("0", "0", True), ("0.01", "0", False),                                                    # zero target: text
])
def test_relaxed_match(prediction, target, expected):
    assert relaxed_match(prediction, target) is expected


def test_chartqa_metric_names():
    records = [record("42", "42", 1.0, type="human_test"), record("7", "8", 0.0, type="human_test"),
               record("12%", "0.12", 1.0, type="augmented_test")]
    assert ChartQAScore().aggregate(records) == {"relaxed_overall": pytest.approx(200 / 3),
                                                 "relaxed_augmented_split": 100.0, "relaxed_human_split": 50.0}
    assert ChartQAScore().score("10.4", sample("10")) == 1.0


def test_ocrbench_match_rules():
    assert ocrbench_match("The word is STOP.", ["stop"], "IIIT5K")          # contained, case-insensitive
    assert ocrbench_match("ＳＴＯＰ", ["stop"], "IIIT5K")                      # full-width folded
    assert not ocrbench_match("STO", ["stop"], "IIIT5K")
    assert ocrbench_match("x^{2}", ["x ^ { 2 }"], "HME100k")               # formulas: spaces removed
    assert not ocrbench_match("X^{2}", ["x ^ { 2 }"], "HME100k")           # ... but case-sensitive


def test_ocrbench_final_score_counts_right_answers_per_type():
    records = [record("stop", ["stop"], 1.0, question_type="Regular Text Recognition"),
               record("go", ["stop"], 0.0, question_type="Regular Text Recognition"),
               record("x", ["x"], 1.0, question_type="Digit String Recognition"),
               record("1998", ["1998"], 1.0, question_type="Key Information Extraction")]
    metrics = OCRBenchScore().aggregate(records)
    assert metrics["final_score"] == 3.0
    assert metrics["accuracy"] == 75.0
    assert metrics["Text Recognition"] == 2.0
    assert metrics["Key Information Extraction"] == 1.0
    assert metrics["Doc-oriented VQA"] == 0.0
