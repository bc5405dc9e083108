"""Data parallel on one node: the wall time of one run configuration with 1, 2, ... processes (torchrun).

    python benchmarks/scale_node.py --nproc 1 2 4 8 -- model=qwen25vl_7b model.path=/models/Qwen2.5-VL-7B-Instruct \
        dataset=textvqa_val dataset.limit=512 method=fastv
    python benchmarks/scale_node.py --nproc 1 2 -- dataset.limit=24 method=fastv            # tiny_llava on the CPU

Every row runs the whole configuration into a fresh run directory (``<out>/nproc-N``): ``python -m tokenprune`` for
one process, ``torchrun --standalone --nproc_per_node=N -m tokenprune`` for N (each rank loads its own model copy on
its own GPU, or the CPU). The table gives the wall time (model loading included: what a user waits for), samples per
second, the speed-up over one process, and whether the records (predictions, scores, token counts) equal the
one-process run's. Nothing is asserted: a benchmark reports, the tests check correctness.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

VOLATILE = ("timing", "memory", "baseline_cache")


def command(nproc: int, overrides: list[str], run_dir: Path) -> list[str]:
    launcher = [sys.executable, "-m", "tokenprune"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "tokenprune"]
    return [*launcher, *overrides, "run.progress=false", f"hydra.run.dir={run_dir}"]


def records(run_dir: Path) -> list[dict]:
    """The run's records without timings and memory readings (what must not depend on the process count)."""
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        row["runs"] = {label: {k: v for k, v in run.items() if k not in VOLATILE} for label, run in row["runs"].items()}
    return sorted(rows, key=lambda row: row["index"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts (1 is the reference)")
    parser.add_argument("--out", default="outputs/scale_node", help="where the run directories and scale_node.md go")
    parser.add_argument("overrides", nargs="*", help="the run's configuration (after --), as for python -m tokenprune")
    args = parser.parse_args(argv)
    counts = sorted(set(args.nproc) | {1})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WANDB_MODE="offline")
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # CPU ranks: one thread each (as torchrun sets it)
    rows, reference = [], None
    for nproc in counts:
        run_dir = out / f"nproc-{nproc}"
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists: give another --out (a rerun would resume, not measure)")
        started = time.perf_counter()
        result = subprocess.run(command(nproc, args.overrides, run_dir), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"nproc={nproc} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        done = records(run_dir)
        reference = done if reference is None else reference
        rows.append({"nproc": nproc, "samples": len(done), "wall_s": wall, "same": done == reference})
    base = rows[0]["wall_s"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    lines = [f"Data parallel on one node: {' '.join(args.overrides) or 'the default configuration'}",
             f"{device}, {platform.node()}, torch {torch.__version__}; wall time includes each process's model load.",
             "", "| processes | samples | wall s | samples/s | speed-up | records equal to 1 process |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['nproc']} | {row['samples']} | {row['wall_s']:.1f} | {row['samples'] / row['wall_s']:.2f} "
                     f"| {base / row['wall_s']:.2f}x | {'yes' if row['same'] else 'NO'} |")
    text = "\n".join(lines)
    (out / "scale_node.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
