"""Issue 19, scaling out: data parallel with torchrun, shards as separate jobs and their merge, one configuration
fanned out as shard jobs of a sweep, baselines shared by a sweep. (Models over several devices: test_devices.py.)"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from test_runner import cli, config, stable
from tokenprune.run.merge import main as merge_main
from tokenprune.run.results import (ResultStore, RunDirectoryBusy, RunDirectoryLock, Shard, ShardMismatch,
                                    read_records)
from tokenprune.run.runner import ConfigError, run_benchmark

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as each torchrun rank runs (OMP_NUM_THREADS=1)

RUN = ["method=fastv", "dataset.limit=12", "run.max_new_tokens=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The one-process run every sharded run must equal (records without timings)."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_benchmark(config(run_dir, *RUN))
    return stable(read_records(run_dir))


def shard_records(run_dir: Path) -> Counter:
    """How many times each sample id appears over all results files of a run directory."""
    return Counter(json.loads(line)["id"] for path in run_dir.glob("results*.jsonl") if "damaged" not in path.name
                   for line in path.read_text().splitlines() if line.strip())


# ---------------------------------------------------------------------------------------------------------
# 1. torchrun: two ranks, one killed, the rerun completes
# ---------------------------------------------------------------------------------------------------------
def torchrun(run_dir: Path, cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tokenprune",
               *RUN, "run.progress=false", f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(command, cwd=cwd, env=dict(os.environ, WANDB_MODE="offline"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_torchrun_two_ranks_equal_one_process_even_after_a_rank_is_killed(tmp_path, reference):
    run_dir = tmp_path / "run"
    first = torchrun(run_dir, tmp_path)
    shard = run_dir / "results.shard-1-of-2.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if shard.exists() and shard.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    holder = json.loads((run_dir / ".lock.shard-1-of-2").read_text())  # rank 1's pid, from its shard lock
    os.kill(holder["pid"], signal.SIGKILL)
    output = first.communicate(timeout=120)[0]
    assert first.returncode != 0, output[-3000:]  # torchrun stops the group when a rank dies
    before = shard_records(run_dir)
    assert 1 <= sum(before.values()) < 12 and max(before.values()) == 1, before
    assert not (run_dir / "results.jsonl").exists()  # nobody merged a partial run

    second = torchrun(run_dir, tmp_path)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output[-3000:]
    assert "resumed:" in output and "rank 0 merges the shards" in output
    assert sorted(p.name for p in run_dir.glob("results*.jsonl")) == ["results.jsonl"]  # merged by rank 0
    assert shard_records(run_dir) == Counter({record["id"]: 1 for record in reference})  # 12 records, each once
    assert stable(read_records(run_dir)) == reference  # predictions, scores, tokens, FLOPs of the one-process run
    assert json.loads((run_dir / "summary.json").read_text())["samples"] == 12
    assert output.count("| fastv |") == 1  # the table, printed once (by rank 0)


# ---------------------------------------------------------------------------------------------------------
# 2. shards as jobs of their own, and their merge
# ---------------------------------------------------------------------------------------------------------
def test_a_second_writer_of_the_same_shard_is_refused_other_shards_are_not(tmp_path):
    shard = ResultStore(tmp_path, {"run": 1}, Shard(0, 2))
    try:
        with pytest.raises(RunDirectoryBusy, match=f"shard-0-of-2 is being written by another tokenprune process "
                                                   f"\\(pid {os.getpid()}"):
            ResultStore(tmp_path, {"run": 1}, Shard(0, 2))
        ResultStore(tmp_path, {"run": 1}, Shard(1, 2)).close()  # another shard writes beside it
        with pytest.raises(RunDirectoryBusy, match=f"shards shard-0-of-2: pid {os.getpid()}"):
            ResultStore(tmp_path, {"run": 1})  # a one-process writer waits for the shards
    finally:
        shard.close()
    ResultStore(tmp_path, {"run": 1}).close()


def test_shard_jobs_and_the_merge_equal_the_one_process_run(tmp_path, reference, capsys):
    run_dir = tmp_path / "run"
    first = run_benchmark(config(run_dir, *RUN, "run.shard=1/2"))
    assert first["merged"] is False and first["samples"] == 6
    with RunDirectoryLock(run_dir, Shard(0, 3)).acquire():  # as if another shard job were still running
        last = run_benchmark(config(run_dir, *RUN, "run.shard=0/2"))
        assert last["merged"] is False  # it cannot merge while a shard is being written
        with pytest.raises(SystemExit) as refused:
            merge_main([str(run_dir)])
        assert refused.value.code == 2 and "still being written" in capsys.readouterr().err
    with pytest.raises(SystemExit) as merged:
        merge_main([str(tmp_path)])  # finds the unmerged run directory below
    assert merged.value.code == 0
    assert sorted(p.name for p in run_dir.glob("results*.jsonl")) == ["results.jsonl"]
    assert stable(read_records(run_dir)) == reference
    assert json.loads((run_dir / "summary.json").read_text())["methods"]["fastv"]["samples"] == 12


def test_a_rerun_with_another_shard_count_runs_every_sample_once(tmp_path, reference):
    run_dir = tmp_path / "run"
    run_benchmark(config(run_dir, *RUN, "run.shard=0/2"))  # half the samples; shard 1 of 2 never ran
    payloads = [run_benchmark(config(run_dir, *RUN, f"run.shard={i}/3")) for i in range(3)]
    assert [p.get("merged", True) for p in payloads] == [False, False, True]  # the last one merged
    assert [p["samples"] for p in payloads] == [2, 2, 12]  # 3 shards share the 6 samples left; the last merged all
    assert stable(read_records(run_dir)) == reference


def test_shards_of_different_configurations_are_refused(tmp_path):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    run_benchmark(config(run_dir, "method=fastv", "dataset.limit=2", "run.shard=0/2"))
    with pytest.raises(ConfigError, match="holds results of a different run .*differs in: methods"):
        run_benchmark(config(run_dir, "method=random", "dataset.limit=2", "run.shard=1/2"))  # refused at start
    run_benchmark(config(other, "method=random", "dataset.limit=2", "run.shard=1/2"))
    for name in ("results.shard-1-of-2.jsonl", "run.shard-1-of-2.json"):  # shards copied together by hand
        (run_dir / name).write_bytes((other / name).read_bytes())
    with pytest.raises(ShardMismatch, match="different configurations .*differ in: methods"):
        from tokenprune.run.merge import merge_directory

        merge_directory(run_dir)
    report = subprocess.run([sys.executable, "-m", "tokenprune.report", str(run_dir), "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode != 0 and "different configurations" in report.stderr
    assert (run_dir / "results.shard-0-of-2.jsonl").exists()  # nothing was changed


def test_bad_shard_values_are_refused_before_any_model_work(tmp_path):
    for value in ("2/2", "a/3", "1"):
        with pytest.raises(ConfigError, match="run.shard must be i/n with 0 <= i < n"):
            run_benchmark(config(tmp_path, "method=fastv", f"run.shard={value}"))
    with pytest.raises(ConfigError, match="run.shards=4 fans one configuration out"):
        run_benchmark(config(tmp_path, "method=fastv", "run.shards=4"))
    assert not (tmp_path / "run.json").exists()


# ---------------------------------------------------------------------------------------------------------
# 3. run.shards: one configuration fanned out as shard jobs (submitit), merged at the end; shared baselines
# ---------------------------------------------------------------------------------------------------------
def test_run_shards_on_slurm_is_one_job_per_shard_and_configuration_sharing_a_directory_each(tmp_path):
    """The job list the submitit launcher submits as one Slurm array (no Slurm here: the jobs and their run
    directories are what the sweep expands them to)."""
    from hydra import initialize_config_module
    from hydra.types import RunMode

    from tokenprune.__main__ import shard_run_dir, with_shard_fanout
    from tokenprune.run.sweep import check_jobs, sweep_jobs

    arguments = with_shard_fanout(["hydra/launcher=submitit_slurm", "method=fastv,random,uniform", "run.shards=2",
                                   "dataset.limit=3", f"hydra.sweep.dir={tmp_path}"])
    assert arguments[0] == "-m" and arguments[-1] == "run.shard=0/2,1/2"
    GlobalHydra.instance().clear()
    with initialize_config_module("tokenprune.conf", version_base=None):
        loader = GlobalHydra.instance().config_loader()
        sweep = loader.load_configuration("config", arguments[1:], run_mode=RunMode.MULTIRUN)
        assert sweep.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
        jobs = sweep_jobs(sweep)
        assert [(job[0], job[-1]) for job in jobs] == [(f"method={m}", f"run.shard={i}/2")
                                                       for m in ("fastv", "random", "uniform") for i in range(2)]
        assert check_jobs(sweep) == (6, [])
        directories = [shard_run_dir(job, job.hydra) for job in (loader.load_sweep_config(sweep, list(overrides)) for overrides in jobs)]
    assert directories == [str(tmp_path / f"tiny_llava_dataset.limit=3,method={m}")
                           for m in ("fastv", "random", "uniform") for _ in range(2)]


def test_run_shards_fans_out_merges_and_the_sweep_runs_the_baseline_once(tmp_path, monkeypatch):
    """A sweep of three method settings, each fanned out as two shard jobs (Hydra's basic launcher, in this
    process): three merged run directories, the unpruned model run once per sample, the deltas of unshared runs."""
    methods = ["fastv", "random", "uniform"]
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["tokenprune", f"method={','.join(methods)}", "run.shards=2", "dataset.limit=3",
                                      "run.max_new_tokens=1", "run.progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    runpy.run_module("tokenprune", run_name="__main__", alter_sys=False)
    run_dirs = sorted(p.parent for p in (tmp_path / "sweep").rglob("results.jsonl"))
    assert [d.name for d in run_dirs] == [f"tiny_llava_dataset.limit=3,method={m},run.max_new_tokens=1"
                                          for m in methods]  # one directory per configuration
    assert not list((tmp_path / "sweep").rglob("results.shard-*"))  # every one merged
    cache_use = Counter()
    for run_dir in run_dirs:
        records = read_records(run_dir)
        assert len(records) == 3
        cache_use.update(r["runs"]["baseline"]["baseline_cache"] for r in records)
    assert cache_use == {"computed": 3, "reused": 6}  # 3 samples: the unpruned model ran 3 times, not 9
    assert len(list((tmp_path / "sweep" / "baseline_cache").rglob("*.json"))) == 3 + 1  # three entries + settings

    for method, run_dir in zip(methods, run_dirs):  # the same deltas as runs that share nothing
        alone = run_benchmark(config(tmp_path / f"alone_{method}", f"method={method}", "dataset.limit=3",
                                     "run.max_new_tokens=1", "run.baseline_cache=null"))
        shared = json.loads((run_dir / "summary.json").read_text())
        assert shared["methods"][method]["paired_delta"] == alone["methods"][method]["paired_delta"]
        assert shared["methods"]["baseline"]["metrics"] == alone["methods"]["baseline"]["metrics"]
        without_cache_note = [{**r, "runs": {**r["runs"], "baseline": {k: v for k, v in r["runs"]["baseline"].items()
                                                                      if k != "baseline_cache"}}}
                              for r in stable(read_records(run_dir))]
        assert without_cache_note == stable(read_records(tmp_path / f"alone_{method}"))  # predictions, scores, ...


def test_run_shards_becomes_a_sweep_over_run_shard():
    from tokenprune.__main__ import with_shard_fanout

    assert with_shard_fanout(["method=fastv", "run.shards=3"]) == ["-m", "method=fastv", "run.shard=0/3,1/3,2/3"]
    assert with_shard_fanout(["-m", "run.shards=1"]) == ["-m", "run.shard=0/1"]
    assert with_shard_fanout(["method=fastv"]) == ["method=fastv"]
