"""Merge finished (or partial) run directories into a Markdown table and PNG plots.

    python -m tokenprune.report outputs/ multirun/ --out report/

For every run directory found below the arguments (one holding ``results.jsonl``) and every method label in
it, one row: model, dataset, method, the benchmark's headline metric, the paired delta against the
baseline run on the same samples (95% bootstrap interval), visual tokens (entering / layer-averaged),
prefill FLOPs, latency. Plots, one per model x dataset: accuracy vs layer-averaged visual tokens and
accuracy vs FLOPs (one line per method, points at its budgets), and the paired deltas with intervals.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from .results import RESULTS_FILE, SUMMARY_FILE, format_table, read_records, summarize  # noqa: E402


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    found = set()
    for path in map(Path, paths):
        if (path / RESULTS_FILE).exists():
            found.add(path)
        found.update(p.parent for p in path.rglob(RESULTS_FILE))
    return sorted(found)


def load_run(run_dir: Path) -> dict:
    """A run's model, dataset and per-label summary (from summary.json, or recomputed for partial runs)."""
    summary_file = run_dir / SUMMARY_FILE
    config = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    records = read_records(run_dir)
    if summary_file.exists():
        payload = json.loads(summary_file.read_text())
        if payload.get("samples_done", len(records)) == len(records):
            return payload | {"run_dir": str(run_dir)}
    if config is None:
        raise FileNotFoundError(f"{run_dir} has results but no config.yaml")
    from ..data import create_dataset

    dataset_cfg = OmegaConf.to_container(config.dataset, resolve=True)
    dataset = create_dataset(dataset_cfg.pop("name"), **dataset_cfg)
    labels = sorted({label for r in records for label in r.get("runs", {})}, key=lambda l: (l != "baseline", l))
    summary = summarize(records, labels, dataset.scorer, "baseline" if "baseline" in labels else None)
    return {"model": config.model.name, "dataset": dataset.name, "samples": len(records), "methods": summary,
            "run_dir": str(run_dir)}


def collect(paths: list[str | Path]) -> list[dict]:
    rows = []
    for run_dir in find_run_dirs(paths):
        run = load_run(run_dir)
        for label, entry in run["methods"].items():
            rows.append({"model": run["model"], "dataset": run["dataset"], "label": label,
                         "method": label.split("(")[0], "run_dir": run["run_dir"], **entry})
    return rows


def _headline(row: dict):
    value = row["metrics"].get(row["headline"])
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def pareto_figure(rows: list[dict], x: str, title: str = ""):
    """Headline metric against ``x`` ("visual_tokens_layer_mean" or "tflops"), one line per method."""
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    by_method = defaultdict(list)
    for row in rows:
        value = row["flops"]["tokenprune"] / 1e12 if x == "tflops" and row["flops"]["tokenprune"] else row.get(x)
        if value is None or _headline(row) is None:
            continue
        by_method[row["label"].split("(")[0]].append((value, _headline(row)))
    for method, points in sorted(by_method.items()):
        points.sort()
        marker = "*" if method == "baseline" else "o"
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, markersize=10 if marker == "*" else 5,
                  label=method, linestyle="-" if len(points) > 1 else "none")
    axis.set_xlabel("layer-averaged visual tokens" if x != "tflops" else "prefill TFLOPs (tokenprune convention)")
    headline = rows[0]["headline"] if rows else "score"
    axis.set_ylabel(headline)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def delta_figure(rows: list[dict], title: str = ""):
    rows = [r for r in rows if "paired_delta" in r]
    figure, axis = plt.subplots(figsize=(6.4, 0.35 * max(3, len(rows)) + 1.2))
    for i, row in enumerate(rows):
        delta = row["paired_delta"]
        low, high = delta["ci95"]
        axis.errorbar(delta["mean"], i, xerr=[[delta["mean"] - low], [high - delta["mean"]]] if not math.isnan(low) else None,
                      fmt="o", capsize=3)
    axis.axvline(0.0, color="gray", linewidth=1)
    axis.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
    axis.set_xlabel("paired Δ vs baseline (points, 95% CI)")
    axis.set_title(title)
    figure.tight_layout()
    return figure


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    rows = collect(paths)
    if not rows:
        raise FileNotFoundError(f"no {RESULTS_FILE} found under {', '.join(map(str, paths))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# tokenprune report", ""]
    groups = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["dataset"])].append(row)
    for (model, dataset), group in sorted(groups.items()):
        merged = {}
        for row in group:  # several run directories may hold the same label: keep them apart
            if row["label"] == "baseline" and "baseline" in merged:
                if row["scored"] > merged["baseline"]["scored"]:  # paired baselines of a sweep: keep one
                    merged["baseline"] = row
                continue
            label = row["label"] if row["label"] not in merged else f"{row['label']} [{Path(row['run_dir']).name}]"
            merged[label] = row
        group = list(merged.values())
        stem = f"{model}_{dataset}".replace("/", "_")
        sections += [format_table(merged, f"{dataset} · {model}"), "",
                     f"![accuracy vs tokens]({stem}_tokens.png) ![accuracy vs FLOPs]({stem}_flops.png)", ""]
        for x, suffix in (("visual_tokens_layer_mean", "tokens"), ("tflops", "flops")):
            figure = pareto_figure(group, x, f"{dataset} · {model}")
            figure.savefig(out / f"{stem}_{suffix}.png", dpi=120)
            plt.close(figure)
        if any("paired_delta" in row for row in group):
            figure = delta_figure(group, f"{dataset} · {model}")
            figure.savefig(out / f"{stem}_deltas.png", dpi=120)
            plt.close(figure)
            sections += [f"![paired deltas]({stem}_deltas.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(sections))
    (out / "report.json").write_text(json.dumps(rows, indent=2, default=str))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenprune.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run directories, or folders containing them (searched recursively)")
    parser.add_argument("--out", default="report", help="where report.md and the PNG plots go (default: ./report)")
    args = parser.parse_args(argv)
    report = write_report(args.dirs, args.out)
    print(report.read_text())
    print(f"\nwritten: {report} and plots beside it")


if __name__ == "__main__":
    main()
