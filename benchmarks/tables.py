"""Regenerate the measured tables of README.md and docs/ (``make tables``); see ``benchmarks/_tables.py``.

    python benchmarks/tables.py                    # measure every source (each in a fresh process), re-render all
    python benchmarks/tables.py himap_tiny embedded  # measure these sources only, re-render all
    python benchmarks/tables.py --render           # re-render every table from the committed data (seconds)
    python benchmarks/tables.py --check            # what tests/test_tables.py checks
    python benchmarks/tables.py --list             # sources, their tables and the time of the last run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _tables  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", help="sources to measure (default: all)")
    parser.add_argument("--render", action="store_true", help="only re-render the tables from the committed data")
    parser.add_argument("--check", action="store_true", help="render check + quick staleness check of every source")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--measure-one", help=argparse.SUPPRESS)  # internal: measure one source in this process
    args = parser.parse_args(argv)
    _tables.discover()

    if args.measure_one:
        _tables.measure(args.measure_one)
        return 0
    if args.list:
        for name, entry in sorted(_tables.SOURCES.items()):
            tables = [t.name for t in _tables.TABLES.values() if t.source == name]
            print(f"{name}: {entry.doc} -> tables {tables}")
        return 0
    if args.check:
        problems = _tables.render_differences()
        for name in sorted(_tables.SOURCES):
            problems += _tables.stale_records(name)
        print("\n".join(problems) or "every table is current")
        return 1 if problems else 0
    if not args.render:
        unknown = sorted(set(args.sources) - set(_tables.SOURCES))
        if unknown:
            parser.error(f"unknown sources {unknown}; available: {sorted(_tables.SOURCES)}")
        for name in args.sources or sorted(_tables.SOURCES):
            started = time.perf_counter()
            print(f"measuring {name} ...", flush=True)
            subprocess.run([sys.executable, __file__, "--measure-one", name], check=True)
            print(f"measured {name} in {time.perf_counter() - started:.0f} s", flush=True)
    changed = _tables.write_tables()
    print(f"re-rendered {len(changed)} table(s): {', '.join(changed) or 'none changed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
