"""MMMU: loading both hub layouts, lmms-eval's prompt and image order, and MMMU's scoring (hand-worked examples).

Expected readings follow the rules of MMMU's evaluation as lmms-eval applies them (``lmms_eval/tasks/mmmu/utils.py``),
worked out by hand below; the one deliberate difference: where MMMU picks a random letter, tokenprune scores wrong.
"""

from pathlib import Path

import pytest

import fixtures_benchmarks as fb
from tokenprune.data import create_dataset
from tokenprune.data.base import DatasetError
from tokenprune.data.benchmarks.mmmu import (MMMUScore, open_correct, parse_choice, parse_open, referenced_images,
                                             subject_of)
from tokenprune.data.sample import Sample

OPTIONS = ["$10", "$20", "$30", "$40"]


pytestmark = pytest.mark.usefixtures("datasets_cache")


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mmmu")
    return {"subjects": fb.mmmu(root / "MMMU"), "lmms_lab": fb.mmmu_lmms_lab(root / "lmms-lab-MMMU")}


# ---------------------------------------------------------------------------------------------------------
# Multiple choice: MMMU's parser
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, expected", [
    ("B", "B"),                                    # " B ": a letter before a space
    ("B.", "B"),                                   # outer period stripped first
    ("(C)", "C"),                                  # bracketed
    ("The answer is (C).", "C"),
    ("A. $10", "A"),                               # no "A ": a letter before a period
    ("(A) is wrong, (B) is right", "B"),           # several bracketed: the last one
    ("I think B or C", "C"),                       # several before a space: the last " X "
    ("Between (D) and C the answer is (B)", "B"),  # brackets win over spaces; last bracketed
    ("The total of the column is exactly $30 in all", "C"),  # > 5 words, no letter: the option text
    ("It is $30", None),                           # <= 5 words: option texts are not read; MMMU would guess
    ("No idea", None),
    ("", None),
])
def test_multiple_choice_reading(response, expected):
    assert parse_choice(response, OPTIONS) == expected


# ---------------------------------------------------------------------------------------------------------
# Open questions: key phrases, numbers, containment
# ---------------------------------------------------------------------------------------------------------
def test_open_reading_of_numbers_and_key_phrases():
    # "the net income is $1,200." -> tail after "is " = "$1,200"; numbers 1,200 -> 1200.0 and 200 -> 200.0
    assert set(parse_open("The net income is $1,200.")) == {"$1,200", 1200.0, 200.0}
    # the shortest tail over the key phrases of a sentence: "so " gives "x = 4", "=" (last sentence) gives "4"
    assert parse_open("so x = 4") == [4.0]
    assert parse_open("7") == [7.0]
    assert parse_open("a") == [" a", "a "]                 # one character: padded against trivial matches


@pytest.mark.parametrize("answer, response, correct", [
    ("1,200", "1200", True),                       # numbers compare at two decimals
    ("1,200", "The net income is $1,200.", True),
    ("1,200", "1300", False),
    ("3.14159", "3.14", True),                     # round(3.14159, 2) == 3.14
    ("['3', 'three']", "There are three figures", True),   # a list answer: any reference
    ("['3', 'three']", "3", True),
    ("['3', 'three']", "four", False),
    ("Paris", "The capital is Paris", True),       # text: the reference inside the reading
    ("Paris", "London", False),
])
def test_open_answers(answer, response, correct):
    assert open_correct(answer, response) is correct


def test_scores_and_aggregates():
    scorer = MMMUScore()
    mc = Sample(id="validation_Accounting_1", question="q", answer="B", choices=OPTIONS,
                meta={"question_type": "multiple-choice", "subject": "Accounting", "domain": "Business"})
    op = Sample(id="validation_Art_1", question="q", answer="12", meta={"question_type": "open", "subject": "Art",
                                                                         "domain": "Art and Design"})
    assert scorer.score("(B)", mc) == 1.0 and scorer.score("A", mc) == 0.0 and scorer.score("", mc) == 0.0
    assert scorer.score("It is 12.", op) == 1.0 and scorer.score("13", op) == 0.0
    records = [{"score": 1.0, "error": None, "meta": mc.meta}, {"score": 0.0, "error": None, "meta": op.meta},
               {"score": 1.0, "error": None, "meta": op.meta}, {"score": None, "error": "oom", "meta": op.meta}]
    metrics = scorer.aggregate(records)
    assert metrics["accuracy"] == pytest.approx(200 / 3)   # over questions (MMMU's instance-level accuracy)
    assert metrics["domain/Business"] == 100.0 and metrics["subject/Art"] == 50.0
    assert metrics["question_type/open"] == 50.0


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def test_placeholders_name_the_images_in_order():
    assert referenced_images("<image 2> vs <image 1>\nA. <image 2>") == ["image_1", "image_2"]
    assert subject_of("validation_Art_Theory_12") == "Art_Theory"


@pytest.mark.parametrize("layout", ["subjects", "lmms_lab"])
def test_both_hub_layouts_give_the_same_samples(copies, layout):
    val = create_dataset("mmmu_val", **copies[layout])
    dev = create_dataset("mmmu_dev", **copies[layout])
    assert [s.id for s in val] == ["validation_Accounting_1", "validation_Accounting_2", "validation_Art_Theory_1"]
    assert [s.id for s in dev] == ["dev_Accounting_1", "dev_Art_Theory_1"]
    first = val[0]
    assert [image["bytes"] for image in first.images] == [fb.png(1)["bytes"], fb.png(2)["bytes"]]
    assert first.choices == ["the first", "the second"] and first.answer == "A"
    assert val[1].choices is None and val[1].answer == "1,200"
    # an option referencing an image brings that image too
    assert [image["bytes"] for image in dev[1].images] == [fb.png(4)["bytes"], fb.png(5)["bytes"]]


def test_subjects_select_and_errors_name_the_field(copies):
    assert [s.id for s in create_dataset("mmmu_val", subjects=["Art_Theory"], **copies["subjects"])] == \
        ["validation_Art_Theory_1"]
    assert [s.id for s in create_dataset("mmmu_val", subjects=["Art_Theory"], **copies["lmms_lab"])] == \
        ["validation_Art_Theory_1"]
    with pytest.raises(ValueError, match=r"mmmu_val.subjects must be null or a non-empty subset of .*unknown: \['Cooking'\]"):
        create_dataset("mmmu_val", subjects=["Cooking"], **copies["subjects"])
    with pytest.raises(DatasetError, match=r"has no subject\(s\) \['Physics'\]; it has \['Accounting', 'Art_Theory'\]"):
        create_dataset("mmmu_val", subjects=["Physics"], **copies["subjects"])
    with pytest.raises(DatasetError, match="dataset.split='test' is not a split"):
        create_dataset("mmmu_val", split="test", **copies["subjects"])


def test_a_missing_image_column_is_an_error_of_that_sample(copies, tmp_path):
    rows = fb.mmmu_rows("validation", "Math", [("See <image 3>.", [], "1", "open", {1: 0})])
    fb.write_table(tmp_path, "Math/validation-00000-of-00001.parquet", rows, fb.MMMU_FEATURES)
    fb.write_card(tmp_path, {"Math": {"validation": "Math/validation-*"}})
    dataset = create_dataset("mmmu_val", path=str(tmp_path))
    with pytest.raises(DatasetError, match="validation_Math_1 references <image 3> but has no image_3"):
        dataset[0]
