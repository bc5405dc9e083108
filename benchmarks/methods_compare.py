"""Every token-reduction method on the tiny trained checkpoints at equal retained tokens (issue 18), with paired
deltas against the unpruned model and the difficulty filter's view (VTC-Bench: the samples plain downsampling
gets wrong).

Two benchmark runs per model (``python -m tokenprune`` with ``run.compare``, the runner's code path; the
selections before the decoder in one, the other methods in the other, the unpruned model in both, where its
records must agree) on the same held-out samples of ``synthetic_image`` (N = 144 visual tokens per image), two
blocks of methods:

* **decoder input**: the methods that reduce before the decoder keep 1/4 of N (36 tokens) in every layer;
* **layer-averaged**: every method keeps 1/2 of N averaged over the 6 decoder layers (72): the pre-LLM methods
  keep 72 at the decoder input; the intra-LLM ones prune harder later (FastV / random / uniform / DART keep 36 from
  layer 2 on, PDrop 108 / 72 / 36 from layers 1 / 2 / 3, HiMAP 54 then 18 from layers 2 and 4, SparseVLM's
  geometric stages 72 / 36 / 18 at layers 2 / 3 / 4). Grid methods (pool, downsample) round to a grid (8 x 8).

The table shows what each run measured: visual tokens entering the decoder and layer-averaged, accuracy with the
paired delta [95% bootstrap interval] against the unpruned model on all samples, and the same on the *difficult*
subset (solved unpruned, wrong after ``downsample`` at the block's budget). PruneVid is video-only (not here).

    python benchmarks/methods_compare.py              # measure (200 samples per model), write the data, render
    python benchmarks/methods_compare.py --groups vision   # measure one run per model, keep the others' data
    python benchmarks/methods_compare.py --render     # re-render the Markdown from the committed data only

Data: ``docs/tables/methods_compare.json`` (one record per model and sample, every method's run on it); the
table lives in ``docs/methods/compare.md`` between ``<!-- table:methods_compare -->`` markers; source and table
are registered with ``benchmarks/_tables.py`` (``make tables``; ``tests/test_tables.py`` checks both).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

NAME = "methods_compare"
MODELS = ("tiny_llava", "tiny_qwen25vl")
SAMPLES, QUICK_SAMPLES = 200, 1
RUN_KEYS = ("prediction", "score", "error", "visual_tokens", "visual_tokens_layer_mean")

PRE_LLM = ("visionzip", "vispruner", "divprune", "cdpruner", "pool", "downsample")
VISION_SIGNAL = ("visionzip", "vispruner", "divprune", "cdpruner")  # measured in a run of their own per model
GROUPS = ("main", "vision")
BLOCKS = {  # block -> (title, target fraction of N, method specs); one benchmark run per model and block
    "input": ("1/4 of N at the decoder input", 0.25, [{"name": name, "budget": 0.25} for name in PRE_LLM]),
    "layer_avg": ("1/2 of N layer-averaged", 0.5, [
        {"name": "fastv", "keep_ratio": 0.25},
        {"name": "random", "keep_ratio": 0.25},
        {"name": "uniform", "keep_ratio": 0.25},
        {"name": "dart", "budget": 0.25},
        {"name": "pdrop", "layers": [1, 2, 3], "ratios": [0.75, 0.5, 0.25]},
        {"name": "himap", "text_layer": 2, "image_layer": 4, "text_keep": 0.375, "image_keep": 0.125},
        {"name": "sparsevlm", "layers": [2, 3, 4], "budget": 0.125},
        *({"name": name, "budget": 0.5} for name in PRE_LLM),
    ]),
}

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tables  # noqa: E402
from _tables import source, table  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------
def overrides(model: str, limit: int) -> list[str]:
    return [f"model={model}", "dataset=synthetic_image", f"dataset.limit={limit}", "method=baseline"]


def run_block(model: str, specs: list[dict], limit: int) -> tuple[list[str], list[dict]]:
    """One benchmark run (the unpruned model + ``specs``): its labels and per-sample records (slimmed)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from tokenprune.run.results import read_records
    from tokenprune.run.runner import run_benchmark

    with tempfile.TemporaryDirectory() as directory:
        with initialize_config_module("tokenprune.conf", version_base=None):
            cfg = compose("config", overrides=[f"run.output_dir={directory}", "run.progress=false",
                                               *overrides(model, limit)])
        OmegaConf.update(cfg, "run.compare", specs, force_add=True)
        payload = run_benchmark(cfg)
        records = read_records(directory)
    slim = [{"id": r["id"], "index": r["index"], "error": r["error"],
             "runs": {label: {k: run[k] for k in RUN_KEYS if k in run} for label, run in r["runs"].items()}}
            for r in records]
    return list(payload["methods"]), slim


def group_of(spec: dict) -> str:
    """Which of a model's two runs measures ``spec``: the vision-signal selections before the decoder, or the rest."""
    return "vision" if spec["name"] in VISION_SIGNAL else "main"


def group_specs(group: str) -> list[dict]:
    return [spec for _, _, specs in BLOCKS.values() for spec in specs if group_of(spec) == group]


