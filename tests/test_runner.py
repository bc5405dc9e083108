"""The runner (issue 3): default run, sweeps, crash safety, fault isolation, memory, determinism, bad
configurations, W&B offline logging, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

import tokenprune as tp
import wandb_reader
from tokenprune.methods.base import LayerStep, Selection
from tokenprune.methods.fastv import FastV
from tokenprune.run.results import read_records
from tokenprune.run.runner import ConfigError, build_plan, run_benchmark

VOLATILE = {"timing", "memory"}  # wall-clock and memory readings differ between runs


def config(tmp_path: Path, *overrides: str):
    with initialize_config_module("tokenprune.conf", version_base=None):
        return compose("config", overrides=[f"run.output_dir={tmp_path}", "run.progress=false", *overrides])


def cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "tokenprune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def stable(records: list[dict]) -> list[dict]:
    """Records without timing / memory readings."""
    cleaned = []
    for record in records:
        record = dict(record)
        record["runs"] = {label: {k: v for k, v in run.items() if k not in VOLATILE}
                          for label, run in record["runs"].items()}
        cleaned.append(record)
    return cleaned


# ---------------------------------------------------------------------------------------------------------
# 1. the default command
# ---------------------------------------------------------------------------------------------------------
def test_default_command_prints_the_comparison_table(tmp_path):
    result = cli("dataset.limit=3", f"hydra.run.dir={tmp_path}", cwd=tmp_path)  # no method named: experiment=embedded
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    for label in ("baseline", "random(keep_ratio=0.25)", "uniform(keep_ratio=0.125)", "fastv(keep_ratio=0.25)",
                  "pdrop(layers=[1,2,3],ratios=[0.25,0.125,0.0625])"):
        assert f"| {label} |" in table, table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["samples"] == 3 and len(summary["methods"]) == 13
    assert len(read_records(tmp_path)) == 3


def test_no_argument_command_uses_the_embedded_table(tmp_path):
    from tokenprune.__main__ import with_default_experiment

    assert len(build_plan(config(tmp_path, *with_default_experiment([]))).methods) == 13
    assert list(build_plan(config(tmp_path, *with_default_experiment(["method=fastv"]))).methods) == ["baseline", "fastv"]


# ---------------------------------------------------------------------------------------------------------
# 2. sweeps and the report
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_multirun_writes_one_directory_per_job_and_the_report_merges_them(tmp_path, launcher):
    args = ["-m", "method=fastv,random", "dataset.limit=2", "run.progress=false",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    if launcher == "submitit_local":
        args += ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"]
    result = cli(*args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    job_dirs = sorted(p.parent for p in (tmp_path / "sweep").rglob("results.jsonl"))
    assert len(job_dirs) == 2
    job_methods = sorted(label for d in job_dirs for label in json.loads((d / "summary.json").read_text())["methods"])
    assert job_methods == ["baseline", "baseline", "fastv", "random"]
    report = subprocess.run([sys.executable, "-m", "tokenprune.report", str(tmp_path / "sweep"), "--out",
                             str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| fastv | 0_tiny_llava_dataset.limit=2,method=fastv |" in text
    assert "| random | 1_tiny_llava_dataset.limit=2,method=random |" in text
    assert text.count("| baseline |") == 1  # both jobs' baselines gave the same per-sample scores: one row
    # the sweep printed the same table at its end (the Hydra callback)
    from tokenprune.run.report import tables

    combined = tables([tmp_path / "sweep"])
    assert combined in result.stdout and combined in text
    for png in ("tokens", "flops", "deltas"):
        image = Image.open(tmp_path / "report" / f"tiny_llava_synthetic_image_{png}.png")
        assert image.size[0] > 100


# ---------------------------------------------------------------------------------------------------------
# 3. crash safety and 6. determinism
# ---------------------------------------------------------------------------------------------------------
def test_sigkill_midway_then_rerun_gives_every_sample_exactly_once(tmp_path):
    args = ["method=fastv", "dataset.limit=10", "run.progress=false"]
    reference = cli(*args, f"hydra.run.dir={tmp_path / 'reference'}", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    crashed = tmp_path / "crashed"
    env = dict(os.environ, WANDB_MODE="offline")
    process = subprocess.Popen([sys.executable, "-m", "tokenprune", *args, f"hydra.run.dir={crashed}"], cwd=tmp_path,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = crashed / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if results.exists() and len(results.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(results.read_text().splitlines())
    assert 3 <= written < 10, "the run should have been killed part-way"
    with results.open("a") as handle:  # a line cut short by the kill
        handle.write('{"index": 9, "id": "test-0-9", "runs": {"basel')

    resumed = cli(*args, f"hydra.run.dir={crashed}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_records(crashed)
    assert [r["index"] for r in records] == list(range(10))
    assert len({r["id"] for r in records}) == 10
    assert stable(records) == stable(read_records(tmp_path / "reference"))


def test_same_seed_gives_identical_results(tmp_path):
    for name in ("a", "b"):
        run_benchmark(config(tmp_path / name, "method=random", "method.keep_ratio=0.25", "dataset.limit=4"))
    assert stable(read_records(tmp_path / "a")) == stable(read_records(tmp_path / "b"))


def test_rerun_with_a_different_configuration_is_refused(tmp_path):
    run_benchmark(config(tmp_path, "dataset.limit=1"))
    with pytest.raises(ValueError, match="holds results of a different run .*methods"):
        run_benchmark(config(tmp_path, "dataset.limit=1", "method.keep_ratio=0.25"))


# ---------------------------------------------------------------------------------------------------------
# 4. fault isolation
# ---------------------------------------------------------------------------------------------------------
@dataclass
class OutOfMemoryOnce(FastV):
    """FastV that runs out of memory on the prefill of one chosen sample (the one with a longer prompt)."""

    trigger_length = -1  # prompt length of the chosen sample (a class attribute, not a field)

    def select(self, step: LayerStep) -> Selection:
        if step.layout.length == self.trigger_length:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().select(step)


@pytest.fixture
def faulty_dataset(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        name = f"image{i}.png"
        Image.fromarray((rng.random((84, 84, 3)) * 255).astype("uint8")).save(tmp_path / name)
        rows.append({"id": f"s{i}", "question": "what colour is the square ?", "answer": "red", "image": name})
    (tmp_path / "image1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated garbage")  # corrupt image
    rows[3]["image"] = "missing.png"  # missing file
    rows[4]["question"] = "what colour is the yellow square at the top ?"  # longer prompt: triggers the OOM
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_samples_and_out_of_memory_are_recorded_and_the_run_goes_on(tmp_path, faulty_dataset):
    out = tmp_path / "out"
    cfg = config(out, "dataset=jsonl", f"dataset.path={faulty_dataset}", "method=fastv")
    plan = build_plan(cfg)
    oom = OutOfMemoryOnce()
    oom.trigger_length = tp.load_model("tiny_llava", weights="random", device="cpu").prepare(plan.dataset[4]).layout.length
    plan.methods = {"baseline": plan.methods["baseline"], "oom": oom}
    run_benchmark(cfg, plan=plan)
    records = {r["id"]: r for r in read_records(out)}
    assert sorted(records) == ["s0", "s1", "s2", "s3", "s4"]
    assert "cannot read image" in records["s1"]["error"] and records["s1"]["runs"] == {}
    assert "image file not found" in records["s3"]["error"]
    assert records["s4"]["error"] is None
    assert records["s4"]["runs"]["oom"]["error"].startswith("out of memory")
    assert records["s4"]["runs"]["baseline"]["score"] is not None  # the other method still scored
    for sample in ("s0", "s2"):
        for run in records[sample]["runs"].values():
            assert run["error"] is None and run["score"] in (0.0, 1.0)
    summary = json.loads((out / "summary.json").read_text())["methods"]
    assert summary["oom"]["errors"] == 3 and summary["baseline"]["errors"] == 2


# ---------------------------------------------------------------------------------------------------------
# 5. memory does not grow with samples
# ---------------------------------------------------------------------------------------------------------
def _rss() -> int:
    from tokenprune.run.measure import current_rss_bytes

    return current_rss_bytes()


def test_memory_is_flat_over_100_alternating_runs(tmp_path):
    """RSS after 100 alternating baseline / FastV samples is within 2 % of RSS after the first 20 (the warm-up:
    allocator pools, lazily built kernels). 100 runs, not more: the suite's time budget; a leak of a sample's
    inputs, cache or report per run exceeds the margin well before that."""
    from tokenprune.run.measure import measure_generation, release_memory

    vlm = tp.load_model("tiny_llava", weights="random", device="cpu")
    dataset = tp.data.create_dataset("synthetic_image", limit=100)
    methods = [tp.methods.create("baseline"), tp.methods.create("fastv", keep_ratio=0.25)]
    readings = {}
    for index in range(100):
        inputs = vlm.prepare(dataset[index])
        measure_generation(vlm, inputs, methods[index % 2], max_new_tokens=2)
        del inputs
        release_memory()
        if index + 1 in (20, 100):
            readings[index + 1] = _rss()
    assert readings[100] <= readings[20] * 1.02, readings


@pytest.mark.gpu
def test_gpu_memory_returns_to_the_same_value_after_each_sample():
    from tokenprune.run.measure import measure_generation, release_memory

    vlm = tp.load_model("tiny_qwen25vl", weights="random", device="cuda")
    dataset = tp.data.create_dataset("synthetic_image", limit=20)
    methods = [tp.methods.create("baseline"), tp.methods.create("fastv", keep_ratio=0.25)]
    allocated = []
    for index in range(20):
        inputs = vlm.prepare(dataset[index])
        measure_generation(vlm, inputs, methods[index % 2], max_new_tokens=2)
        del inputs
        release_memory()
        allocated.append(torch.cuda.memory_allocated())
    assert len(set(allocated[2:])) == 1, allocated


# ---------------------------------------------------------------------------------------------------------
# 7. bad configuration fails at start-up
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,pattern", [
    (["model.name=llava99"], "model='llava99' is unknown; available models: .*tiny_llava"),
    (["method.name=fastvv"], "method: unknown method 'fastvv'; available methods: .*pdrop"),
    (["dataset.name=textvqa_vall"], "dataset='textvqa_vall' is unknown; available datasets: .*synthetic_image"),
    (["model=qwen25vl_7b"], "model.path is required for model=qwen25vl_7b"),
    (["run.n_samples=-3"], "run.n_samples must be an integer >= 0 or null, got -3"),
    (["method.keep_ratio=1.5"], "fastv.keep_ratio must be a number in \\(0, 1\\]"),
    (["dataset.n_samples=-1"], "dataset.n_samples must be an integer >= 0"),
    (["dataset.limit=-1"], "synthetic_image.limit must be an integer >= 0"),
    (["model=tiny_qwen25vl", "model.video.fps=-1"], "model.video.fps must be a positive number"),
    (["model=tiny_qwen25vl", "model.video.fps=2", "model.video.nframes=8"], "give fps or nframes, not both"),
])
def test_bad_configuration_is_refused_before_loading_anything(tmp_path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_plan(config(tmp_path, *overrides))


def test_bad_configuration_from_the_command_line(tmp_path):
    result = cli("model=qwen25vl_7b", f"hydra.run.dir={tmp_path}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "configuration error: model.path is required for model=qwen25vl_7b" in result.stderr
    unknown_group = cli("method=fastvv", f"hydra.run.dir={tmp_path}", cwd=tmp_path, timeout=120)
    assert unknown_group.returncode != 0 and "fastv" in unknown_group.stderr  # Hydra lists the group's options


# ---------------------------------------------------------------------------------------------------------
# 8. W&B offline
# ---------------------------------------------------------------------------------------------------------
def test_wandb_offline_run_holds_the_summary_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_benchmark(config(tmp_path, "logger=wandb", "dataset.limit=2"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_files = list(runs[0].glob("run-*.wandb"))  # the file a later `wandb sync` uploads
    assert len(run_files) == 1
    summary = wandb_reader.summary(run_files[0])
    expected = json.loads((tmp_path / "summary.json").read_text())["methods"]
    assert summary["baseline/accuracy"] == pytest.approx(expected["baseline"]["metrics"]["accuracy"])
    assert summary["fastv/visual_tokens_layer_mean"] == pytest.approx(expected["fastv"]["visual_tokens_layer_mean"])
    assert summary["fastv/tflops"] == pytest.approx(expected["fastv"]["flops"]["tokenprune"] / 1e12)
    assert list((runs[0] / "files" / "media" / "table").glob("samples_*.table.json"))  # per-sample table
    assert list((runs[0] / "files" / "media" / "images").glob("pareto_*.png"))  # the Pareto plot
