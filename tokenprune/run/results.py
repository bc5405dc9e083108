"""Crash-safe results: one JSON line per sample, appended, flushed and fsynced; resumable; summaries.

A record holds the sample and, under ``runs``, one entry per method label (the paired baseline included):

    {"index": 3, "id": "test-0-3", "question": ..., "answer": ..., "meta": {...}, "error": null,
     "runs": {"baseline": {"prediction": "red", "score": 1.0, "error": null, "visual_tokens": 144, ...,
                           "flops": {...}, "timing": {...}, "memory": {...}}, "fastv": {...}}}

Rerunning into the same directory skips samples already recorded (a line cut short by a crash is dropped
and its sample run again), so every sample ends up exactly once.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from statistics import mean

RESULTS_FILE = "results.jsonl"
SIGNATURE_FILE = "run.json"
SUMMARY_FILE = "summary.json"


class ResultStore:
    def __init__(self, run_dir: str | Path, signature: dict):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / RESULTS_FILE
        self._check_signature(signature)

    def _check_signature(self, signature: dict) -> None:
        file = self.run_dir / SIGNATURE_FILE
        if file.exists():
            previous = json.loads(file.read_text())
            if previous != signature:
                changed = sorted(k for k in set(previous) | set(signature) if previous.get(k) != signature.get(k))
                raise ValueError(
                    f"{self.run_dir} holds results of a different run (differs in: {', '.join(changed)}); "
                    "use a new output directory (hydra.run.dir=...) or the same configuration to resume"
                )
        else:
            file.write_text(json.dumps(signature, indent=2, sort_keys=True))

    def load(self) -> dict[str, dict]:
        """Completed records by sample id; drops (and truncates away) a final line cut short by a crash."""
        if not self.path.exists():
            return {}
        records, good_bytes = {}, 0
        with self.path.open("rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                records[record["id"]] = record
                good_bytes += len(line)
        if good_bytes != self.path.stat().st_size:
            with self.path.open("r+b") as handle:
                handle.truncate(good_bytes)
        return records

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True, default=_json_default) + "\n"
        with self.path.open("a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dict__"):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def read_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / RESULTS_FILE
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return sorted(records, key=lambda r: r["index"])


# ---------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------
def flatten(records: list[dict], label: str) -> list[dict]:
    """Per-sample dicts for one method label, in the shape scorers aggregate."""
    flat = []
    for record in records:
        run = record.get("runs", {}).get(label)
        if run is None:
            flat.append({"id": record["id"], "prediction": None, "answer": record.get("answer"), "score": None,
                         "error": record.get("error") or "not run", "meta": record.get("meta", {})})
            continue
        flat.append({"id": record["id"], "prediction": run.get("prediction"), "answer": record.get("answer"),
                     "score": run.get("score"), "error": run.get("error"), "meta": record.get("meta", {}), **run})
    return flat


def bootstrap_interval(values: list[float], seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (deterministic)."""
    if len(values) < 2:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def _mean_of(rows: list[dict], key: str, sub: str | None = None):
    values = []
    for row in rows:
        value = row.get(key)
        if sub is not None:
            value = value.get(sub) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values.append(float(value))
    return mean(values) if values else None


def summarize(records: list[dict], labels: list[str], scorer, baseline_label: str | None = "baseline") -> dict:
    """Per label: the benchmark's own metrics (scorer.aggregate), token / FLOPs / latency / memory means, and the
    paired delta of per-sample scores against the baseline with a 95% bootstrap interval."""
    summary = {}
    baseline_scores = {}
    if baseline_label in labels:
        baseline_scores = {r["id"]: r["score"] for r in flatten(records, baseline_label)
                           if r.get("error") is None and r.get("score") is not None}
    baseline_flops = None
    for label in labels:
        rows = flatten(records, label)
        ok = [r for r in rows if r.get("error") is None and r.get("score") is not None]
        entry = {
            "samples": len(rows),
            "scored": len(ok),
            "errors": len(rows) - len(ok),
            "metrics": scorer.aggregate(rows),
            "headline": scorer.headline,
            "visual_tokens": _mean_of(ok, "visual_tokens"),
            "visual_tokens_layer_mean": _mean_of(ok, "visual_tokens_layer_mean"),
            "tokens_layer_mean": _mean_of(ok, "tokens_layer_mean"),
            "flops": {name: _mean_of(ok, "flops", name) for name in ("tokenprune", "fastv", "pdrop", "himap")},
            "timing": {name: _mean_of(ok, "timing", name) for name in
                       ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "total_ms", "overhead_ms")},
            "peak_memory_bytes": _mean_of(ok, "memory", "peak_memory_bytes"),
            "kv_cache_bytes": _mean_of(ok, "memory", "kv_cache_bytes"),
        }
        if label == baseline_label:
            baseline_flops = entry["flops"]["tokenprune"]
        if baseline_scores and label != baseline_label:
            deltas = [r["score"] - baseline_scores[r["id"]] for r in ok if r["id"] in baseline_scores]
            if deltas:
                low, high = bootstrap_interval(deltas)
                entry["paired_delta"] = {"mean": 100.0 * mean(deltas), "ci95": [100.0 * low, 100.0 * high],
                                         "pairs": len(deltas)}
        summary[label] = entry
    if baseline_flops:
        for entry in summary.values():
            if entry["flops"]["tokenprune"] is not None:
                entry["relative_flops"] = entry["flops"]["tokenprune"] / baseline_flops
    return summary


def format_table(summary: dict, title: str = "") -> str:
    """Markdown table of a summary."""
    header = ["method", "score", "Δ vs baseline [95% CI]", "visual in", "visual layer-avg", "prefill FLOPs", "rel. FLOPs",
              "prefill ms", "decode ms/tok", "overhead ms", "errors"]
    lines = [f"### {title}" if title else "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for label, entry in summary.items():
        headline = entry["metrics"].get(entry["headline"])
        delta = entry.get("paired_delta")
        if delta is None:
            delta_text = "—"
        elif any(math.isnan(bound) for bound in delta["ci95"]):
            delta_text = f"{delta['mean']:+.1f} (n={delta['pairs']})"
        else:
            delta_text = f"{delta['mean']:+.1f} [{delta['ci95'][0]:+.1f}, {delta['ci95'][1]:+.1f}]"
        flops = entry["flops"]["tokenprune"]
        cells = [
            label,
            _fmt(headline, "{:.1f}") + f" ({entry['headline']})",
            delta_text,
            _fmt(entry["visual_tokens"], "{:.0f}"),
            _fmt(entry["visual_tokens_layer_mean"], "{:.1f}"),
            _flops(flops),
            _fmt(entry.get("relative_flops"), "{:.2f}"),
            _fmt(entry["timing"]["prefill_ms"], "{:.1f}"),
            _fmt(entry["timing"]["decode_ms_per_token"], "{:.1f}"),
            _fmt(entry["timing"]["overhead_ms"], "{:.2f}"),
            str(entry["errors"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line != "" or title)


def _flops(value) -> str:
    if value is None:
        return "—"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return pattern.format(value)
