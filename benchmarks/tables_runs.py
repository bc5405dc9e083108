"""Tables of benchmark runs (``python -m tokenprune ...``) on the tiny trained models, for README.md and docs/.

Each source runs the documented commands through the runner (the same code path as the command line) and keeps
every sample's record (prediction, score, token counts, FLOPs; timings only where a table shows them). The tables
are computed from those records with the runner's own summary (``tokenprune.run.results.summarize``), so a
committed number is always what its records give. ``quick=True`` re-runs the first sample of every run.

    python benchmarks/tables.py embedded himap_tiny     # re-measure these sources, re-render every table
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from _tables import meta, source, table

QUICK_SAMPLES = 1
SAMPLES = 200  # held-out samples of the method tables
RUN_KEYS = ("prediction", "score", "error", "visual_tokens", "visual_tokens_layer_mean", "tokens_layer_mean",
            "method_stats")
TIMED = ("timing",)


def samples_override(dataset: str, n: int) -> str:
    """How a command asks for the first n samples of a synthetic dataset."""
    return f"dataset.limit={n}"


def run_command(overrides: list[str], quick: bool, keep_timing: bool = False, no_arguments: bool = False) -> dict:
    """Run the runner on ``overrides`` (as ``python -m tokenprune <overrides>``); the slimmed records and labels.

    ``no_arguments``: the command is bare ``python -m tokenprune`` (the embedded comparison)."""
    from hydra import compose, initialize_config_module

    from tokenprune.__main__ import with_default_experiment
    from tokenprune.run.results import read_records
    from tokenprune.run.runner import run_benchmark

    overrides = with_default_experiment(list(overrides)) if no_arguments else list(overrides)
    if quick:
        dataset = next((o.split("=", 1)[1] for o in overrides if o.startswith("dataset=")), "synthetic_image")
        overrides = [o for o in overrides if not o.startswith("dataset.limit=")]
        overrides.append(samples_override(dataset, QUICK_SAMPLES))
    with tempfile.TemporaryDirectory() as directory:
        with initialize_config_module("tokenprune.conf", version_base=None):
            cfg = compose("config", overrides=[f"run.output_dir={directory}", "run.progress=false", *overrides])
        payload = run_benchmark(cfg)
        records = read_records(directory)
    labels = list(payload["methods"])
    keep = RUN_KEYS + (TIMED if keep_timing else ())
    slim = []
    for record in records:
        runs = {}
        for label, run in record["runs"].items():
            entry = {k: run[k] for k in keep if k in run}
            if "flops" in run:
                entry["flops"] = {"tokenprune": run["flops"]["tokenprune"]}
            runs[label] = entry
        meta_fields = {k: v for k, v in (record.get("meta") or {}).items() if k in ("task", "category")}
        slim.append({"id": record["id"], "index": record["index"], "answer": record["answer"], "meta": meta_fields,
                     "error": record["error"], "runs": runs})
    return {"labels": labels, "model": payload["model"], "dataset": payload["dataset"], "records": slim}


def measure_runs(commands: dict[str, list[str]], quick: bool, keep_timing: bool = False,
                 no_arguments: bool = False) -> dict:
    """Every named command's records, keyed ``<run>/<sample id>``."""
    runs, records = {}, []
    for name, overrides in commands.items():
        result = run_command(overrides, quick, keep_timing, no_arguments)
        runs[name] = {"overrides": overrides, "labels": result["labels"], "model": result["model"],
                      "dataset": result["dataset"], "samples": len(result["records"])}
        records += [{"key": f"{name}/{r['id']}", "run": name, **r} for r in result["records"]]
    command = "; ".join("python -m tokenprune " + " ".join(o) for o in commands.values())
    return {"meta": meta(command), "runs": runs, "records": records}


_SUMMARIES: dict[str, dict] = {}  # the summaries already computed in this process, by the records they summarise


