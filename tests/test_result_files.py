"""Issue 17, "result files that stay right": the run directory lock, damaged lines, retrying error records,
duplicate and malformed lines in a user's jsonl, runs in which nothing scored, empty questions, 16-bit images."""

from __future__ import annotations

import io
import json
import logging
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from tokenprune.models.images import load_images
from tokenprune.run.results import read_records
from tokenprune.run.runner import ConfigError, build_plan, run_benchmark

RESULTS_FILE, DAMAGED_FILE = "results.jsonl", "results.damaged.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(tmp_path: Path, *overrides: str):
    with initialize_config_module("tokenprune.conf", version_base=None):
        return compose("config", overrides=[f"run.output_dir={tmp_path}", "run.progress=false",
                                            "run.max_new_tokens=1", *overrides])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def image(path: Path) -> str:
    Image.fromarray((np.random.default_rng(0).random((84, 84, 3)) * 255).astype("uint8")).save(path)
    return path.name


# ---------------------------------------------------------------------------------------------------------
# one writer per run directory
# ---------------------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    from tokenprune.run.results import ResultStore, RunDirectoryBusy

    holder = ResultStore(tmp_path, {"run": 1})
    try:
        with pytest.raises(RunDirectoryBusy, match=f"is being written by another tokenprune process \\(pid "
                                                   f"{os.getpid()} on {os.uname().nodename}, since .*\\)"):
            ResultStore(tmp_path, {"run": 1})
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):  # the runner says so before any model work
            run_benchmark(config(tmp_path, "dataset.limit=1"))
        assert not (tmp_path / RESULTS_FILE).exists()
    finally:
        holder.close()
    ResultStore(tmp_path, {"run": 1}).close()  # released: the next writer gets it


# ---------------------------------------------------------------------------------------------------------
# a damaged line keeps every valid record
# ---------------------------------------------------------------------------------------------------------
def test_a_damaged_line_mid_file_keeps_every_valid_record(tmp_path, caplog, capsys):
    cfg = config(tmp_path, "method=random", "dataset.limit=4")
    run_benchmark(cfg)
    lines = (tmp_path / RESULTS_FILE).read_text().splitlines()
    before = {json.loads(line)["id"]: json.loads(line) for line in lines}
    damaged = lines[1][: len(lines[1]) // 2]  # a line cut in the middle of the file
    (tmp_path / RESULTS_FILE).write_text("\n".join([lines[0], damaged, *lines[2:]]) + "\n")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="tokenprune"):
        run_benchmark(cfg)
    assert "resumed: 3 of 4 samples done" in capsys.readouterr().out
    assert "1 damaged line(s) (line 2) moved to results.damaged.jsonl; 3 valid records kept" in caplog.text
    after = {r["id"]: r for r in read_records(tmp_path)}
    assert sorted(after) == sorted(before)
    rerun = json.loads(lines[1])["id"]
    for sample_id in before:  # the valid records were kept as they were (timings included): not recomputed
        assert (after[sample_id] == before[sample_id]) == (sample_id != rerun)
    assert (tmp_path / DAMAGED_FILE).read_text() == damaged + "\n"
    assert len((tmp_path / RESULTS_FILE).read_text().splitlines()) == 4


# ---------------------------------------------------------------------------------------------------------
# retrying error records; empty questions
# ---------------------------------------------------------------------------------------------------------
def test_retry_errors_replaces_error_records_and_an_empty_question_warns(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    path = write_jsonl(data / "samples.jsonl", [
        {"id": "empty", "question": "", "answer": "red", "image": image(data / "a.png")},
        {"id": "late", "question": "what colour is the square ?", "answer": "red", "image": "later.png"}])
    overrides = ["dataset=jsonl", f"dataset.path={path}", "method=fastv"]
    with caplog.at_level(logging.WARNING, logger="tokenprune"):
        run_benchmark(config(tmp_path / "run", *overrides))
    assert "sample empty: the question is empty" in caplog.text
    assert "image file not found" in {r["id"]: r for r in read_records(tmp_path / "run")}["late"]["error"]

    image(data / "later.png")  # the file has appeared since
    run_benchmark(config(tmp_path / "run", *overrides))  # a plain resume keeps the error record
    assert {r["id"]: r for r in read_records(tmp_path / "run")}["late"]["error"] is not None
    run_benchmark(config(tmp_path / "run", *overrides, "run.retry_errors=true"))
    records = [json.loads(line) for line in (tmp_path / "run" / RESULTS_FILE).read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["empty", "late"]  # replaced, not duplicated
    late = next(r for r in records if r["id"] == "late")
    assert late["error"] is None and all(run["score"] is not None for run in late["runs"].values())


# ---------------------------------------------------------------------------------------------------------
# a user's jsonl: duplicate ids, malformed lines
# ---------------------------------------------------------------------------------------------------------
def test_duplicate_sample_ids_are_refused_at_load(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "question": "q", "answer": "x"},
                                                {"id": "b", "question": "q", "answer": "x"},
                                                {"id": "a", "question": "q", "answer": "y"}])
    with pytest.raises(ConfigError, match="sample ids must be unique .*repeated: 'a' \\(lines 1 and 3\\)"):
        build_plan(config(tmp_path, "dataset=jsonl", f"dataset.path={path}"))


def test_a_malformed_line_names_the_file_and_the_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "x"}, '{"question": "q", "answer"',
                                                {"question": "q", "answer": "x"}])
    with pytest.raises(ConfigError, match="bad.jsonl:2: not valid JSON"):
        build_plan(config(tmp_path, "dataset=jsonl", f"dataset.path={path}"))


# ---------------------------------------------------------------------------------------------------------
# nothing scored: a non-zero exit with the errors by kind
# ---------------------------------------------------------------------------------------------------------
def test_a_run_in_which_no_sample_scored_exits_non_zero(tmp_path, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["tokenprune", "dataset=synthetic_video", "model=tiny_llava", "method=fastv",
                                      "dataset.limit=2", "run.progress=false", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("tokenprune", run_name="__main__", alter_sys=False)
    captured = capsys.readouterr()
    assert exit.value.code == 3
    assert "no sample was scored (2 samples); errors by kind: ModelInputError × 2" in captured.err
    assert "errors by kind: ModelInputError × 2" in captured.out
    assert len(read_records(tmp_path)) == 2


# ---------------------------------------------------------------------------------------------------------
# 16-bit images
# ---------------------------------------------------------------------------------------------------------
def test_a_16_bit_image_keeps_its_grey_levels(tmp_path):
    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)  # black .. white
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    (tmp_path / "grey16.png").write_bytes(buffer.getvalue())
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    for source in (str(tmp_path / "grey16.png"), {"bytes": buffer.getvalue()}, Image.open(io.BytesIO(buffer.getvalue()))):
        rgb = np.asarray(load_images([source])[0])
        assert rgb.shape == (4, 4, 3)
        assert rgb[0, :, 0].tolist() == [0, 64, 128, 255]  # levels / 257, not clipped at 255 (white)
