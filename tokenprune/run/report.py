"""Merge finished (or partial) run directories into Markdown tables and PNG plots, never mixing what cannot be
compared.

    python -m tokenprune.report outputs/ multirun/ --out report/

Runs are grouped by their identity: the model (name, weights, checkpoint fingerprint or path, dtype), the dataset
(name, split, fields, and the exact ids of the samples recorded) and the settings that change results (answer
length, attention backend, video and processor options, pairing). Each group is one table; runs that differ in
any of these land in separate tables, each saying what it holds. Inside a group, a paired delta is shown only
beside the baseline it was computed against: runs whose unpruned runs gave the same per-sample scores share one
baseline row, others get their own baseline row, labelled with its run. Plots, one set per group: the headline
metric (in its unit, on its range) against layer-averaged visual tokens and against prefill FLOPs (G/T by
magnitude), one line per method and run, and the paired deltas with their intervals. A group holding a
``downsample`` run also gets the difficulty filter (VTC-Bench, ``run/difficulty.py``): every method on the whole
set, on the samples the unpruned model solves but downsampling does not (difficult) and on the rest (simple), with
paired deltas.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from .difficulty import sections as difficulty_sections  # noqa: E402
from .results import (RESULTS_FILE, SIGNATURE_FILE, SUMMARY_FILE, ShardMismatch, check_signatures,  # noqa: E402
                      format_table, has_results, read_records, summarize)

FLOP_UNITS = (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6))


# ---------------------------------------------------------------------------------------------------------
# Runs and their identity
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run directory: its identity, its per-label summary, and the per-sample baseline scores."""

    run_dir: Path
    name: str  # how tables and plots name the run (the directory, relative to the folder searched)
    identity: dict
    methods: dict  # label -> summary entry
    records: list[dict]
    planned: int | None  # samples the run was asked for (None: unknown)
    model: str = ""
    dataset: str = ""

    @property
    def sample_ids(self) -> list[str]:
        return sorted(r["id"] for r in self.records)

    @property
    def key(self) -> str:
        """Runs with equal keys are comparable: same model, dataset, samples and result-changing settings."""
        ids = hashlib.sha256("\n".join(self.sample_ids).encode()).hexdigest()[:12]
        return json.dumps({**self.identity, "sample_ids": ids}, sort_keys=True, default=str)

    @property
    def baseline(self) -> str | None:
        """A fingerprint of the paired baseline's per-sample scores (None: the run has no baseline)."""
        scores = sorted((r["id"], (r.get("runs", {}).get("baseline") or {}).get("score")) for r in self.records
                        if "baseline" in r.get("runs", {}))
        if not scores:
            return None
        return hashlib.sha256(json.dumps(scores).encode()).hexdigest()[:12]


