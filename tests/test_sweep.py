"""Issue 17: a sweep checks every job's configuration before the first job starts (the Hydra callback), so one
bad value stops the sweep at once instead of halfway; the budget-sweep preset expands to its jobs."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

ROOT = Path(__file__).resolve().parents[1]


def test_a_bad_value_in_a_sweep_stops_it_before_the_first_job(tmp_path, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["tokenprune", "-m", "method.keep_ratio=0.5,abc", "dataset.limit=1",
                                      "run.progress=false", f"hydra.sweep.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("tokenprune", run_name="__main__", alter_sys=False)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert "configuration error in 1 of 2 sweep jobs; nothing was started" in err
    assert "job 1 (method.keep_ratio=abc dataset.limit=1 run.progress=False): method: fastv.keep_ratio must be a " \
           "number in (0, 1], got 'abc'" in err
    assert not list(tmp_path.rglob("results.jsonl")) and not list(tmp_path.rglob("run.json"))  # job 0 never ran


def test_the_budget_sweep_preset_expands_to_nine_valid_jobs(tmp_path, monkeypatch):
    from tokenprune.run.sweep import check_jobs, sweep_jobs

    monkeypatch.setenv("TOKENPRUNE_CONF", str(ROOT / "conf"))
    with initialize_config_module("tokenprune.conf", version_base=None):
        cfg = compose("config", overrides=["experiment=sweep_budgets", "dataset.limit=1"], return_hydra_config=True)
        jobs = sweep_jobs(cfg)
        assert len(jobs) == 9
        assert ["method=random", "method.keep_ratio=0.25", "experiment=sweep_budgets", "dataset.limit=1"] in jobs
        assert cfg.hydra.mode.name == "MULTIRUN"
        assert check_jobs(cfg) == (9, [])
        bad = compose("config", overrides=["experiment=sweep_budgets", "method.keep_ratio=abc"],
                      return_hydra_config=True)  # the command's value replaces the preset's list
        count, problems = check_jobs(bad)
        assert count == 3 and len(problems) == 3 and all("got 'abc'" in p for p in problems)