@source(NAME)
def measure(quick: bool, groups: tuple[str, ...] = GROUPS) -> dict:
    """Every method on the tiny trained checkpoints at equal retained tokens (docs/methods/compare.md)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models are latency-bound (and the records do not depend on the thread count)
    try:
        return _measure(QUICK_SAMPLES if quick else SAMPLES, groups)
    finally:
        torch.set_num_threads(threads)


def _measure(limit: int, groups: tuple[str, ...]) -> dict:
    runs, records = {}, []
    for model in MODELS:
        for group in groups:  # two runs per model on the same samples, the unpruned model in both
            specs = group_specs(group)
            labels, run_records = run_block(model, specs, limit)
            name = f"{model}/{group}"
            runs[name] = {"model": model, "labels": labels, "specs": specs, "overrides": overrides(model, SAMPLES),
                          "samples": len(run_records)}
            records += [{"key": f"{name}/{r['id']}", "run": name, **r} for r in run_records]
    return {"runs": runs, "records": records}


def compare_override(specs: list[dict]) -> str:
    """The ``run.compare=[...]`` command-line override of ``specs`` (each ``{name: ..., field: value, ...}``)."""
    def value(v):
        return "[" + ", ".join(value(x) for x in v) + "]" if isinstance(v, list) else json.dumps(v).strip('"')

    entries = ["{" + ", ".join(f"{k}: {value(spec[k])}" for k in ["name", *sorted(set(spec) - {"name"})]) + "}"
               for spec in specs]
    return "run.compare=[" + ", ".join(entries) + "]"


def combined(data: dict, model: str) -> tuple[list[dict], dict[str, str]]:
    """The model's records with every run's methods merged per sample (the unpruned model's from the first run;
    the others must agree with it), and each spec's label (by its JSON)."""
    by_id: dict[str, dict] = {}
    labels: dict[str, str] = {}
    for name, run in data["runs"].items():
        if run["model"] != model:
            continue
        labels.update({json.dumps(spec, sort_keys=True): label for spec, label in zip(run["specs"], run["labels"][1:])})
        for record in (r for r in data["records"] if r["run"] == name):
            merged = by_id.setdefault(record["id"], {"id": record["id"], "error": record["error"], "runs": {}})
            for label, entry in record["runs"].items():
                if label in merged["runs"] and merged["runs"][label] != entry:
                    raise ValueError(f"{model} sample {record['id']}: {label} differs between runs")
                merged["runs"][label] = entry
    return list(by_id.values()), labels


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------
def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cell(part: dict) -> str:
    if not part["n"]:
        return "—"
    text = f"{part['accuracy']:.1f} ({100 * part['delta']:+.1f}"
    low, high = part["ci95"]
    if low == low:  # not NaN
        text += f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return (text + ")").replace("-", "−")


@table(NAME, source=NAME)
def render(data: dict) -> str:
    from tokenprune.run.difficulty import analysis, scores_of

    out = []
    for model in MODELS:
        records, label_of = combined(data, model)
        baseline = scores_of(records, "baseline")
        lines = [f"**{model}** · synthetic_image · {len(records)} held-out samples", "",
                 "| retained tokens | method | visual in | visual layer-avg | all: acc % (Δ [95% CI]) | "
                 "difficult: acc % (Δ [95% CI]) |", "|---|---|---:|---:|---|---|"]
        for block, (title, _, specs) in BLOCKS.items():
            labels = [label_of[json.dumps(spec, sort_keys=True)] for spec in specs]
            downsample = next(label for label in labels if label.startswith("downsample"))
            shown = (["baseline"] if block == next(iter(BLOCKS)) else []) + labels  # the unpruned row once
            result = analysis(baseline, scores_of(records, downsample),
                              {label: scores_of(records, label) for label in shown})
            split = result["split"]
            for label in shown:
                ok = [r["runs"][label] for r in records if r["runs"].get(label, {}).get("error", 1) is None]
                visual = _mean([entry.get("visual_tokens") for entry in ok])
                layer_avg = _mean([entry.get("visual_tokens_layer_mean") for entry in ok])
                row = result["methods"][label]
                where = "all (unpruned)" if label == "baseline" else title
                lines.append(f"| {where} | `{label}` | {visual:.1f} | {layer_avg:.1f} | {_cell(row['all'])} | "
                             f"{_cell(row['difficult'])} |")
            lines.append(f"| {title} | *difficult subset*: `{downsample}` wrong | | | | {len(split.difficult)} of "
                         f"{len(split.solved)} solved samples |")
        out.append("\n".join(lines))
    commands = []
    for name, run in sorted(data["runs"].items(), key=lambda item: (MODELS.index(item[1]["model"]),
                                                                    GROUPS.index(item[0].split("/")[1]))):
        commands.append("python -m tokenprune " + " ".join(run["overrides"]) + f" '{compare_override(run['specs'])}'")
    return "```bash\n" + "\n".join(commands) + "\n```\n\n" + "\n\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Command line (the data file and the document are written by benchmarks/_tables.py, as every generated table)
# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="re-render from the committed data only")
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS),
                        help="measure only these runs of every model, keeping the others' committed data")
    args = parser.parse_args(argv)
    if not args.render:
        data = measure(False, tuple(args.groups))
        if set(args.groups) != set(GROUPS):  # keep the committed runs of the other groups
            old = _tables.load(NAME) if _tables.data_path(NAME).is_file() else {"runs": {}, "records": []}
            kept = {name for name in old["runs"] if name.split("/")[1] not in args.groups}
            data = {"runs": {**{n: old["runs"][n] for n in kept}, **data["runs"]},
                    "records": [r for r in old["records"] if r["run"] in kept] + data["records"]}
        _tables.data_path(NAME).write_text(_tables.dumps(data))
        if set(data["runs"]) != {f"{m}/{g}" for m in MODELS for g in GROUPS}:
            print(f"measured {sorted(data['runs'])}; the table needs every run")
            return 0
    _tables.discover()
    _tables.write_tables([NAME])
    print(_tables.rendered(NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