def find_run_dirs(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """Every run directory (one holding results.jsonl, or the results files of shards) below ``paths``, with its name
    relative to the path given."""
    found = {}
    for path in map(Path, paths):
        candidates = [path] if has_results(path) else []
        candidates += sorted({p.parent for p in path.rglob("results*.jsonl") if has_results(p.parent)})
        for run_dir in candidates:
            relative = run_dir.relative_to(path).as_posix() if run_dir != path else path.name
            found.setdefault(run_dir.resolve(), relative or run_dir.name)
    return sorted(((d, n) for d, n in found.items()), key=lambda item: str(item[0]))


def load_run(run_dir: Path, name: str | None = None) -> Run:
    """A run's identity and per-label summary (summary.json, or recomputed from the records of a partial run, or of
    shards not merged yet). Shards of different configurations are refused (ShardMismatch)."""
    run_dir = Path(run_dir)
    recorded = check_signatures(run_dir)
    records = read_records(run_dir)
    config = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    signature = json.loads((run_dir / SIGNATURE_FILE).read_text()) if (run_dir / SIGNATURE_FILE).exists() else {}
    signature = recorded or signature
    payload = json.loads((run_dir / SUMMARY_FILE).read_text()) if (run_dir / SUMMARY_FILE).exists() else None
    identity = (payload or {}).get("identity") or signature.get("identity") or _identity_from_config(config)
    planned = (payload or {}).get("samples")
    if payload is not None and all(entry.get("samples") == len(records) for entry in payload["methods"].values()):
        methods, model, dataset = payload["methods"], payload["model"], payload["dataset"]
    else:  # partial (or resumed since): recompute from the records
        if config is None:
            raise FileNotFoundError(f"{run_dir} has results but no config.yaml")
        from ..data import create_dataset

        dataset_cfg = OmegaConf.to_container(config.dataset, resolve=True)
        dataset_cfg = {k: v for k, v in dataset_cfg.items() if not (k == "n_samples" and v is None)}
        built = create_dataset(dataset_cfg.pop("name"), **dataset_cfg)
        labels = sorted({label for r in records for label in r.get("runs", {})}, key=lambda l: (l != "baseline", l))
        methods = summarize(records, labels, built.scorer, "baseline" if "baseline" in labels else None)
        model, dataset = config.model.name, built.name
        planned = planned or len(built)
    return Run(run_dir, name or run_dir.name, identity, methods, records, planned, model, dataset)


def _identity_from_config(config) -> dict:
    """The identity of a run written before runs recorded one: what its config says."""
    if config is None:
        return {}
    model = OmegaConf.to_container(config.model, resolve=True)
    dataset = OmegaConf.to_container(config.dataset, resolve=True)
    return {"model": {k: model.get(k) for k in ("name", "weights", "path", "dtype")},
            "dataset": {"name": dataset.get("name"), "split": dataset.get("split")},
            "settings": {"max_new_tokens": config.run.get("max_new_tokens"),
                         "attn_implementation": model.get("attn_implementation")}}


# ---------------------------------------------------------------------------------------------------------
# Groups and their tables
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    label: str  # the method label (unique within its group's table)
    run: Run
    entry: dict  # summary entry
    runs: list[Run] = field(default_factory=list)  # the runs it stands for (a shared baseline: several)

    @property
    def run_names(self) -> str:
        return ", ".join(r.name for r in self.runs or [self.run])

    @property
    def method(self) -> str:
        return self.entry.get("label", self.label).split("(")[0].split(" [")[0]


@dataclass
class Group:
    """Comparable runs: one table. ``rows`` in table order: each baseline, then the methods paired with it."""

    runs: list[Run]
    rows: list[Row]

    @property
    def title(self) -> str:
        first = self.runs[0]
        return f"{first.dataset} · {first.model} · {len(first.records)} samples"

    @property
    def notes(self) -> list[str]:
        """What the group holds, so that tables of the same model and dataset names are told apart."""
        identity = self.runs[0].identity
        model = identity.get("model", {})
        dataset = identity.get("dataset", {})
        settings = identity.get("settings", {})
        ids = hashlib.sha256("\n".join(self.runs[0].sample_ids).encode()).hexdigest()[:8]
        model_text = ", ".join(f"{k} {model[k]}" for k in ("weights", "checkpoint", "path", "dtype") if model.get(k))
        dataset_text = ", ".join([f"split {dataset.get('split')}"] if dataset.get("split") else [])
        dataset_text += (", " if dataset_text else "") + f"{len(self.runs[0].records)} samples, ids {ids}"
        settings_text = ", ".join(f"{k} {v}" for k, v in sorted(settings.items()) if v not in (None, {}, []))
        lines = [f"model: {model.get('name', self.runs[0].model)} ({model_text}) · dataset: "
                 f"{dataset.get('name', self.runs[0].dataset)} ({dataset_text})"
                 + (f" · settings: {settings_text}" if settings_text else ""),
                 f"runs: {', '.join(r.name for r in self.runs)}"]
        partial = [f"{r.name} ({len(r.records)} of {r.planned})" for r in self.runs
                   if r.planned is not None and len(r.records) < r.planned]
        if partial:
            lines.append(f"partial runs: {', '.join(partial)}")
        return [line + "  " for line in lines[:-1]] + lines[-1:] + [""]

    def difficulty(self) -> list[str]:
        """The difficult-subset view (``run/difficulty.py``) for every downsample row of the group (none without)."""
        rows = [{"label": row.label, "method": row.method, "records": row.run.records,
                 "record_label": row.entry.get("label", "baseline"), "visual_tokens": row.entry.get("visual_tokens"),
                 "visual_tokens_layer_mean": row.entry.get("visual_tokens_layer_mean")}
                for row in self.rows]
        return difficulty_sections(rows, self.title)

    def table(self) -> str:
        summary = {row.label: row.entry for row in self.rows}
        return format_table(summary, self.title, runs={row.label: self._run_cell(row) for row in self.rows},
                            notes=self.notes)

    def _run_cell(self, row: Row) -> str:
        """Which run(s) a row comes from; a baseline shared by many runs is not spelled out run by run."""
        runs = row.runs or [row.run]
        if len(runs) > 1 and len(runs) == len(self.runs):
            return f"all {len(runs)} runs"
        return runs[0].name if len(runs) == 1 else f"{runs[0].name} and {len(runs) - 1} more"


def group_runs(runs: list[Run]) -> list[Group]:
    """Comparable runs together (equal ``Run.key``); inside a group, runs whose baselines gave the same per-sample
    scores share one baseline row, and every other row follows the baseline it was paired with."""
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_key[run.key].append(run)
    groups = []
    for members in by_key.values():
        by_baseline: dict[str | None, list[Run]] = defaultdict(list)
        for run in members:
            by_baseline[run.baseline].append(run)
        several = len(by_baseline) > 1
        rows: list[Row] = []
        used: set[str] = set()
        for fingerprint, block in by_baseline.items():
            if fingerprint is not None:
                label = "baseline" if not several else f"baseline [{block[0].name}]"
                rows.append(Row(_unique(label, used), block[0], block[0].methods["baseline"], runs=block))
            for run in block:
                for label, entry in run.methods.items():
                    if label == "baseline":
                        continue
                    rows.append(Row(_unique(label, used, run.name), run, {**entry, "label": label}))
        groups.append(Group(members, rows))
    return sorted(groups, key=lambda g: (g.runs[0].model, g.runs[0].dataset, g.title, g.runs[0].name))


def _unique(label: str, used: set[str], run_name: str = "") -> str:
    key = label if label not in used else f"{label} [{run_name}]"
    used.add(key)
    return key


def collect(paths: list[str | Path]) -> list[Group]:
    return group_runs([load_run(run_dir, name) for run_dir, name in find_run_dirs(paths)])


def tables(paths: list[str | Path]) -> str:
    """The Markdown tables of every group of runs below ``paths`` (what a sweep prints at its end)."""
    return "\n\n".join("\n\n".join([group.table(), *group.difficulty()]).rstrip() for group in collect(paths))


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------
def _headline(entry: dict):
    value = entry["metrics"].get(entry["headline"])
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def flops_unit(values: list[float]) -> tuple[str, float]:
    """GFLOPs or TFLOPs (MFLOPs for tiny models), chosen by the largest value."""
    largest = max(values, default=0.0)
    for unit, scale in FLOP_UNITS:
        if largest >= scale:
            return unit, scale
    return FLOP_UNITS[-1]


def _line_label(method: str, runs: list[str]) -> str:
    names = list(dict.fromkeys(runs))
    shown = ", ".join(names[:3]) + (f", +{len(names) - 3} more" if len(names) > 3 else "")
    return f"{method} ({shown})"


def pareto_figure(rows: list[dict], x: str, title: str = ""):
    """Headline metric against ``x`` ("visual_tokens_layer_mean" or "flops"), one line per method and run.

    ``rows``: summary entries with ``label`` and ``run`` (the run each comes from). The metric axis shows the
    metric's unit and stays within its range; FLOPs are in G or T by magnitude; the legend names every line's
    runs, outside the axes, and nothing is clipped (constrained layout).
    """
    figure, axis = plt.subplots(figsize=(7.5, 4.4), layout="constrained")
    points: dict[tuple[str, str], list] = defaultdict(list)
    runs_of: dict[tuple[str, str], list[str]] = defaultdict(list)
    flops = [r["flops"]["tokenprune"] for r in rows if r.get("flops", {}).get("tokenprune")]
    unit, scale = flops_unit(flops)
    for row in rows:
        value = row["flops"]["tokenprune"] / scale if x == "flops" and row["flops"]["tokenprune"] else \
            (row.get(x) if x != "flops" else None)
        if value is None or _headline(row) is None:
            continue
        method = row["label"].split("(")[0].split(" [")[0]
        key = (method, row.get("block", ""))
        points[key].append((value, _headline(row)))
        runs_of[key] += [name.strip() for name in str(row.get("run", "")).split(",") if name.strip()]
    for (method, _), values in sorted(points.items()):
        values.sort()
        marker = "*" if method == "baseline" else "o"
        axis.plot([p[0] for p in values], [p[1] for p in values], marker=marker, markersize=10 if marker == "*" else 5,
                  label=_line_label(method, runs_of[(method, _)]) if runs_of[(method, _)] else method,
                  linestyle="-" if len(values) > 1 else "none", clip_on=False)
    axis.set_xlabel("layer-averaged visual tokens" if x != "flops" else f"prefill {unit} (tokenprune convention)")
    headline = rows[0]["headline"] if rows else "score"
    metric_unit = rows[0].get("headline_unit", "%") if rows else "%"
    low, high = rows[0].get("headline_range", (0.0, 100.0)) if rows else (0.0, 100.0)
    axis.set_ylabel(f"{headline} ({metric_unit})")
    axis.set_ylim(low, high)
    axis.set_title(textwrap.fill(title, 90), fontsize=8)
    axis.grid(alpha=0.3)
    if points:
        figure.legend(fontsize=7, loc="outside lower center", ncols=1)
    return fit(figure)


def delta_figure(rows: list[dict], title: str = ""):
    """Paired deltas with 95% intervals, one row per method run, labelled with the run it comes from."""
    rows = [r for r in rows if "paired_delta" in r]
    figure, axis = plt.subplots(figsize=(7.5, 0.35 * max(3, len(rows)) + 1.2), layout="constrained")
    for i, row in enumerate(rows):
        delta = row["paired_delta"]
        low, high = delta["ci95"]
        axis.errorbar(delta["mean"], i, xerr=[[delta["mean"] - low], [high - delta["mean"]]] if not math.isnan(low) else None,
                      fmt="o", capsize=3)
    axis.axvline(0.0, color="gray", linewidth=1)
    axis.set_yticks(range(len(rows)), [f"{r['label']} ({r['run']})" if r.get("run") else r["label"] for r in rows],
                    fontsize=7)
    axis.set_xlabel("paired Δ vs baseline (points, 95% CI)")
    axis.set_title(textwrap.fill(title, 90), fontsize=8)
    return fit(figure)


def fit(figure, margin: float = 0.1):
    """Grow ``figure`` until every artist lies inside it (long run names, legends, titles): nothing is clipped."""
    for _ in range(4):
        figure.canvas.draw()
        needed = figure.get_tightbbox(figure.canvas.get_renderer())  # inches, with the figure's own origin
        width, height = figure.get_size_inches()
        grow_w = max(0.0, needed.x1 - width, -needed.x0) + (margin if needed.x1 > width or needed.x0 < 0 else 0)
        grow_h = max(0.0, needed.y1 - height, -needed.y0) + (margin if needed.y1 > height or needed.y0 < 0 else 0)
        if not grow_w and not grow_h:
            break
        figure.set_size_inches(width + 2 * grow_w, height + 2 * grow_h)
    return figure


def clipped_texts(figure) -> list[str]:
    """Texts ``figure`` draws (titles, axis labels, tick labels in view, legend entries) that stick out of it."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [*figure.texts]
    for axis in figure.axes:
        texts += [axis.title, axis.xaxis.label, axis.yaxis.label]
        for ticks, limits in ((axis.xaxis, axis.get_xlim()), (axis.yaxis, axis.get_ylim())):
            low, high = sorted(limits)
            texts += [tick.label1 for tick in ticks.get_major_ticks() if low <= tick.get_loc() <= high]
    for legend in [*figure.legends, *(a.get_legend() for a in figure.axes if a.get_legend() is not None)]:
        texts += legend.get_texts()
    box = figure.bbox
    outside = []
    for text in texts:
        if not text.get_visible() or not text.get_text().strip():
            continue
        extent = text.get_window_extent(renderer)
        if extent.x0 < box.x0 - 1 or extent.y0 < box.y0 - 1 or extent.x1 > box.x1 + 1 or extent.y1 > box.y1 + 1:
            outside.append(text.get_text())
    return outside


def _plot_rows(group: Group) -> list[dict]:
    """The group's rows for the plots: each with the runs it comes from, and its baseline block (lines of one
    method join points paired with the same baseline)."""
    return [{**row.entry, "label": row.entry.get("label", row.label), "run": row.run_names,
             "block": row.run.baseline or row.run.name} for row in group.rows]


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    groups = collect(paths)
    if not groups:
        raise FileNotFoundError(f"no {RESULTS_FILE} found under {', '.join(map(str, paths))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# tokenprune report", ""]
    stems: dict[str, int] = defaultdict(int)
    for group in groups:
        first = group.runs[0]
        stem = f"{first.model}_{first.dataset}".replace("/", "_")
        stems[stem] += 1
        stem = stem if stems[stem] == 1 else f"{stem}_{stems[stem]}"
        rows = _plot_rows(group)
        title = f"{group.title} · runs: {', '.join(r.name for r in group.runs)}"
        sections += [group.table(), "", *group.difficulty(),
                     f"![accuracy vs tokens]({stem}_tokens.png) ![accuracy vs FLOPs]({stem}_flops.png)", ""]
        for x, suffix in (("visual_tokens_layer_mean", "tokens"), ("flops", "flops")):
            figure = pareto_figure(rows, x, title)
            figure.savefig(out / f"{stem}_{suffix}.png", dpi=120)
            plt.close(figure)
        if any("paired_delta" in row for row in rows):
            figure = delta_figure(rows, title)
            figure.savefig(out / f"{stem}_deltas.png", dpi=120)
            plt.close(figure)
            sections += [f"![paired deltas]({stem}_deltas.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(sections))
    (out / "report.json").write_text(json.dumps(
        [{"title": g.title, "runs": [str(r.run_dir) for r in g.runs], "identity": g.runs[0].identity,
          "rows": [{"label": row.label, "run": row.run_names, **row.entry} for row in g.rows]} for g in groups],
        indent=2, default=str))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenprune.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run directories, or folders containing them (searched recursively)")
    parser.add_argument("--out", default="report", help="where report.md and the PNG plots go (default: ./report)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.dirs, args.out)
    except ShardMismatch as error:
        raise SystemExit(f"tokenprune.report: {error}") from None
    print(report.read_text())
    print(f"\nwritten: {report} and plots beside it")


if __name__ == "__main__":
    main()
