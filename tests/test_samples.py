"""Issue 17, "one way to say how many samples": dataset.limit (+ dataset.seed) on every dataset with one meaning,
the old knobs aliased with a deprecation message, run.seed honoured, and the embedded comparison as a preset that
unrelated options keep."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import tokenprune as tp
import tokenprune.run.runner as runner_module
from tokenprune.data import available_datasets, dataset_class
from tokenprune.run.runner import build_plan, run_benchmark


def config(tmp_path: Path, *overrides: str):
    with initialize_config_module("tokenprune.conf", version_base=None):
        return compose("config", overrides=[f"run.output_dir={tmp_path}", "run.progress=false", *overrides])


@pytest.mark.parametrize("name", available_datasets())
def test_every_dataset_takes_limit_and_seed(name):
    fields = {f.name for f in dataclasses.fields(dataset_class(name))}
    assert {"limit", "seed"} <= fields


def test_limit_on_the_synthetic_datasets(tmp_path):
    assert len(build_plan(config(tmp_path, "dataset.limit=5")).indices) == 5
    assert len(build_plan(config(tmp_path, "dataset.limit=200")).indices) == 200  # the stream has no end
    video = build_plan(config(tmp_path, "model=tiny_qwen25vl", "dataset=synthetic_video", "dataset.limit=3"))
    assert [video.dataset.sample_id(i) for i in video.indices] == ["video-test-0-0", "video-test-0-1", "video-test-0-2"]


@pytest.mark.parametrize("old", ["run.n_samples", "dataset.n_samples"])
def test_the_old_knobs_are_aliases_that_say_so(tmp_path, caplog, old):
    with caplog.at_level(logging.WARNING, logger="tokenprune"):
        plan = build_plan(config(tmp_path, f"{old}=200"))
    assert len(plan.indices) == 200  # run.n_samples=200 used to be capped at 48 silently
    assert f"{old} is deprecated: use dataset.limit=200" in caplog.text


def test_limit_and_seed_mean_the_same_on_a_users_jsonl(tmp_path, caplog):
    from tokenprune.data.base import select_rows

    rows = [{"id": f"q{i}", "question": "what ?", "answer": "x"} for i in range(10)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def ids(*overrides):
        plan = build_plan(config(tmp_path, "dataset=jsonl", f"dataset.path={path}", *overrides))
        return [plan.dataset.sample_id(i) for i in plan.indices]

    assert ids("dataset.limit=3", "dataset.seed=null") == ["q0", "q1", "q2"]  # the first ones
    assert ids("dataset.limit=3", "dataset.seed=7") == [f"q{i}" for i in select_rows("jsonl", 10, 3, 7)]  # benchmarks'
    assert ids("dataset.limit=3", "dataset.seed=7") != ids("dataset.limit=3", "dataset.seed=8")
    with caplog.at_level(logging.WARNING, logger="tokenprune"):
        assert len(ids("dataset.limit=25")) == 10
    assert "dataset.limit=25 but jsonl has 10 samples: running all 10" in caplog.text


def test_run_seed_reaches_random_weights_seeded_methods_and_every_sample(tmp_path, monkeypatch):
    plan = build_plan(config(tmp_path, "run.seed=3", "method=random", "run.compare=[{name: random, keep_ratio: 0.25},"
                                                                      " {name: random, keep_ratio: 0.125, seed: 9}]"))
    assert [m.seed for m in plan.methods.values() if m.name == "random"] == [3, 3, 9]  # a given seed wins
    assert build_plan(config(tmp_path, "run.seed=3", "method=random", "method.seed=5")).methods["random(seed=5)"].seed == 5
    assert build_plan(config(tmp_path, "run.seed=3", "method=prunevid")).methods.popitem()[1].seed == 3
    assert "seed=3" in build_plan(config(tmp_path, "run.seed=3", "model.weights=random")).identity["model"]["checkpoint"]

    seen = []  # every sample starts from run.seed's random state, whatever ran before it
    monkeypatch.setattr(runner_module, "run_sample",
                        lambda vlm, plan, index, eos, baselines=None: seen.append(torch.rand(1).item()) or
                        {"index": index, "id": plan.dataset.sample_id(index), "error": "skipped", "runs": {}})
    run_benchmark(config(tmp_path / "run", "run.seed=3", "dataset.limit=2", "method=fastv"))
    torch.manual_seed(3)
    assert seen == [torch.rand(1).item()] * 2


@pytest.mark.parametrize("arguments,embedded", [
    ([], True), (["logger=wandb"], True), (["run.progress=false", "dataset.limit=5"], True),
    (["model=tiny_qwen25vl"], True), (["-m", "hydra/launcher=submitit_local", "logger=wandb"], True),
    (["method=pdrop"], False), (["method.keep_ratio=0.25"], False), (["run.compare=[random]"], False),
    (["experiment=embedded"], False), (["-m", "method=fastv,random"], False), (["--help"], False),
])
def test_the_embedded_comparison_does_not_depend_on_unrelated_options(tmp_path, arguments, embedded):
    from tokenprune.__main__ import with_default_experiment

    assert with_default_experiment(arguments) == (arguments + ["experiment=embedded"] if embedded else arguments)
    if embedded and "-m" not in arguments:
        plan = build_plan(config(tmp_path, *with_default_experiment(arguments)))
        assert len(plan.methods) == 13  # python -m tokenprune logger=wandb logs the same comparison
