"""Every benchmark runs end to end through ``python -m tokenprune dataset=<name> dataset.path=<copy>`` on the tiny
models, from a tiny local copy in its real format; a missing video becomes an error record, not a failed run.

The parametrised test executes the ``tokenprune.__main__`` module in this process (what ``python -m`` runs,
without paying the interpreter start-up per benchmark); one test runs the real command in a subprocess.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

import fixtures_benchmarks as fb
from tokenprune.data import create_dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("tokenprune.__main__") is None,
                       reason="the runner (python -m tokenprune) is not there yet"),
]

BENCHMARKS = sorted(fb.BUILDERS)


@pytest.fixture(scope="module", autouse=True)
def fast_process(one_torch_thread):
    """One torch thread (tiny models are latency-bound). The runner collects garbage after every generation;
    frozen long-lived objects (everything the test session has imported) keep each collection from walking the
    whole heap of this process."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def copies(tmp_path_factory, datasets_cache) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("benchmark_copies")
    return {name: fb.build(name, root / name) for name in BENCHMARKS}


def command(name: str, overrides: dict, run_dir: Path) -> list[str]:
    model = "tiny_qwen25vl" if name in fb.VIDEO_BENCHMARKS else "tiny_llava"
    overrides = {"limit": 2, "seed": "null", **overrides}  # the first two samples
    return [f"dataset={name}", *(f"dataset.{key}={value}" for key, value in overrides.items()), f"model={model}",
            "method=fastv", "run.max_new_tokens=2", f"hydra.run.dir={run_dir}"]


def run_in_process(arguments: list[str], monkeypatch, exit_code: int | None = None) -> None:
    """``python -m tokenprune`` in this process; it must end normally, or with ``exit_code``."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["tokenprune", *arguments])
    try:
        runpy.run_module("tokenprune", run_name="__main__", alter_sys=False)
    except SystemExit as exit:  # a configuration error (2), or no sample scored (3)
        if exit.code != exit_code:
            pytest.fail(f"python -m tokenprune exited with {exit.code}")
        return
    assert exit_code is None, f"python -m tokenprune should have exited with {exit_code}"


def test_a_missing_video_dir_stops_the_command_with_a_clear_error(copies, tmp_path, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["tokenprune", *command("egoschema", {"path": copies["egoschema"]["path"]}, tmp_path)])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("tokenprune", run_name="__main__", alter_sys=False)
    assert exit.value.code == 2
    assert "configuration error: dataset=egoschema: egoschema needs dataset.video_dir" in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    return records, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_end_to_end(copies, name, tmp_path, monkeypatch):
    run_in_process(command(name, copies[name], tmp_path), monkeypatch)
    records, summary = read_run(tmp_path)
    assert len(records) == 2 and all(r["error"] is None for r in records)
    assert all(run["error"] is None and 0.0 <= run["score"] <= 1.0 for r in records for run in r["runs"].values())
    assert summary["dataset"] == name
    headline = create_dataset(name, **copies[name]).scorer.headline
    for label in ("baseline", "fastv"):
        entry = summary["methods"][label]
        assert entry["headline"] == headline and headline in entry["metrics"]
        assert entry["scored"] == 2


def test_a_missing_video_is_an_error_record(copies, tmp_path, monkeypatch):
    video_dir = tmp_path / "videos"
    shutil.copytree(copies["videomme"]["video_dir"], video_dir)
    (video_dir / "data" / "fFjv93ACGo8.mp4").unlink()  # the video of the first two questions
    overrides = {**copies["videomme"], "video_dir": str(video_dir), "seed": "null"}
    run_in_process(command("videomme", overrides, tmp_path / "run"), monkeypatch, exit_code=3)  # nothing scored
    records, summary = read_run(tmp_path / "run")
    assert [r["id"] for r in records] == ["001-1", "001-2"]
    assert all("video file not found" in r["error"] and "fFjv93ACGo8.mp4" in r["error"] for r in records)
    assert summary["methods"]["baseline"]["errors"] == 2


def test_the_command_line_in_a_subprocess(copies, datasets_cache, tmp_path):
    environment = {**os.environ, "HF_DATASETS_CACHE": str(datasets_cache), "HF_HUB_OFFLINE": "1",
                   "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    arguments = command("textvqa_val", copies["textvqa_val"], tmp_path)
    result = subprocess.run([sys.executable, "-m", "tokenprune", *arguments], env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(tmp_path)
    assert [r["id"] for r in records] == ["34602", "34603"]
    assert summary["methods"]["fastv"]["headline"] == "accuracy"
