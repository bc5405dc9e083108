"""Crash-safe results: one JSON line per sample, appended, flushed and fsynced; resumable; summaries.

A record holds the sample and, under ``runs``, one entry per method label (the paired baseline included):

    {"index": 3, "id": "test-0-3", "question": ..., "answer": ..., "meta": {...}, "error": null,
     "runs": {"baseline": {"prediction": "red", "score": 1.0, "error": null, "visual_tokens": 144, ...,
                           "flops": {...}, "timing": {...}, "memory": {...}}, "fastv": {...}}}

One process writes into a run directory at a time: ``ResultStore`` holds an exclusive lock on ``<run dir>/.lock``
(released by the kernel when the process ends, however it ends), and a second writer is refused with the
holder's pid, host, start time and command. Rerunning into the same directory skips samples already recorded;
a damaged line (a write cut short by a crash, or a line edited by hand) never costs the valid records around it:
it is moved to ``results.damaged.jsonl`` and its sample runs again.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import math
import os
import random
import socket
import sys
from pathlib import Path
from statistics import mean

RESULTS_FILE = "results.jsonl"
DAMAGED_FILE = "results.damaged.jsonl"
SIGNATURE_FILE = "run.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"

log = logging.getLogger("tokenprune")


class RunDirectoryBusy(RuntimeError):
    """Another process holds the run directory's lock."""


class RunDirectoryLock:
    """An exclusive ``flock`` on ``<run dir>/.lock``; the file says who holds it (pid, host, since, command)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._handle = None

    def acquire(self) -> "RunDirectoryLock":
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            try:
                info = json.loads(holder)
                who = (f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}: "
                       f"{info.get('command')}")
            except (json.JSONDecodeError, AttributeError):
                who = holder or "unknown process"
            raise RunDirectoryBusy(f"{self.path.parent} is being written by another tokenprune process ({who}); "
                                   "wait for it to finish, or give this run another directory (hydra.run.dir=...)")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.datetime.now().isoformat(timespec="seconds"),
                                 "command": " ".join(sys.argv)}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def is_error_record(record: dict) -> bool:
    """A sample that failed as a whole, or on which any method failed."""
    return record.get("error") is not None or any(run.get("error") is not None for run in record.get("runs", {}).values())


def scan_lines(path: Path) -> tuple[list[dict], list[tuple[int, bytes]]]:
    """Every valid record of a results file, and the damaged lines as (line number, bytes): a line that is not a
    JSON object with an ``id``, or a last line without its newline (a write cut short)."""
    records, damaged = [], []
    if not path.exists():
        return records, damaged
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line) if line.endswith(b"\n") else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if isinstance(record, dict) and "id" in record:
                records.append(record)
            else:
                damaged.append((number, line))
    return records, damaged


class ResultStore:
    """The results of one run directory, for the one process that holds its lock (``close()`` releases it).

    This is where a process's records go: a sharded run (several processes) gives each its own store.
    """

    def __init__(self, run_dir: str | Path, signature: dict):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / RESULTS_FILE
        self.lock = RunDirectoryLock(self.run_dir).acquire()
        try:
            self._check_signature(signature)
        except Exception:
            self.lock.release()
            raise

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def _check_signature(self, signature: dict) -> None:
        file = self.run_dir / SIGNATURE_FILE
        has_records = self.path.exists() and self.path.stat().st_size > 0
        if file.exists() and has_records:  # a directory without records (a launch that failed) never blocks a run
            previous = json.loads(file.read_text())
            if previous != signature:
                changed = sorted(k for k in set(previous) | set(signature) if previous.get(k) != signature.get(k))
                raise ValueError(
                    f"{self.run_dir} holds results of a different run (differs in: {', '.join(changed)}); "
                    "use a new output directory (hydra.run.dir=...) or the same configuration to resume"
                )
        file.write_text(json.dumps(signature, indent=2, sort_keys=True))

    def load(self) -> dict[str, dict]:
        """Completed records by sample id. Damaged lines move to ``results.damaged.jsonl`` (their samples run
        again); every valid record stays. A repeated id keeps its last record."""
        records, damaged = scan_lines(self.path)
        by_id = {record["id"]: record for record in records}
        if damaged or len(by_id) != len(records):
            if damaged:
                with (self.run_dir / DAMAGED_FILE).open("ab") as side:
                    for number, line in damaged:
                        side.write(line if line.endswith(b"\n") else line + b"\n")
                log.warning("%s: %d damaged line(s) (line %s) moved to %s; %d valid records kept, their samples "
                            "run again", self.path, len(damaged), ", ".join(str(n) for n, _ in damaged[:10]),
                            DAMAGED_FILE, len(by_id))
            self._rewrite(list(by_id.values()))
        return by_id

    def drop(self, ids: set[str]) -> int:
        """Remove the records of ``ids`` (they run again: ``run.retry_errors``); returns how many were removed."""
        records, _ = scan_lines(self.path)
        kept = [r for r in records if r["id"] not in ids]
        if len(kept) != len(records):
            self._rewrite(kept)
        return len(records) - len(kept)

    def _rewrite(self, records: list[dict]) -> None:
        """Replace the file atomically (written beside it, fsynced, renamed over it)."""
        partial = self.path.with_suffix(".jsonl.partial")
        with partial.open("w") as handle:
            for record in records:
                handle.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(self.path)

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
    """The valid records of a run directory, by sample index (damaged lines are skipped; the last record of a
    repeated id wins)."""
    records, _ = scan_lines(Path(run_dir) / RESULTS_FILE)
    by_id = {record["id"]: record for record in records}
    return sorted(by_id.values(), key=lambda r: r["index"])


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
            "headline_unit": getattr(scorer, "headline_unit", "%"),
            "headline_range": list(getattr(scorer, "headline_range", (0.0, 100.0))),
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


def format_table(summary: dict, title: str = "", runs: dict | None = None, notes: list[str] = ()) -> str:
    """Markdown table of a summary (label -> entry). ``runs``: label -> the run it comes from (adds a column);
    ``notes``: lines printed between the title and the table."""
    header = ["method", *(["run"] if runs else []), "score", "Δ vs baseline [95% CI]", "visual in", "visual layer-avg",
              "prefill FLOPs", "rel. FLOPs", "prefill ms", "decode ms/tok", "overhead ms", "errors"]
    lines = [f"### {title}" if title else "", *notes, "| " + " | ".join(header) + " |",
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
            entry.get("label", label),
            *([runs[label]] if runs else []),
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
