"""``python -m tokenprune``: the Hydra entry point (thin: config → runner).

A command that names nothing to run (no ``method=``, ``method.*``, ``run.compare`` or ``experiment=``) runs the
preset ``experiment=embedded``: the embedded comparison table. Options that change how a run goes, not what it
compares (``logger=wandb``, ``run.progress=false``, ``dataset.limit=5``, ``model=...``), keep that preset.

Scaling out: ``run.shards=N`` becomes a sweep over ``run.shard=0/N,...,N-1/N`` whose jobs of one configuration
share a run directory (a Slurm array with ``hydra/launcher=submitit_slurm``); under ``torchrun`` every rank gets the
run directory of rank 0 (the default directory is named by the time rank 0 started).
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .run import distributed
from .run.checks import ConfigError
from .run.runner import RunInterrupted, run_benchmark

DEFAULT_EXPERIMENT = "embedded"
# Overrides that choose what a run compares: when one is given, the default experiment is not selected.
WHAT_TO_RUN = ("method", "experiment", "run.compare")
HYDRA_FLAGS_WITH_VALUE = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-c", "--cfg",
                          "-p", "--package", "--experimental-rerun"}
HELP_FLAGS = {"-h", "--help", "--hydra-help", "--info", "--version", "-sc", "--shell-completion"}


def with_default_experiment(arguments: list[str]) -> list[str]:
    """``arguments`` plus ``experiment=embedded`` when they name nothing to run (see the module docstring)."""
    overrides, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
            continue
        if argument in HELP_FLAGS:
            return arguments
        if argument.startswith("-"):
            skip = argument in HYDRA_FLAGS_WITH_VALUE
            continue
        overrides.append(argument)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in WHAT_TO_RUN or key.startswith("method."):
            return arguments
    print(f"tokenprune: experiment={DEFAULT_EXPERIMENT} (the embedded comparison; name a method= or an experiment= "
          "to run something else)", file=sys.stderr)
    return [*arguments, f"experiment={DEFAULT_EXPERIMENT}"]


def with_shard_fanout(arguments: list[str]) -> list[str]:
    """``run.shards=N`` → the sweep ``run.shard=0/N,...,N-1/N`` (a multirun: ``-m`` is added when missing)."""
    found = [a for a in arguments if a.split("=", 1)[0] == "run.shards"]
    if not found:
        return arguments
    value = found[-1].split("=", 1)[1]
    if not re.fullmatch(r"\d+", value) or int(value) < 1:
        print(f"tokenprune: configuration error: run.shards must be an integer >= 1, got {value!r}", file=sys.stderr)
        sys.exit(2)
    count = int(value)
    rest = [a for a in arguments if a.split("=", 1)[0] != "run.shards"]
    if any(a.split("=", 1)[0] == "run.shard" for a in rest):
        print("tokenprune: configuration error: give run.shards=N (all shards) or run.shard=i/n (one), not both",
              file=sys.stderr)
        sys.exit(2)
    multirun = [] if {"-m", "--multirun"} & set(rest) else ["-m"]
    return [*multirun, *rest, "run.shard=" + ",".join(f"{i}/{count}" for i in range(count))]


def with_torchrun_run_dir(arguments: list[str], group) -> list[str]:
    """Under torchrun, ``hydra.run.dir`` of rank 0 for every rank: the configured pattern with rank 0's start time
    (each rank would otherwise read its own clock and might name another directory)."""
    if group is None or any(a.startswith(("hydra.run.dir=", "run.output_dir=")) for a in arguments):
        return arguments
    if {"-m", "--multirun"} & set(arguments):
        print("tokenprune: configuration error: torchrun runs one configuration (its ranks share the samples); run a "
              "sweep's jobs with run.shards or one torchrun per job", file=sys.stderr)
        sys.exit(2)
    started = group.broadcast(datetime.datetime.now() if group.rank == 0 else None)
    from omegaconf import OmegaConf

    pattern = OmegaConf.to_container(OmegaConf.load(Path(__file__).parent / "conf" / "config.yaml"))["hydra"]["run"]["dir"]
    return [*arguments, "hydra.run.dir=" + re.sub(r"\$\{now:([^}]*)\}", lambda m: started.strftime(m[1]), pattern)]


def shard_run_dir(cfg: DictConfig, hydra_config) -> str | None:
    """In a sweep over ``run.shard``, the run directory the shards of one configuration share:
    ``<sweep dir>/<model>_<overrides other than run.shard>``; None for a job that is not a shard, or names its own
    ``run.output_dir``. ``hydra_config``: the job's ``hydra`` node."""
    if cfg.run.get("shard") is None or any(o.startswith("run.output_dir=") for o in hydra_config.overrides.task):
        return None
    name = "_".join(part for part in (cfg.model.name, hydra_config.job.override_dirname) if part)
    return str(Path(hydra_config.sweep.dir) / name)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def run(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    shared = shard_run_dir(cfg, HydraConfig.get()) if multirun else None
    if shared is not None:
        cfg.run.output_dir = shared
    try:
        payload = run_benchmark(cfg)
    except ConfigError as error:
        _fail(f"tokenprune: configuration error: {error}", 2, multirun)
    except RunInterrupted as stop:
        print(f"\ntokenprune: interrupted after {stop.done} of {stop.total} samples; the records so far are in "
              f"{stop.run_dir}.\nTo resume, rerun: {resume_command(stop.run_dir, multirun)}", file=sys.stderr)
        sys.exit(130)
    if payload["scored"] == 0 and payload["samples"]:  # (a shard with nothing left to run scored nothing either)
        kinds = ", ".join(f"{kind} × {count}" for kind, count in payload["errors_by_kind"].items()) or "none"
        _fail(f"tokenprune: no sample was scored ({payload['samples']} samples); errors by kind: {kinds}", 3, multirun)


def _fail(message: str, code: int, multirun: bool) -> None:
    """Stop a run with ``message``: exit with ``code``, or, inside a sweep, fail this job only (Hydra runs the
    other jobs and reports the failure at the end)."""
    print(message, file=sys.stderr)
    if multirun:
        raise RuntimeError(message)
    sys.exit(code)


def resume_command(run_dir, multirun: bool) -> str:
    """The command that continues an interrupted run (the same overrides, the same directory)."""
    hydra_config = HydraConfig.get()
    if multirun:
        arguments = [a for a in sys.argv[1:] if not a.startswith("hydra.sweep.dir=")]
        arguments.append(f"hydra.sweep.dir={hydra_config.sweep.dir}")
    else:
        arguments = [a for a in hydra_config.overrides.task if not a.startswith("hydra.run.dir=")]
        arguments.append(f"hydra.run.dir={run_dir}")
    return " ".join(["python -m tokenprune", *(shlex.quote(a) for a in arguments)])


def main() -> None:
    arguments = with_shard_fanout(with_default_experiment(sys.argv[1:]))
    group = distributed.start()  # None unless started by torchrun with several processes
    sys.argv = [sys.argv[0], *with_torchrun_run_dir(arguments, group)]
    run()


if __name__ == "__main__":
    main()
