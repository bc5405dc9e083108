"""``python -m tokenprune``: the Hydra entry point (thin: config → runner).

A command that names nothing to run (no ``method=``, ``method.*``, ``run.compare`` or ``experiment=``) runs the
preset ``experiment=embedded``: the embedded comparison table. Options that change how a run goes, not what it
compares (``logger=wandb``, ``run.progress=false``, ``dataset.limit=5``, ``model=...``), keep that preset.
"""

from __future__ import annotations

import os
import shlex
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

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


@hydra.main(version_base=None, config_path="conf", config_name="config")
def run(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        payload = run_benchmark(cfg)
    except ConfigError as error:
        _fail(f"tokenprune: configuration error: {error}", 2, multirun)
    except RunInterrupted as stop:
        print(f"\ntokenprune: interrupted after {stop.done} of {stop.total} samples; the records so far are in "
              f"{stop.run_dir}.\nTo resume, rerun: {resume_command(stop.run_dir, multirun)}", file=sys.stderr)
        sys.exit(130)
    if payload["scored"] == 0:
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
    sys.argv = [sys.argv[0], *with_default_experiment(sys.argv[1:])]
    run()


if __name__ == "__main__":
    main()