def summary(data: dict, run: str) -> dict:
    """The runner's summary (per method label) of one run's stored records (its pure-Python bootstrap takes seconds
    per run, so a summary is computed once per process for the same records; the table check renders every table
    several times)."""
    info = data["runs"][run]
    records = [r for r in data["records"] if r.get("run") == run]
    key = json.dumps([info, records], sort_keys=True)
    if key not in _SUMMARIES:
        _SUMMARIES[key] = _summary(info, records)
    return copy.deepcopy(_SUMMARIES[key])


def _summary(info: dict, records: list[dict]) -> dict:
    from tokenprune.data import create_dataset
    from tokenprune.run.results import summarize

    scorer = create_dataset(info["dataset"]).scorer
    return summarize(records, info["labels"], scorer, "baseline" if "baseline" in info["labels"] else None)


def per_task(data: dict, run: str, label: str, key: str = "task") -> dict[str, float]:
    groups = defaultdict(list)
    for record in data["records"]:
        if record.get("run") == run and record["runs"].get(label, {}).get("score") is not None:
            groups[record["meta"].get(key)].append(record["runs"][label]["score"])
    return {task: 100.0 * sum(scores) / len(scores) for task, scores in groups.items()}


def accuracy(entry: dict) -> float:
    return entry["metrics"][entry["headline"]]


def delta(entry: dict, brackets: bool = True) -> str:
    d = entry.get("paired_delta")
    if d is None:
        return "—"
    text = f"{d['mean']:+.1f}".replace("-", "−")
    if any(math.isnan(b) for b in d["ci95"]):
        return text
    low, high = (f"{b:+.1f}".replace("-", "−") for b in d["ci95"])
    return f"{text} [{low}, {high}]" if brackets else text


def command_block(data: dict, order: list[str]) -> str:
    """The commands of the runs named in ``order`` (data files keep their keys sorted)."""
    lines = ["python -m tokenprune " + " ".join(_quote(o) for o in data["runs"][name]["overrides"]) for name in order]
    return "```bash\n" + "\n".join(lines) + "\n```"


def _quote(override: str) -> str:
    return f"'{override}'" if any(c in override for c in " [{") else override


# ---------------------------------------------------------------------------------------------------------
# The embedded default (README)
# ---------------------------------------------------------------------------------------------------------
@source("embedded", volatile=("timing",))
def embedded(quick: bool) -> dict:
    """`python -m tokenprune` on a fresh clone: the embedded comparison on tiny_llava."""
    data = measure_runs({"embedded": []}, quick, keep_timing=True, no_arguments=True)
    data["meta"]["command"] = "python -m tokenprune"
    return data


@table("embedded", source="embedded")
def embedded_table(data: dict) -> str:
    from tokenprune.run.results import format_table

    run = data["runs"]["embedded"]
    title = f"{run['dataset']} · {run['model']} · {run['samples']} samples"
    load = data["meta"].get("load_average")
    note = f"\n\nTimes measured at a load average of {load} on {data['meta']['machine']}." if load is not None else ""
    return "```text\n" + format_table(summary(data, "embedded"), title) + "\n```" + note


@table("embedded_trend", source="embedded")
def embedded_trend(data: dict) -> str:
    entries = summary(data, "embedded")
    names = {"random": "random", "uniform": "uniform", "fastv": "FastV", "pdrop": "PDrop"}
    trends: dict[str, dict[float, float]] = {}
    ratios = set()
    for label, entry in entries.items():
        method = label.split("(")[0]
        if method not in names:
            continue
        ratio = float((_field(label, "keep_ratio") or (_field(label, "ratios") or "[0.5").strip("[").split(",")[0]))
        trends.setdefault(method, {})[ratio] = accuracy(entry)
        ratios.add(ratio)
    order = sorted(ratios, reverse=True)
    base = accuracy(entries["baseline"])
    parts = [f"{names[m]} {base:.1f} → " + " → ".join(f"{trends[m][r]:.1f}" for r in order) for m in names if m in trends]
    return (f"Accuracy as the keep ratio falls (100 / {' / '.join(f'{100 * r:g}' for r in order)} %): "
            + ", ".join(parts) + ".")


