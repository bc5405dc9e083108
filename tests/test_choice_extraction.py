"""Multiple-choice answers read as a careful reader would (``tokenprune.data.scorers.extract_choice``).

One table of answer styles, English and Chinese, with the letter a careful reader takes (None: the answer names no
single option). It includes the four classes the extractor used to misread: "A" before a lower-case word taken for
the article ("A is correct"), hedges ("A and B" / "B or A": the first letter, in either order, as lmms-eval's
parsers do), a lower-case letter after an answer phrase ("answer: a"), and option text inside a Chinese sentence.
"""

import pytest

from tokenprune.data.scorers import MultipleChoice, extract_choice
from tokenprune.data.sample import Sample

EN = ["dog", "cat", "cat food", "bird"]  # A dog, B cat, C cat food, D bird
CN = ["红色", "绿色", "蓝色", "深红色"]  # A red, B green, C blue, D dark red ("红色" is inside "深红色")

STYLES = [
    # --- a letter alone -----------------------------------------------------------------------------------
    ("B", EN, "B"),
    ("(B)", EN, "B"),
    ("B.", EN, "B"),
    ("[B]", EN, "B"),
    ("b", EN, "B"),
    ("(c)", EN, "C"),
    ("**B**", EN, "B"),
    (" B\n", EN, "B"),
    ("'D'", EN, "D"),
    ("Ｂ", EN, "B"),                                      # full width
    ("E", EN, None),                                      # not one of the four options
    ("(E)", EN, None),
    # --- a letter with its text or a delimiter ---------------------------------------------------------------
    ("B. cat", EN, "B"),
    ("B) cat", EN, "B"),
    ("B: cat", EN, "B"),
    ("A. dog", EN, "A"),
    ("(A) dog", EN, "A"),
    ("C - cat food", EN, "C"),
    ("D, bird", EN, "D"),
    ("B\n\nThe animal has whiskers.", EN, "B"),
    # --- class 1: "A" before a lower-case word is a letter when the word follows letters only -------------
    ("A is correct", EN, "A"),
    ("A because it fits", EN, "A"),
    ("A would be my choice", EN, "A"),
    ("A seems right.", EN, "A"),
    ("C is correct", EN, "C"),
    ("C because it fits", EN, "C"),
    # ... and the article otherwise: the option text decides
    ("A cat", EN, "B"),
    ("A dog is shown.", EN, "A"),
    ("A cat food bowl", EN, "C"),
    ("A picture of something", EN, None),
    # --- class 2: hedges give their first letter, in either order ---------------------------------------------
    ("A and B", EN, "A"),
    ("B and A", EN, "B"),
    ("A or B", EN, "A"),
    ("B or A", EN, "B"),
    ("Either C or D", EN, "C"),
    ("The answer is A or B", EN, "A"),
    ("The answer is B or A", EN, "B"),
    ("a bird or a dog", EN, None),                        # two option texts, no letter: nothing
    # --- class 3: answer phrases, any case -------------------------------------------------------------------
    ("The answer is B", EN, "B"),
    ("The answer is (C).", EN, "C"),
    ("Answer: D", EN, "D"),
    ("answer: a", EN, "A"),
    ("The answer is b.", EN, "B"),
    ("ANSWER: c", EN, "C"),
    ("Answer:B", EN, "B"),
    ("The correct option is (d)", EN, "D"),
    ("Option B", EN, "B"),
    ("I choose B because it purrs.", EN, "B"),
    ("I'd go with C.", EN, "C"),
    ("My answer is \"A\".", EN, "A"),
    ("So the best option must be D.", EN, "D"),
    ("Final answer: (b)", EN, "B"),
    ("I think A is wrong; the answer is C.", EN, "C"),   # the phrase names the answer
    ("The answer is a dog.", EN, "A"),                   # "a" is the article: the option text "dog" decides
    ("The answer is cat", EN, "B"),
    # --- stand-alone letters in a sentence -------------------------------------------------------------------
    ("I think (A) is right", EN, "A"),                   # "I" is the pronoun
    ("I think it is D.", EN, "D"),
    ("It must be C, since cats eat it.", EN, "C"),
    ("cat", EN, "B"),
    ("cat food", EN, "C"),                               # the longer option, not "cat" inside it
    ("It is a bird.", EN, "D"),
    ("I don't know", EN, None),
    ("", EN, None),
    ("None of these.", EN, None),
    # --- Chinese ------------------------------------------------------------------------------------------------
    ("答案是B", CN, "B"),
    ("答案是Ｂ", CN, "B"),
    ("答案：C", CN, "C"),
    ("答案为（A）", CN, "A"),
    ("答案是b", CN, "B"),
    ("选C", CN, "C"),
    ("我选D。", CN, "D"),
    ("正确答案是A", CN, "A"),
    ("选项B正确", CN, "B"),
    ("B项", CN, "B"),
    ("我认为是C", CN, "C"),
    ("A和B", CN, "A"),                                    # hedge: the first letter
    ("B或A", CN, "B"),
    ("B、绿色", CN, "B"),
    ("D。深红色", CN, "D"),
    # class 4: option text inside a Chinese sentence
    ("答案是红色", CN, "A"),
    ("车是绿色的", CN, "B"),
    ("这是蓝色。", CN, "C"),
    ("答案是深红色", CN, "D"),                             # not "红色" inside it
    ("红色和绿色", CN, None),                               # two option texts: nothing
    ("我不知道", CN, None),
]


@pytest.mark.parametrize("prediction, options, expected", STYLES, ids=[repr(s[0]) for s in STYLES])
def test_extract_choice_reads_each_answer_style(prediction, options, expected):
    assert extract_choice(prediction, "ABCD", options) == expected


def test_the_table_covers_both_languages_and_every_class():
    chinese = [s for s in STYLES if any("\u4e00" <= ch <= "\u9fff" for ch in s[0])]
    assert len(STYLES) >= 60 and len(chinese) >= 15
    # the four classes the issue reported, as specified
    assert [extract_choice(p, "ABCD", EN) for p in ("A is correct", "A because it fits", "A would be my choice")] == ["A"] * 3
    assert extract_choice("A and B", "ABCD") == extract_choice("A or B", "ABCD") == "A"
    assert extract_choice("B and A", "ABCD") == extract_choice("B or A", "ABCD") == "B"
    assert extract_choice("answer: a", "ABCD") == "A" and extract_choice("The answer is b.", "ABCD") == "B"
    assert extract_choice("答案是红色", "ABCD", CN) == "A" and extract_choice("车是绿色的", "ABCD", CN) == "B"


def test_letters_beyond_the_options_and_the_pronoun_I():
    nine = [f"option {i}" for i in range(9)]  # A..I
    assert extract_choice("I", "ABCDEFGHI", nine) == "I"
    assert extract_choice("I think the answer is E", "ABCDEFGHI", nine) == "E"
    assert extract_choice("I is correct", "ABCDEFGHI", nine) == "I"
    assert extract_choice("F", "AB") is None


def test_multiple_choice_scores_with_the_extractor():
    sample = Sample(id="0", question="q", answer="B", choices=EN)
    assert MultipleChoice().score("B or A", sample) == 1.0 and MultipleChoice().score("A or B", sample) == 0.0
    assert MultipleChoice().score("answer: b", sample) == 1.0
