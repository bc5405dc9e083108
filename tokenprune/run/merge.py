"""``python -m tokenprune.merge RUN_DIR...``: merge the shards of run directories into one result set.

Each shard of a run (``run.shard=i/n`` jobs, torchrun ranks) writes its own results file; the last shard to finish
merges them by itself. This command merges what is there — after a shard failed, or to look at a partial run:
the shard files fold into ``results.jsonl`` and ``summary.json`` and the table are written, as the one-process run
writes them. It refuses shards of different configurations, and a directory whose shards are still being written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .checks import ConfigError
from .results import RunDirectoryBusy, ShardMismatch, has_results, shard_files


def merge_directory(run_dir: str | Path) -> dict:
    """Merge the shards of ``run_dir`` and write its summary (the configuration is read from its ``config.yaml``)."""
    from .runner import build_plan, merge_run

    run_dir = Path(run_dir)
    if not has_results(run_dir):
        raise FileNotFoundError(f"{run_dir} holds no results file")
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has results but no config.yaml")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.run.output_dir = str(run_dir)  # where the directory is now (it may have been copied)
    cfg.run.shard = None
    payload = merge_run(build_plan(cfg), cfg)
    if payload is None:
        raise RunDirectoryBusy(f"{run_dir}: shards are still being written; merge when they are done")
    return payload


def unmerged(paths: list[str | Path]) -> list[Path]:
    """Run directories below ``paths`` that hold shard results files."""
    found = set()
    for path in map(Path, paths):
        found |= {p.parent for p in path.rglob("results.shard-*-of-*.jsonl")}
        if shard_files(path):
            found.add(path)
    return sorted(found)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenprune.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run directories, or folders containing them (searched recursively)")
    args = parser.parse_args(argv)
    directories = unmerged(args.dirs) or [Path(d) for d in args.dirs if has_results(d)]
    if not directories:
        sys.exit(f"tokenprune.merge: no results under {', '.join(args.dirs)}")
    failed = False
    for run_dir in directories:
        try:
            payload = merge_directory(run_dir)
        except (ShardMismatch, RunDirectoryBusy, ConfigError, FileNotFoundError) as error:
            print(f"tokenprune.merge: {error}", file=sys.stderr)
            failed = True
            continue
        print(f"tokenprune.merge: {run_dir}: merged ({payload['samples']} samples planned)")
    sys.exit(2 if failed else 0)