# ---------------------------------------------------------------------------------------------------------
# PyramidDrop: the official positions against the `keep` variant (README)
# ---------------------------------------------------------------------------------------------------------
PDROP_COMPARE = ("run.compare=[{name: pdrop, layers: [1,2,3], ratios: [0.5,0.25,0.125], positions: keep}, "
                 "{name: pdrop, layers: [1,2,3], ratios: [0.25,0.125,0.0625]}, "
                 "{name: pdrop, layers: [1,2,3], ratios: [0.25,0.125,0.0625], positions: keep}, "
                 "{name: pdrop, layers: [1,2,3], ratios: [0.125,0.0625,0.03125]}, "
                 "{name: pdrop, layers: [1,2,3], ratios: [0.125,0.0625,0.03125], positions: keep}]")


@source("pdrop_positions")
def pdrop_positions(quick: bool) -> dict:
    """PDrop on tiny_llava: the official re-numbered positions (default) against the `keep` variant."""
    return measure_runs({"tiny_llava": ["method=pdrop", "model=tiny_llava", "dataset=synthetic_image",
                                        f"dataset.limit={SAMPLES}", PDROP_COMPARE]}, quick)


@table("pdrop_positions", source="pdrop_positions")
def pdrop_positions_table(data: dict) -> str:
    entries = summary(data, "tiny_llava")
    lines = ["| ratios at layers [1, 2, 3] | `positions` | accuracy % | Δ vs baseline [95% CI] | visual layer-avg |",
             "|---|---|---:|---|---:|"]
    for label, entry in entries.items():
        if label == "baseline":
            lines.append(f"| — (baseline) | — | {accuracy(entry):.1f} | — | {entry['visual_tokens_layer_mean']:.1f} |")
            continue
        ratios = _field(label, "ratios") or "[0.5,0.25,0.125]"
        positions = "`keep` (variant)" if "positions=keep" in label else "`auto` → `reindex` (official)"
        lines.append(f"| {ratios.replace(',', ', ')} | {positions} | {accuracy(entry):.1f} | {delta(entry)} | "
                     f"{entry['visual_tokens_layer_mean']:.1f} |")
    return command_block(data, ["tiny_llava"]) + "\n\n" + "\n".join(lines)


def _field(label: str, name: str) -> str | None:
    """The value of ``name=`` in a method label such as ``pdrop(layers=[1,2,3],ratios=[0.25,0.125])``."""
    if f"{name}=" not in label:
        return None
    rest = label.split(f"{name}=", 1)[1]
    if rest.startswith("["):
        return rest[: rest.index("]") + 1]
    return rest.split(",")[0].rstrip(")")


# ---------------------------------------------------------------------------------------------------------
# Tiny trained models: held-out accuracy (README)
# ---------------------------------------------------------------------------------------------------------
TINY_RUNS = {
    "tiny_llava/image": ["method=baseline", "run.paired=false", "model=tiny_llava", "dataset=synthetic_image",
                         f"dataset.limit={SAMPLES}"],
    "tiny_qwen25vl/image": ["method=baseline", "run.paired=false", "model=tiny_qwen25vl", "dataset=synthetic_image",
                            f"dataset.limit={SAMPLES}"],
    "tiny_qwen25vl/video": ["method=baseline", "run.paired=false", "model=tiny_qwen25vl", "dataset=synthetic_video",
                            f"dataset.limit={SAMPLES}"],
}


@source("tiny_models")
def tiny_models(quick: bool) -> dict:
    """Held-out accuracy of the two trained tiny models (unpruned, greedy) and their checkpoint sizes."""
    import tokenprune as tp

    data = measure_runs(TINY_RUNS, quick)
    for name in ("tiny_llava", "tiny_qwen25vl"):
        folder = Path(tp.models.model_spec(name).default_path())
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        data["records"].append({"key": f"size/{name}", "bytes": size})
    return data


