"""Crash-safe results: one JSON line per sample, appended, flushed and fsynced; resumable; shardable; summaries.

A record holds the sample and, under ``runs``, one entry per method label (the paired baseline included):

    {"index": 3, "id": "test-0-3", "question": ..., "answer": ..., "meta": {...}, "error": null,
     "runs": {"baseline": {"prediction": "red", "score": 1.0, "error": null, "visual_tokens": 144, ...,
                           "flops": {...}, "timing": {...}, "memory": {...}}, "fastv": {...}}}

Writers of a run directory and their files:

* one process (the usual run): ``results.jsonl`` and ``run.json`` (the run's configuration), holding an exclusive
  lock on ``<run dir>/.lock``;
* shard ``i`` of ``n`` (``run.shard=i/n``, or rank ``i`` of a torchrun group of ``n``): ``results.shard-i-of-n.jsonl``
  and ``run.shard-i-of-n.json``, holding a shared lock on ``.lock`` (shards run side by side; a one-process writer
  or a merge waits for all of them) and an exclusive lock on ``.lock.shard-i-of-n`` (one writer per shard).

Locks are released by the kernel when the process ends, however it ends; a refused writer is told the holder's
pid, host, start time and command. A run directory reads as the union of its results files (``read_records``):
a sample recorded twice keeps its last record, except that a record without an error beats one with an error (a
retried sample). ``merge_shards`` folds the shard files into ``results.jsonl`` once no writer is left, and refuses
shards whose configurations differ. Rerunning into a directory skips the samples any of its files holds; a damaged
line (a write cut short by a crash, or a line edited by hand) never costs the valid records around it: it is moved
to ``results.damaged.jsonl`` and its sample runs again.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import math
import os
import random
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

RESULTS_FILE = "results.jsonl"
DAMAGED_FILE = "results.damaged.jsonl"
SIGNATURE_FILE = "run.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
SHARD_RESULTS = re.compile(r"^results\.shard-(\d+)-of-(\d+)\.jsonl$")

log = logging.getLogger("tokenprune")


class RunDirectoryBusy(RuntimeError):
    """Another process holds the run directory's lock (or the lock of the same shard)."""


class ShardMismatch(ValueError):
    """The results files of a run directory come from different configurations."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the writer of one share of a run's samples (``run.shard=index/count``, or rank
    ``index`` of a torchrun group of ``count`` processes)."""

    index: int
    count: int

    def __post_init__(self):
        if not (isinstance(self.index, int) and isinstance(self.count, int) and 0 <= self.index < self.count):
            raise ValueError(f"a shard is i/n with 0 <= i < n, got {self.index}/{self.count}")

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    @classmethod
    def parse(cls, text) -> "Shard":
        """``"i/n"`` → Shard(i, n); ValueError naming the expected form."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if match is None or not int(match[1]) < int(match[2]):
            raise ValueError(f"run.shard must be i/n with 0 <= i < n (shard i of n, e.g. run.shard=0/4), got {text!r}")
        return cls(int(match[1]), int(match[2]))


def results_path(run_dir: str | Path, shard: Shard | None = None) -> Path:
    return Path(run_dir) / (RESULTS_FILE if shard is None else f"results.{shard.name}.jsonl")


def signature_path(run_dir: str | Path, shard: Shard | None = None) -> Path:
    return Path(run_dir) / (SIGNATURE_FILE if shard is None else f"run.{shard.name}.json")


def shard_lock_path(run_dir: str | Path, shard: Shard) -> Path:
    return Path(run_dir) / f"{LOCK_FILE}.{shard.name}"


def shard_files(run_dir: str | Path) -> list[tuple[Shard, Path]]:
    """The shard results files of a run directory, by shard count then index."""
    found = []
    for path in Path(run_dir).glob("results.shard-*-of-*.jsonl"):
        match = SHARD_RESULTS.match(path.name)
        if match and int(match[1]) < int(match[2]):
            found.append((Shard(int(match[1]), int(match[2])), path))
    return sorted(found, key=lambda item: (item[0].count, item[0].index))


def result_files(run_dir: str | Path) -> list[Path]:
    """Every results file of a run directory that exists: ``results.jsonl`` first, then the shards'."""
    main = results_path(run_dir)
    return ([main] if main.exists() else []) + [path for _, path in shard_files(run_dir)]


