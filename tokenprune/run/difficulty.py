"""The difficulty filter (VTC-Bench, card ``downsample.md`` §2c): samples that plain downsampling already answers
correctly say little about a token-reduction method.

Among the samples the unpruned model gets right (S), downsampling at a budget splits them into the *difficult*
subset A (downsampling wrong) and the *simple* subset B (downsampling right). Every method is then reported on the
whole set, on A and on B, with paired deltas against the unpruned model on the same samples.

Rules (VTC-Bench's ``tools/analyze_results.py``): a sample is *correct* when its per-sample score is at least
``threshold`` (0.5: TextVQA needs 2 of 10 annotators, VQA accuracy 0.6; MME per question; POPE / GQA / multiple
choice exact); a sample without a downsample result (missing or failed) is left out of A and B; a method without a
result on a sample (missing or failed) counts as **wrong** there. With the filter model = the target model, the
unpruned model scores 100 % on A and B and downsampling 0 % on A, so a method's accuracy on A lies on a 0-100 scale
between downsampling and no compression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .results import bootstrap_interval

THRESHOLD = 0.5


def correct(score, threshold: float = THRESHOLD) -> bool:
    """A per-sample score counts as correct at or above ``threshold`` (None: no result, wrong)."""
    return score is not None and score >= threshold


@dataclass
class Split:
    """The difficulty split of one downsample run: ``solved`` S (the unpruned model right), ``difficult`` A and
    ``simple`` B (S without downsample results is ``skipped``), as sample ids."""

    solved: list[str]
    difficult: list[str]
    simple: list[str]
    skipped: list[str]


def split(baseline: dict, downsample: dict, threshold: float = THRESHOLD) -> Split:
    """``baseline`` / ``downsample``: sample id → score (None: the run failed on it; absent: not run)."""
    solved = sorted(i for i, score in baseline.items() if correct(score, threshold))
    skipped = [i for i in solved if downsample.get(i) is None]
    difficult = [i for i in solved if downsample.get(i) is not None and not correct(downsample[i], threshold)]
    simple = [i for i in solved if correct(downsample.get(i), threshold)]
    return Split(solved, difficult, simple, skipped)


def subset(method: dict, baseline: dict, ids: list[str], threshold: float = THRESHOLD) -> dict:
    """A method on the samples ``ids``: how many it gets right (missing / failed: wrong), its accuracy (%), its mean
    score, and the paired delta of its scores against the unpruned model's (missing: 0) with a 95 % interval."""
    if not ids:
        return {"n": 0, "correct": 0, "accuracy": None, "score": None, "delta": None, "ci95": None}
    right = sum(correct(method.get(i), threshold) for i in ids)
    scores = [method.get(i) or 0.0 for i in ids]
    deltas = [(method.get(i) or 0.0) - (baseline.get(i) or 0.0) for i in ids]
    return {"n": len(ids), "correct": right, "accuracy": 100.0 * right / len(ids), "score": sum(scores) / len(ids),
            "delta": sum(deltas) / len(deltas), "ci95": bootstrap_interval(deltas)}


def analysis(baseline: dict, downsample: dict, methods: dict[str, dict], threshold: float = THRESHOLD) -> dict:
    """Every method (label → {id: score}) on the whole set, the difficult and the simple subset of one downsample
    run. The whole set is every sample the unpruned model ran on."""
    parts = split(baseline, downsample, threshold)
    everything = sorted(baseline)
    rows = {label: {"all": subset(scores, baseline, everything, threshold),
                    "difficult": subset(scores, baseline, parts.difficult, threshold),
                    "simple": subset(scores, baseline, parts.simple, threshold)}
            for label, scores in methods.items()}
    return {"split": parts, "methods": rows}


def format_analysis(result: dict, title: str, tokens: dict[str, tuple] | None = None) -> str:
    """A Markdown table of ``analysis``'s result; ``tokens``: each label's mean visual tokens (entering the decoder,
    layer-averaged), to see which methods ran at the downsample's budget."""
    parts: Split = result["split"]
    lines = [f"**{title}** — solved by the unpruned model: {len(parts.solved)}; difficult (downsampling wrong): "
             f"{len(parts.difficult)}; simple: {len(parts.simple)}"
             + (f"; without a downsample result: {len(parts.skipped)}" if parts.skipped else ""), "",
             "| method | visual in / layer-avg | all: acc % (Δ vs baseline [95% CI]) | difficult: acc % (Δ [95% CI]) "
             "| simple: acc % (Δ [95% CI]) |", "|---|---|---|---|---|"]
    for label, row in result["methods"].items():
        cells = [_cell(row[part]) for part in ("all", "difficult", "simple")]
        visual = " / ".join("—" if v is None else f"{v:.1f}" for v in (tokens or {}).get(label, (None, None)))
        lines.append(f"| {label} | {visual} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(part: dict) -> str:
    if not part["n"]:
        return "—"
    low, high = part["ci95"]
    interval = "" if math.isnan(low) else f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{part['accuracy']:.1f} ({100 * part['delta']:+.1f}{interval})"


# ---------------------------------------------------------------------------------------------------------
# From finished runs
# ---------------------------------------------------------------------------------------------------------
def scores_of(records: list[dict], label: str) -> dict:
    """Sample id → score of ``label``'s run (None where it failed); samples it did not run on are absent, and so
    are samples that failed before any method ran."""
    scores = {}
    for record in records:
        run = record.get("runs", {}).get(label)
        if record.get("error") is None and run is not None:
            scores[record["id"]] = run.get("score") if run.get("error") is None else None
    return scores


def sections(rows: list[dict], title: str, threshold: float = THRESHOLD) -> list[str]:
    """One table per downsample row: every row on the whole set, the difficult and the simple subset.

    ``rows``: comparable runs' rows (same model, dataset and samples), each ``{"label": table label, "method":
    method name, "records": its run's records, "record_label": its label there, "visual_tokens": mean visual
    tokens entering the decoder, "visual_tokens_layer_mean": layer-averaged}``. A downsample row is split against the
    unpruned run of its own records (``baseline``), else the first baseline row.
    """
    baselines = [row for row in rows if row["method"] == "baseline"]
    out = []
    for downsample in (row for row in rows if row["method"] == "downsample"):
        own = scores_of(downsample["records"], "baseline")
        baseline = own or (scores_of(baselines[0]["records"], baselines[0]["record_label"]) if baselines else {})
        if not baseline:
            continue
        methods = {row["label"]: scores_of(row["records"], row["record_label"]) for row in rows}
        result = analysis(baseline, scores_of(downsample["records"], downsample["record_label"]), methods, threshold)
        tokens = {row["label"]: (row.get("visual_tokens"), row.get("visual_tokens_layer_mean")) for row in rows}
        out += [format_analysis(result, f"Difficult subset of {title}: {downsample['label']}", tokens), ""]
    return out