@table("tiny_models", source="tiny_models")
def tiny_models_table(data: dict) -> str:
    sizes = {r["key"].split("/", 1)[1]: r["bytes"] for r in data["records"] if r["key"].startswith("size/")}

    def held_out(run: str) -> str:
        if run not in data["runs"]:
            return "—"
        entry = summary(data, run)["baseline"]
        tasks = ", ".join(f"{task} {score:.0f}" for task, score in per_task(data, run, "baseline").items())
        return f"**{accuracy(entry):.0f}%** ({tasks})"

    rows = [
        ("tiny_llava", "`LlavaForConditionalGeneration`: CLIP ViT (4 layers, patch 14, 168 px) + projector + Llama "
                       "(6 layers, hidden 128, 4 heads / 2 KV)", "144 per image"),
        ("tiny_qwen25vl", "`Qwen2_5_VLForConditionalGeneration`: windowed ViT (4 blocks, patch 7, 2×2 merge) + Qwen2 "
                          "(6 layers, hidden 128, 3-D mRoPE)", "144 per image; 256 per 8-frame video"),
    ]
    lines = ["| model | architecture | visual tokens | held-out image QA | held-out video QA | size |",
             "|---|---|---|---|---|---|"]
    for name, architecture, visual in rows:
        lines.append(f"| `{name}` | {architecture} | {visual} | {held_out(f'{name}/image')} | "
                     f"{held_out(f'{name}/video')} | {sizes[name] / 2**20:.1f} MiB |")
    samples = data["runs"]["tiny_llava/image"]["samples"]
    return "\n".join(lines) + (f"\n\nHeld-out: the `test` split (disjoint from the `train` stream), greedy, unpruned, "
                               f"{samples} samples per set (`python benchmarks/tables.py tiny_models`).")


# ---------------------------------------------------------------------------------------------------------
# HiMAP against FastV, PDrop, random and uniform at equal layer-averaged tokens (README, docs/methods/himap.md)
# ---------------------------------------------------------------------------------------------------------
HIMAP_COMPARE = ("run.compare=[{name: fastv, keep_ratio: 0.3125}, {name: pdrop, layers: [2,4], ratios: [0.5,0.125]}, "
                 "{name: random, keep_ratio: 0.3125}, {name: uniform, keep_ratio: 0.3125}]")
HIMAP_RUNS = {
    f"{model}/{dataset}": ["method=himap", "method.image_layer=4", f"model={model}", f"dataset={dataset}",
                           f"dataset.limit={SAMPLES}", HIMAP_COMPARE]
    for model, dataset in (("tiny_llava", "synthetic_image"), ("tiny_qwen25vl", "synthetic_image"),
                           ("tiny_qwen25vl", "synthetic_video"))
}
HIMAP_ROWS = {  # label -> (docs row name, README row name)
    "baseline": ("baseline", "baseline"),
    "himap(image_layer=4)": ("**HiMAP** K1 = 2, K2 = 4", "HiMAP"),
    "fastv(keep_ratio=0.3125)": ("FastV K = 2, keep 0.3125", "FastV"),
    # positions: auto, the official re-numbering on LLaVA and the original 3-D positions (the `keep` extension) on
    # Qwen2.5-VL's mRoPE, where re-numbering has no official reference: the row says so
    "pdrop(layers=[2,4],ratios=[0.5,0.125])": ("PDrop [2, 4], [0.5, 0.125] (LLaVA: official re-numbered positions; "
                                               "Qwen2.5-VL: original 3-D positions, an extension)",
                                               "PDrop (LLaVA: official positions; Qwen2.5-VL: 3-D positions kept, an "
                                               "extension)"),
    "random(keep_ratio=0.3125)": ("random K = 2, keep 0.3125", "random"),
    "uniform(keep_ratio=0.3125)": ("uniform K = 2, keep 0.3125", "uniform"),
}


@source("himap_tiny")
def himap_tiny(quick: bool) -> dict:
    """HiMAP, FastV, PDrop, random and uniform at 0.542 N layer-averaged visual tokens on the tiny models."""
    return measure_runs(HIMAP_RUNS, quick)


