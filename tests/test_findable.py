"""Issue 17, "findable": the run directory printed at the start and the end and named after the model, resume and
Ctrl-C messages, --help pointing at the other commands, the calibration command's own help."""

from __future__ import annotations

import runpy
import shlex
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import tokenprune.run.runner as runner_module
from tokenprune.run.results import read_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_module(module: str, arguments: list[str], monkeypatch) -> int | None:
    """``python -m <module> <arguments>`` in this process; the exit code (None when it returned normally)."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [module, *arguments])
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    except SystemExit as exit:
        return exit.code
    return None


def test_run_directory_is_named_after_the_model_and_printed_at_start_and_end(tmp_path, monkeypatch, capsys):
    with initialize_config_module("tokenprune.conf", version_base=None):
        cfg = compose("config", overrides=["model=tiny_qwen25vl", "method=pdrop"], return_hydra_config=True)
    directory = OmegaConf.select(cfg, "hydra.run.dir")
    assert directory.startswith("outputs/") and directory.endswith("_tiny_qwen25vl_pdrop_synthetic_image")
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]  # resolved per job by Hydra
    assert subdir.startswith("${hydra.job.num}_${model.name}_")

    code = run_module("tokenprune", ["method=fastv", "dataset.limit=1", "run.max_new_tokens=1", "run.progress=false",
                                     f"hydra.run.dir={tmp_path}"], monkeypatch)
    out = capsys.readouterr().out
    assert code is None
    assert out.startswith(f"tokenprune: run directory {tmp_path}\n")
    assert out.rstrip().endswith(f"tokenprune: results in {tmp_path} (results.jsonl, summary.json)")


def test_ctrl_c_prints_how_to_resume_and_the_resumed_run_says_how_far_it_was(tmp_path, monkeypatch, capsys):
    arguments = ["method=fastv", "dataset.limit=3", "run.max_new_tokens=1", "run.progress=false"]
    original, calls = runner_module.run_sample, []

    def interrupted_at_the_second_sample(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(runner_module, "run_sample", interrupted_at_the_second_sample)
    assert run_module("tokenprune", [*arguments, f"hydra.run.dir={tmp_path}"], monkeypatch) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"tokenprune: interrupted after 1 of 3 samples; the records so far are in {tmp_path}." in err
    command = err.split("To resume, rerun: ")[1].strip()
    assert command == f"python -m tokenprune {' '.join(arguments)} hydra.run.dir={tmp_path}"
    assert len(read_records(tmp_path)) == 1

    monkeypatch.setattr(runner_module, "run_sample", original)
    assert run_module("tokenprune", shlex.split(command)[3:], monkeypatch) is None
    assert "resumed: 1 of 3 samples done" in capsys.readouterr().out
    assert len(read_records(tmp_path)) == 3


def test_help_names_the_report_and_calibration_commands(monkeypatch, capsys):
    assert run_module("tokenprune", ["--help"], monkeypatch) in (None, 0)
    out = capsys.readouterr().out
    assert "python -m tokenprune.report" in out and "python -m tokenprune.calibrate layerskip" in out
    assert "experiment=embedded" in out


def test_calibration_search_help(capsys):
    from tokenprune.calibrate.__main__ import main

    assert main(["layerskip", "--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m tokenprune.calibrate layerskip" in out
    for field in ("budget:", "beam_width:", "n_samples:", "model=", "dataset="):
        assert field in out
