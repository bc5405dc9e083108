"""Hydra multirun: check every job's configuration before the first job starts (on Slurm: before anything is
queued), merge the shards of any run directory still unmerged (``run.shards``), and print one combined table of
all jobs at the end — the same tables ``python -m tokenprune.report
<sweep dir>`` gives.

Registered in ``conf/config.yaml`` under ``hydra.callbacks``. The jobs are expanded as Hydra's basic sweeper
expands them (``hydra.sweeper.params`` and the command's overrides, cartesian product); with another sweeper
(e.g. Optuna, whose jobs are not known in advance) each job is checked when it starts instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override list of every job of the sweep, in launch order (None when the sweeper is not the basic one)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    arguments = params + list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def check_jobs(config: DictConfig) -> tuple[int, list[str]]:
    """(number of jobs, one message per job whose configuration is refused)."""
    from .checks import ConfigError
    from .runner import build_plan

    jobs = sweep_jobs(config)
    if jobs is None:
        return 0, []
    loader = GlobalHydra.instance().config_loader()
    problems = []
    for number, overrides in enumerate(jobs):
        where = f"job {number} ({' '.join(overrides) or 'no overrides'})"
        try:
            build_plan(loader.load_sweep_config(config, list(overrides)), resolve_output_dir=False)
        except (ConfigError, HydraException, OmegaConfBaseException) as error:
            problems.append(f"{where}: {error}")
    return len(jobs), problems


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        count, problems = check_jobs(config)
        if problems:
            print(f"tokenprune: configuration error in {len(problems)} of {count} sweep jobs; nothing was started:",
                  file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            sys.exit(2)
        if count:
            print(f"tokenprune: the configurations of all {count} sweep jobs are valid", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .merge import merge_directory, unmerged
        from .report import tables

        sweep_dir = Path(config.hydra.sweep.dir)
        for run_dir in unmerged([sweep_dir]) if sweep_dir.exists() else []:  # shards the last shard left unmerged
            try:
                merge_directory(run_dir)
            except Exception as error:  # a shard failed or is still running: the tables say what is there
                print(f"tokenprune: {run_dir} not merged: {error}", file=sys.stderr)
        try:
            text = tables([sweep_dir])
        except FileNotFoundError:
            return
        if text:
            print(f"\n## All jobs of the sweep ({sweep_dir})\n\n{text}\n\n"
                  f"(the same tables, with plots: python -m tokenprune.report {sweep_dir} --out {sweep_dir}/report)")