def has_results(run_dir: str | Path) -> bool:
    return bool(result_files(run_dir))


class RunDirectoryLock:
    """The lock of one writer of a run directory (see the module docstring): ``shard=None``, an exclusive ``flock`` on
    ``<run dir>/.lock``; a shard, a shared lock on ``.lock`` plus an exclusive one on ``.lock.shard-i-of-n``. The
    exclusively locked file says who holds it (pid, host, since, command)."""

    def __init__(self, run_dir: Path, shard: Shard | None = None):
        self.run_dir = Path(run_dir)
        self.shard = shard
        self.path = self.run_dir / LOCK_FILE
        self._handles: list = []

    def acquire(self, blocking: bool = False) -> "RunDirectoryLock":
        try:
            if self.shard is None:
                self._take(self.path, fcntl.LOCK_EX, blocking)
            else:
                self._take(self.path, fcntl.LOCK_SH, blocking)
                self._take(shard_lock_path(self.run_dir, self.shard), fcntl.LOCK_EX, blocking)
        except RunDirectoryBusy:
            self.release()
            raise
        return self

    def _take(self, path: Path, mode: int, blocking: bool) -> None:
        handle = path.open("a+")
        try:
            fcntl.flock(handle, mode | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            handle.close()
            raise RunDirectoryBusy(self._refusal(path)) from None
        if mode == fcntl.LOCK_EX:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": datetime.datetime.now().isoformat(timespec="seconds"),
                                     "command": " ".join(sys.argv)}))
            handle.flush()
        self._handles.append(handle)

    def _refusal(self, path: Path) -> str:
        if path != self.path:
            return (f"{self.run_dir}: {self.shard.name} is being written by another tokenprune process "
                    f"({_holder(path)}); wait for it to finish, or run another shard")
        shards = [f"{p.name.removeprefix(LOCK_FILE + '.')}: {_holder(p)}" for p in sorted(self.run_dir.glob(LOCK_FILE + ".shard-*"))
                  if _is_locked(p)]
        who = "shards " + "; ".join(shards) if shards else _holder(path)
        return (f"{self.run_dir} is being written by another tokenprune process ({who}); wait for it to finish, or "
                "give this run another directory (hydra.run.dir=...)")

    def release(self) -> None:
        for handle in reversed(self._handles):
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "RunDirectoryLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _holder(path: Path) -> str:
    """Who holds a lock file, from what its holder wrote into it."""
    try:
        info = json.loads(path.read_text())
        return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}: {info.get('command')}"
    except (OSError, json.JSONDecodeError, AttributeError):
        return "unknown process"


def _is_locked(path: Path) -> bool:
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


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


def keep_record(records: dict[str, dict], record: dict) -> None:
    """Add ``record`` to ``records`` (by id): a later record replaces an earlier one, unless it holds an error and
    the earlier one does not."""
    previous = records.get(record["id"])
    if previous is None or not (is_error_record(record) and not is_error_record(previous)):
        records[record["id"]] = record