@table("himap_tiny", source="himap_tiny")
def himap_tiny_table(data: dict) -> str:
    runs = list(data["runs"])
    summaries = {run: summary(data, run) for run in runs}
    header = ("| method (layer average 0.542 N) | `tiny_llava` image % (colour_at / left_of) | Δ | `tiny_qwen25vl` image % "
              "| Δ | `tiny_qwen25vl` video % (direction / first) | Δ |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for label, (row_name, _) in HIMAP_ROWS.items():
        if label == "baseline":
            counts = " / ".join(f"{summaries[run]['baseline']['visual_tokens']:.0f}" for run in runs)
            row_name = f"baseline (N = {counts})"
        cells = [row_name]
        for run in runs:
            entry = summaries[run][label]
            tasks = " / ".join(f"{v:.0f}" for v in per_task(data, run, label).values())
            cells += [f"{accuracy(entry):.1f} ({tasks})", delta(entry)]
        lines.append("| " + " | ".join(cells) + " |")
    flops = [{f"{summaries[run][label]['relative_flops']:.2f}" for label in HIMAP_ROWS if label != "baseline"}
             for run in runs]
    note = "\n\nPrefill FLOPs (tokenprune's count, all tokens) against the unpruned run, per column: " + " / ".join(
        "–".join(sorted(values)) for values in flops) + " for every pruned row"
    video = [r for r in data["records"] if r["run"].endswith("synthetic_video")]
    yes_no = sum((r["runs"]["himap(image_layer=4)"]["prediction"] or "").strip().lower().split()[:1] in (["yes"], ["no"])
                 for r in video)
    note += (f"; on video HiMAP's answer is \"yes\" or \"no\" — an answer to neither video task — for {yes_no} of the "
             f"{len(video)} questions") if video else ""
    prefix = ("C='" + HIMAP_COMPARE + "'")
    block = "```bash\n" + prefix + "\n" + "\n".join(
        "python -m tokenprune " + " ".join(o for o in run["overrides"] if o != HIMAP_COMPARE) + ' "$C"'
        for run in (data["runs"][name] for name in HIMAP_RUNS)) + "\n```"
    return block + "\n\n" + "\n".join(lines) + note + "."


@table("himap_tiny_readme", source="himap_tiny")
def himap_tiny_readme(data: dict) -> str:
    runs = list(data["runs"])
    summaries = {run: summary(data, run) for run in runs}
    lines = ["| method | `tiny_llava` image | `tiny_qwen25vl` image | `tiny_qwen25vl` video |", "|---|---|---|---|"]
    for label, (_, row_name) in HIMAP_ROWS.items():
        cells = []
        for run in runs:
            entry = summaries[run][label]
            d = entry.get("paired_delta")
            cells.append(f"{accuracy(entry):.1f}" if d is None else
                         f"{accuracy(entry):.1f} ({delta(entry) if d['mean'] or d['ci95'][0] != d['ci95'][1] else '+0.0'})")
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# PruneVid accuracy on the tiny Qwen2.5-VL (README, docs/methods/prunevid.md)
# ---------------------------------------------------------------------------------------------------------
PRUNEVID_RUNS = {
    "stages": ["method=prunevid", "method.stage2_layer=2", "model=tiny_qwen25vl", "dataset=synthetic_video",
               f"dataset.limit={SAMPLES}",
               "run.compare=[{name: prunevid, stage2: false}, {name: prunevid, stage1: false, stage2_layer: 2}, "
               "{name: prunevid, stage2_layer: 1}, {name: prunevid, stage1: false, stage2_layer: 1}]"],
    "halves": ["method=prunevid", "method.stage2=false", "method.cluster_ratio=1.0", "model=tiny_qwen25vl",
               "dataset=synthetic_video", f"dataset.limit={SAMPLES}",
               "run.compare=[{name: prunevid, stage2: false, tau: 2.0}]"],
}
PRUNEVID_ROWS = [  # (run, label, docs row, README row)
    ("stages", "baseline", "baseline", "baseline"),
    ("stages", "prunevid(stage2=False,stage2_layer=2)", "stage 1 (segments {segments}, static {static})", "stage 1"),
    ("stages", "prunevid(stage1=False,stage2_layer=2)", "stage 2 after layer 2", "stage 2"),
    ("stages", "prunevid(stage2_layer=2)", "stage 1 + 2 after layer 2", "stage 1 + 2"),
    ("stages", "prunevid(stage1=False,stage2_layer=1)", "stage 2 after layer 1", None),
    ("stages", "prunevid(stage2_layer=1)", "stage 1 + 2 after layer 1", None),
    ("halves", "prunevid(cluster_ratio=1.0,stage2=False,stage2_layer=2)", "stage 1, temporal merging only (`cluster_ratio=1.0`)", None),
    ("halves", "prunevid(stage2=False,stage2_layer=2,tau=2.0)", "stage 1, spatial merging only (`tau=2.0`)", None),
]


@source("prunevid_tiny")
def prunevid_tiny(quick: bool) -> dict:
    """PruneVid's stages on the trained tiny Qwen2.5-VL, synthetic_video."""
    return measure_runs(PRUNEVID_RUNS, quick)


def _stat(data: dict, run: str, label: str, key: str) -> float:
    values = [r["runs"][label]["method_stats"].get(key) for r in data["records"]
              if r["run"] == run and label in r["runs"] and r["runs"][label].get("method_stats")]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else math.nan


def _after_stage2(data: dict, run: str, label: str, entry: dict) -> float:
    value = _stat(data, run, label, "prunevid_stage2_tokens")
    return entry["visual_tokens"] if math.isnan(value) else value


@table("prunevid_tiny", source="prunevid_tiny")
def prunevid_tiny_table(data: dict) -> str:
    summaries = {run: summary(data, run) for run in data["runs"]}
    lines = ["| configuration | accuracy % (direction / first) | Δ vs baseline [95% CI] | visual tokens in | after stage 2 "
             "| layer mean | prefill FLOPs |", "|---|---|---|---:|---:|---:|---:|"]
    for run, label, row_name, _ in PRUNEVID_ROWS:
        entry = summaries[run][label]
        segments = _stat(data, run, label, "prunevid_segments")
        static = _stat(data, run, label, "prunevid_static_fraction")
        row_name = row_name.format(segments=f"{segments:.1f}", static=f"{100 * static:.1f} %")
        tasks = " / ".join(f"{v:.0f}" for v in per_task(data, run, label).values())
        lines.append(f"| {row_name} | {accuracy(entry):.1f} ({tasks}) | {delta(entry)} | "
                     f"{_count(entry['visual_tokens'])} | {_count(_after_stage2(data, run, label, entry))} | "
                     f"{entry['visual_tokens_layer_mean']:.1f} | {entry['relative_flops']:.2f}x |")
    return command_block(data, list(PRUNEVID_RUNS)) + "\n\n" + "\n".join(lines)


@table("prunevid_tiny_readme", source="prunevid_tiny")
def prunevid_tiny_readme(data: dict) -> str:
    summaries = {run: summary(data, run) for run in data["runs"]}
    lines = ["| configuration | accuracy % | Δ vs baseline | visual tokens in → after stage 2 (layer mean) | prefill FLOPs |",
             "|---|---|---|---|---|"]
    for run, label, _, row_name in PRUNEVID_ROWS:
        if row_name is None:
            continue
        entry = summaries[run][label]
        lines.append(f"| {row_name} | {accuracy(entry):.1f} | {delta(entry)} | {_count(entry['visual_tokens'])} → "
                     f"{_count(_after_stage2(data, run, label, entry))} ({entry['visual_tokens_layer_mean']:.1f}) | "
                     f"{entry['relative_flops']:.2f}x |")
    return "\n".join(lines)


def _count(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
