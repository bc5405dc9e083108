"""Generated tables: every table of measured numbers in README.md and docs/ comes from a registered function.

A **source** measures something (a benchmark run, a script) and returns JSON-able data whose ``"records"`` are the
raw per-sample / per-row results, each with a unique ``"key"``; ``make tables`` commits it as
``docs/tables/<source>.json``. A **table** renders Markdown from one source's data; it lives in one Markdown file
between ``<!-- table:<name> -->`` and ``<!-- /table:<name> -->``. ``tests/test_tables.py`` then

* re-renders every table from its committed data and fails if the Markdown differs (a hand edit, or a renderer
  changed without ``make tables-render``), and
* calls every source with ``quick=True`` (a few records, or a few fields of them: the first samples, token counts,
  FLOPs, a stored policy's score) and fails if what it recomputes differs from the committed records, ignoring the
  source's ``volatile`` keys (timings, memory) at any depth.

Adding a table: one ``@table`` function (plus a ``@source`` function if no existing source measures it) in any
``benchmarks/*.py`` module, and the marker pair in the document. Nothing else is registered by hand.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
DATA_DIR = ROOT / "docs" / "tables"
DOCUMENTS = ("README.md", "docs")  # files, or folders searched for *.md
MARKER = re.compile(r"<!-- table:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /table:(?P=name) -->", re.S)
SIGNIFICANT = 7  # floats are stored with this many significant digits


@dataclass
class Source:
    name: str
    measure: Callable[[bool], dict]  # quick -> data
    volatile: tuple[str, ...] = ()  # keys left out of the staleness check (timings, memory), at any depth
    doc: str = ""
    tolerance: dict[str, float] = field(default_factory=dict)  # key -> relative tolerance of the staleness check


@dataclass
class Table:
    name: str
    source: str
    render: Callable[[dict], str]


SOURCES: dict[str, Source] = {}
TABLES: dict[str, Table] = {}


def source(name: str, volatile: tuple[str, ...] = (), tolerance: dict[str, float] | None = None):
    """Register ``fn(quick: bool) -> data`` as the source ``name`` (data file ``docs/tables/<name>.json``).

    ``tolerance``: top-level record keys whose floats the staleness check compares within a relative tolerance
    instead of exactly — only for values at the rounding level of their dtype (a float32 KL of ~1e-7 between
    nearly equal distributions changes in its third digit when an unrelated kernel changes its summation order);
    the source states why next to the value."""

    def decorator(fn):
        if name in SOURCES and not _same(SOURCES[name].measure, fn):
            raise ValueError(f"table source {name!r} is registered twice")
        SOURCES[name] = Source(name, fn, tuple(volatile), (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
                               dict(tolerance or {}))
        return fn

    return decorator


def table(name: str, source: str):
    """Register ``fn(data) -> Markdown`` as the table between the ``<!-- table:<name> -->`` markers."""

    def decorator(fn):
        if name in TABLES and not _same(TABLES[name].render, fn):
            raise ValueError(f"table {name!r} is registered twice")
        TABLES[name] = Table(name, source, fn)
        return fn

    return decorator


def _same(a: Callable, b: Callable) -> bool:
    """The same function, possibly from a module imported twice under different names (tests load scripts)."""
    return (a.__code__.co_filename, a.__qualname__) == (b.__code__.co_filename, b.__qualname__)


def discover() -> None:
    """Import every ``benchmarks/*.py`` module that registers a source or a table."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    for path in sorted(BENCHMARKS.glob("*.py")):
        if path.name.startswith("_tables") or path.name == "tables.py":
            continue
        text = path.read_text()
        if "@table(" not in text and "@source(" not in text:
            continue
        module_name = path.stem
        if module_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)


# ---------------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------------
def _rounded(value):
    if isinstance(value, float):
        if not math.isfinite(value):
            return None if math.isnan(value) else value
        return float(f"{value:.{SIGNIFICANT}g}")
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def dumps(data: dict) -> str:
    """JSON with one record per line (diff-friendly), floats to SIGNIFICANT digits, keys sorted."""
    data = _rounded(data)
    lines = ["{"]
    keys = sorted(data)
    for i, key in enumerate(keys):
        end = "," if i < len(keys) - 1 else ""
        value = data[key]
        if isinstance(value, list) and value:
            lines.append(f"{json.dumps(key)}: [")
            lines += [" " + json.dumps(item, sort_keys=True, ensure_ascii=False) + ("," if j < len(value) - 1 else "")
                      for j, item in enumerate(value)]
            lines.append("]" + end)
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, sort_keys=True, ensure_ascii=False)}{end}")
    return "\n".join(lines + ["}"]) + "\n"


def normalized(data: dict) -> dict:
    """``data`` as it reads back from its file."""
    return json.loads(dumps(data))


def data_path(name: str) -> Path:
    return DATA_DIR / f"{name}.json"


def load(name: str) -> dict:
    path = data_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no data for table source {name!r}: run `make tables` (python benchmarks/tables.py {name})")
    return json.loads(path.read_text())


def meta(command: str) -> dict:
    """Where and when a source ran (never checked: it differs between machines)."""
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs",
            "load_average": round(os.getloadavg()[0], 1),  # other jobs on the machine: wall times scale with it
            "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit}


def measure(name: str) -> dict:
    """Run source ``name`` in full and write its data file."""
    data = SOURCES[name].measure(False)
    _check_keys(name, data)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    data_path(name).write_text(dumps(data))
    return data


def _check_keys(name: str, data: dict) -> None:
    keys = [record.get("key") for record in data.get("records", [])]
    if None in keys or len(set(map(json.dumps, keys))) != len(keys):
        raise ValueError(f"table source {name!r}: every record needs a unique 'key'")


# ---------------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------------
def documents() -> list[Path]:
    files = []
    for entry in DOCUMENTS:
        path = ROOT / entry
        files += sorted(path.rglob("*.md")) if path.is_dir() else [path]
    return files


def markers() -> dict[str, tuple[Path, str]]:
    """Table name -> (document, committed body) for every marker pair in the documents."""
    found: dict[str, tuple[Path, str]] = {}
    for path in documents():
        for match in MARKER.finditer(path.read_text()):
            name = match.group("name")
            if name in found:
                raise ValueError(f"table {name!r} appears twice: {found[name][0]} and {path}")
            found[name] = (path, match.group("body"))
    return found


def body(markdown: str) -> str:
    """What sits between the markers: the rendered Markdown framed by blank lines."""
    return "\n" + markdown.strip("\n") + "\n\n"


def rendered(name: str, cache: dict | None = None) -> str:
    entry = TABLES[name]
    cache = {} if cache is None else cache
    if entry.source not in cache:
        cache[entry.source] = load(entry.source)
    return body(entry.render(cache[entry.source]))


def write_tables(names: list[str] | None = None) -> list[str]:
    """Re-render tables (all, or ``names``) into their documents from the committed data; returns the changed ones."""
    places = markers()
    missing = sorted(set(TABLES) - set(places))
    if missing:
        raise ValueError(f"tables without a marker pair in README.md / docs/: {missing}")
    cache: dict = {}
    changed = []
    for name in names or sorted(TABLES):
        path, committed = places[name]
        new = rendered(name, cache)
        if new != committed:
            text = path.read_text()
            start = f"<!-- table:{name} -->\n"
            end = f"<!-- /table:{name} -->"
            text = MARKER.sub(lambda m: start + new + end if m.group("name") == name else m.group(0), text)
            path.write_text(text)
            changed.append(name)
    return changed


# ---------------------------------------------------------------------------------------------------------
# Checks (tests/test_tables.py)
# ---------------------------------------------------------------------------------------------------------
def render_differences() -> list[str]:
    """Tables whose committed Markdown is not what their data renders to, markers without a table and tables
    without a marker."""
    places = markers()
    problems = [f"marker {name!r} in {path.relative_to(ROOT)} has no registered table"
                for name, (path, _) in places.items() if name not in TABLES]
    problems += [f"table {name!r} has no marker pair in README.md / docs/" for name in TABLES if name not in places]
    cache: dict = {}
    for name, (path, committed) in sorted(places.items()):
        if name in TABLES and rendered(name, cache) != committed:
            problems.append(f"table {name!r} in {path.relative_to(ROOT)} differs from what its data renders to "
                            f"(edited by hand? run `make tables-render`)")
    return problems


def without(value, volatile: tuple[str, ...]):
    if isinstance(value, dict):
        return {k: without(v, volatile) for k, v in value.items() if k not in volatile}
    if isinstance(value, list):
        return [without(v, volatile) for v in value]
    return value


def _equal(now, then, tolerance: float | None) -> bool:
    if tolerance is not None and isinstance(now, (int, float)) and isinstance(then, (int, float)):
        return abs(now - then) <= tolerance * max(abs(now), abs(then))
    return now == then


def stale_records(name: str) -> list[str]:
    """Records that ``quick=True`` recomputes and that differ from the committed ones (volatile keys aside)."""
    entry = SOURCES[name]
    quick = normalized(entry.measure(True))
    stored = {json.dumps(r["key"]): r for r in load(name).get("records", [])}
    problems = []
    if not quick.get("records"):
        return [f"{name}: quick=True recomputed no records"]
    for record in quick["records"]:
        key = json.dumps(record["key"])
        if key not in stored:
            problems.append(f"{name}: record {key} is not in the committed data")
            continue
        now = without(record, entry.volatile)
        then = {k: v for k, v in without(stored[key], entry.volatile).items() if k in now}  # what quick recomputes
        fields = sorted(k for k in set(now) | set(then) if not _equal(now.get(k), then.get(k), entry.tolerance.get(k)))
        if fields:
            problems.append(f"{name}: record {key} differs in {fields}: now {[now.get(k) for k in fields]}, "
                            f"committed {[then.get(k) for k in fields]}")
    return problems