class ResultStore:
    """The results of one writer of a run directory (the one process, or one shard), holding its lock until
    ``close()``. Opening checks the configuration against every results file of the directory; the one process
    first folds any shard files left by an earlier sharded run into ``results.jsonl``."""

    def __init__(self, run_dir: str | Path, signature: dict, shard: Shard | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.shard = shard
        self.path = results_path(self.run_dir, shard)
        self.lock = RunDirectoryLock(self.run_dir, shard).acquire()
        try:
            self._check_signature(signature)
            if shard is None and shard_files(self.run_dir):
                merge_shards(self.run_dir)
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
        for name, previous in recorded_signatures(self.run_dir).items():
            if previous != signature:  # a file without records (a launch that failed) never blocks a run
                raise ValueError(
                    f"{self.run_dir} holds results of a different run ({name} differs in: {_differing(previous, signature)}); "
                    "use a new output directory (hydra.run.dir=...) or the same configuration to resume"
                )
        signature_path(self.run_dir, self.shard).write_text(json.dumps(signature, indent=2, sort_keys=True))

    def load(self) -> dict[str, dict]:
        """This writer's completed records by sample id. Damaged lines move to ``results.damaged.jsonl`` (their
        samples run again); every valid record stays. A repeated id keeps its last record."""
        records, damaged = scan_lines(self.path)
        by_id = {record["id"]: record for record in records}
        if damaged or len(by_id) != len(records):
            if damaged:
                _set_aside(self.run_dir, damaged)
                log.warning("%s: %d damaged line(s) (line %s) moved to %s; %d valid records kept, their samples "
                            "run again", self.path, len(damaged), ", ".join(str(n) for n, _ in damaged[:10]),
                            DAMAGED_FILE, len(by_id))
            _rewrite(self.path, list(by_id.values()))
        return by_id

    def drop(self, ids: set[str]) -> int:
        """Remove the records of ``ids`` from this writer's file (they run again: ``run.retry_errors``); returns how
        many were removed."""
        records, _ = scan_lines(self.path)
        kept = [r for r in records if r["id"] not in ids]
        if len(kept) != len(records):
            _rewrite(self.path, kept)
        return len(records) - len(kept)

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True, default=_json_default) + "\n"
        with self.path.open("a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _differing(a: dict, b: dict) -> str:
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def _set_aside(run_dir: Path, damaged: list[tuple[int, bytes]]) -> None:
    with (run_dir / DAMAGED_FILE).open("ab") as side:
        for _, line in damaged:
            side.write(line if line.endswith(b"\n") else line + b"\n")


def _rewrite(path: Path, records: list[dict]) -> None:
    """Replace ``path`` atomically (written beside it, fsynced, renamed over it)."""
    partial = path.with_suffix(".jsonl.partial")
    with partial.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dict__"):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def read_records(run_dir: str | Path) -> list[dict]:
    """The valid records of every results file of a run directory (``results.jsonl`` and shard files), by sample
    index; damaged lines are skipped, a sample recorded twice keeps its last record unless that one holds an error
    and an earlier one does not."""
    by_id: dict[str, dict] = {}
    for path in result_files(run_dir):
        for record in scan_lines(path)[0]:
            keep_record(by_id, record)
    return sorted(by_id.values(), key=lambda r: r["index"])


def recorded_signatures(run_dir: str | Path) -> dict[str, dict]:
    """The configuration (``run.json`` / ``run.shard-i-of-n.json``) of every results file that holds a record, by the
    signature file's name."""
    run_dir = Path(run_dir)
    pairs = [(signature_path(run_dir), results_path(run_dir))]
    pairs += [(signature_path(run_dir, shard), path) for shard, path in shard_files(run_dir)]
    found = {}
    for signature, results in pairs:
        if signature.exists() and results.exists() and results.stat().st_size > 0:
            found[signature.name] = json.loads(signature.read_text())
    return found


def check_signatures(run_dir: str | Path) -> dict | None:
    """The configuration shared by every results file of a run directory (None: none recorded); ShardMismatch when
    two differ (shards of different configurations never merge)."""
    signatures = recorded_signatures(run_dir)
    names = list(signatures)
    for name in names[1:]:
        if signatures[name] != signatures[names[0]]:
            raise ShardMismatch(
                f"{run_dir}: its results files come from different configurations ({names[0]} and {name} differ in: "
                f"{_differing(signatures[names[0]], signatures[name])}); only shards of one configuration merge — "
                "move the others into a directory of their own")
    return signatures[names[0]] if names else None


def merge_shards(run_dir: str | Path) -> list[dict]:
    """Fold the shard files of ``run_dir`` into ``results.jsonl`` (the caller holds the directory's exclusive lock:
    no shard is being written). Refuses shards of different configurations (ShardMismatch) before changing anything.
    Damaged lines go to ``results.damaged.jsonl``. Returns the merged records."""
    run_dir = Path(run_dir)
    signature = check_signatures(run_dir)
    shards = shard_files(run_dir)
    for _, path in shards:
        damaged = scan_lines(path)[1]
        if damaged:
            _set_aside(run_dir, damaged)
            log.warning("%s: %d damaged line(s) moved to %s; their samples run again", path, len(damaged), DAMAGED_FILE)
    records = read_records(run_dir)
    _rewrite(results_path(run_dir), records)  # first the merged file (atomic), then the shards go
    if signature is not None:
        signature_path(run_dir).write_text(json.dumps(signature, indent=2, sort_keys=True))
    for _, path in shards:
        path.unlink()
    for leftover in [*run_dir.glob("run.shard-*-of-*.json"), *run_dir.glob(LOCK_FILE + ".shard-*-of-*")]:
        leftover.unlink(missing_ok=True)  # shards that never recorded anything, and the shards' lock files
    return records


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
