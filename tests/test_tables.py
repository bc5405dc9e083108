"""Measured tables cannot go stale: each is rendered from committed data, and that data is re-measured in part.

``benchmarks/_tables.py`` explains the mechanism; ``make tables`` regenerates everything (``make tables-render`` only
re-renders). Two checks: every table between ``<!-- table:<name> -->`` markers in README.md and docs/ equals what its
committed data (``docs/tables/<source>.json``) renders to, so a hand edit fails; and every source re-measures a cheap
deterministic part (``quick=True``: the first sample of each run, token counts, FLOPs, a stored policy's score) that
must equal the committed records, timings and memory aside.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _tables  # noqa: E402

_tables.discover()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_table_is_what_its_committed_data_renders_to():
    assert _tables.render_differences() == []


@pytest.mark.parametrize("name", sorted(_tables.SOURCES))
def test_committed_data_is_current(name):
    assert _tables.stale_records(name) == []


# ---------------------------------------------------------------------------------------------------------
# The checks themselves
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def copy_of_the_docs(tmp_path, monkeypatch):
    """README.md, docs/ and the data files copied to a scratch root the checks read instead of the repository."""
    shutil.copy(_tables.ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(_tables.ROOT / "docs", tmp_path / "docs")
    monkeypatch.setattr(_tables, "ROOT", tmp_path)
    monkeypatch.setattr(_tables, "DATA_DIR", tmp_path / "docs" / "tables")
    return tmp_path


def test_a_hand_edited_number_fails_and_re_rendering_restores_it(copy_of_the_docs):
    readme = copy_of_the_docs / "README.md"
    text = readme.read_text()
    start = text.index("<!-- table:embedded -->")
    row = text.index("| baseline |", start)
    cell = text.index("(accuracy)", row)
    edited = text[:cell - 6] + "99.9 " + text[cell - 1:]  # the baseline's score, edited by hand
    assert edited != text
    readme.write_text(edited)
    problems = _tables.render_differences()
    assert len(problems) == 1 and "table 'embedded' in README.md differs" in problems[0]
    assert _tables.write_tables() == ["embedded"] and readme.read_text() == text
    assert _tables.render_differences() == []


def test_a_marker_without_a_table_and_a_table_without_a_marker_fail(copy_of_the_docs):
    docs = copy_of_the_docs / "docs" / "datasets.md"
    docs.write_text(docs.read_text() + "\n<!-- table:nobody -->\n| x |\n<!-- /table:nobody -->\n")
    readme = copy_of_the_docs / "README.md"
    text = readme.read_text()
    start, end = text.index("<!-- table:tiny_models -->"), text.index("<!-- /table:tiny_models -->")
    readme.write_text(text[:start] + text[end + len("<!-- /table:tiny_models -->"):])
    problems = _tables.render_differences()
    assert "marker 'nobody' in docs/datasets.md has no registered table" in problems
    assert "table 'tiny_models' has no marker pair in README.md / docs/" in problems


def test_a_stale_record_fails_and_volatile_keys_are_ignored(copy_of_the_docs, monkeypatch):
    stored = {"meta": {}, "records": [{"key": "a", "tokens": 10, "ms": 1.0}, {"key": "b", "tokens": 20, "ms": 2.0}]}
    (copy_of_the_docs / "docs" / "tables" / "toy.json").write_text(_tables.dumps(stored))
    now = {"tokens": 10}
    monkeypatch.setitem(_tables.SOURCES, "toy", _tables.Source(
        "toy", lambda quick: {"records": [{"key": "a", "ms": 7.5, **now}]}, volatile=("ms",)))
    assert _tables.stale_records("toy") == []  # another timing: not a difference
    now["tokens"] = 11
    assert _tables.stale_records("toy") == ["toy: record \"a\" differs in ['tokens']: now [11], committed [10]"]


def test_a_tolerance_accepts_float_noise_and_nothing_more(copy_of_the_docs, monkeypatch):
    stored = {"meta": {}, "records": [{"key": "a", "kl": 8.598925e-07, "tokens": 10}]}
    (copy_of_the_docs / "docs" / "tables" / "toy.json").write_text(_tables.dumps(stored))
    now = {"kl": 8.569216e-07, "tokens": 10}  # 0.35 % lower: a summation order changed
    monkeypatch.setitem(_tables.SOURCES, "toy", _tables.Source(
        "toy", lambda quick: {"records": [{"key": "a", **now}]}, tolerance={"kl": 0.01}))
    assert _tables.stale_records("toy") == []
    now["kl"] = 8.4e-07  # 2.3 % lower: stale
    assert _tables.stale_records("toy") == ["toy: record \"a\" differs in ['kl']: now [8.4e-07], committed [8.598925e-07]"]
    now["kl"], now["tokens"] = 8.569216e-07, 11  # the tolerance is per key: other fields stay exact
    assert _tables.stale_records("toy") == ["toy: record \"a\" differs in ['tokens']: now [11], committed [10]"]


def test_data_files_read_back_as_written():
    data = {"meta": {"date": "x"}, "records": [{"key": [1, "a"], "value": 1 / 3, "nan": float("nan")}], "n": 2}
    text = _tables.dumps(data)
    assert json.loads(text)["records"][0] == {"key": [1, "a"], "value": 0.3333333, "nan": None}
    assert _tables.dumps(json.loads(text)) == text
    assert len(text.splitlines()) == 7  # one record per line: diffs stay readable
