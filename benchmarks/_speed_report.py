"""Outputs of ``benchmarks/speed.py``: JSON, Markdown tables (with the target checks) and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = {"prefill_vs_ideal": 1.05, "overhead_pct": 3.0, "peak_vs_baseline": 1.1, "decode_vs_stock": 0.03}


def _f(value, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _bytes(value) -> str:
    if value is None:
        return "—"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _ratio(value) -> str:
    return "" if value is None else f" (×{value:.2f})"


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------
def header(meta: dict) -> list[str]:
    return [
        f"Device: **{meta['device']}** · torch {meta['torch']}"
        + (f" (CUDA {meta['cuda']})" if meta.get("cuda") else "")
        + f" · transformers {meta['transformers']} · tokenprune {meta['tokenprune']}"
        + (f" ({meta['commit']})" if meta.get("commit") else "") + f" · {meta['date']}",
        "",
        f"Random weights, {meta['dtype']}, SDPA, batch 1; prefill = text decoder forward, median of "
        f"{meta['repeats']} after {meta['warmup']} warm-up call(s); decode = median of {meta['decode_steps']} steps"
        + (f"; run took {meta['wall_s']:.0f} s" if meta.get("wall_s") else "") + ".",
        f"Command: `{meta['command']}`",
    ]


def vision_table(rows: list[dict]) -> list[str]:
    lines = ["| N | input | prompt tokens | vision encoder ms | unpruned decoder prefill ms | TTFT ≥ ms "
             "| TTFT speed-up bound (prefill → 0) |", "|---|---|---|---|---|---|---|"]
    for row in _ok(rows):
        if row["method"] == "baseline" and row["variant"] == "tokenprune":
            lines.append(f"| {row['visual_tokens']} | {row['input']} | {row['prompt_tokens']} | {_f(row['vision_ms'])} "
                         f"| {_f(row['prefill_ms'])} | {_f(row.get('ttft_ms'))} "
                         f"| {_f(row.get('ttft_speedup_bound'), '.2f', '×')} |")
    return lines


def main_table(rows: list[dict]) -> list[str]:
    lines = ["| N | input | method | tokens / layer (visual) | prefill ms | ideal ms | ×ideal | overhead ms (%) "
             "| pre-LLM ms | speed-up (ideal) | decode ms/token | ×stock decode | peak memory (×) | extra peak (×) "
             "| KV cache (×) | TTFT ms (speed-up) | syncs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] != "ok":
            if row.get("visual_tokens") is not None:
                lines.append(f"| {row['visual_tokens']} | {row['input']} | {row['label']} | {row['status']}: "
                             f"{row['reason']} |" + " |" * 13)
            continue
        overhead = f"{row['overhead_ms']:.2f} ({_f(row.get('overhead_pct'), '.1f')}%)"
        pre_llm = _f(row.get("pre_llm_ms"), ".2f") if row.get("pre_llm") else "—"
        speedup = f"{_f(row.get('speedup'), '.2f', '×')} ({_f(row.get('ideal_speedup'), '.2f', '×')})"
        lines.append(
            f"| {row['visual_tokens']} | {row['input']} | {row['label']} "
            f"| {row['mean_tokens']:.0f} ({row['mean_visual']:.0f}) | {_f(row['prefill_ms'], '.2f')} "
            f"| {_f(row.get('ideal_ms'), '.2f')} | {_f(row.get('prefill_vs_ideal'), '.3f')} "
            f"| {overhead} | {pre_llm} | {speedup} | {_f(row.get('decode_ms'), '.2f')} | {_f(row.get('decode_vs_stock'), '.3f')} "
            f"| {_bytes(row.get('peak_bytes'))}{_ratio(row.get('peak_vs_baseline'))} "
            f"| {_bytes(row.get('extra_peak_bytes'))}{_ratio(row.get('extra_peak_vs_baseline'))} "
            f"| {_bytes(row.get('kv_cache_bytes'))}{_ratio(row.get('kv_cache_vs_baseline'))} "
            f"| {_f(row.get('ttft_ms'))} ({_f(row.get('ttft_speedup'), '.2f', '×')}) "
            f"| {_f(row.get('synchronizations'), 'd')} |")
    return lines


def target_rows(rows: list[dict], target_tokens: int) -> tuple[int | None, list[dict]]:
    """The intra-LLM tokenprune rows at the measured N closest to ``target_tokens``."""
    measured = sorted({r["visual_tokens"] for r in _ok(rows) if r["input"] == "image"})
    if not measured:
        return None, []
    n = min(measured, key=lambda v: abs(v - target_tokens))
    return n, [r for r in _ok(rows) if r["visual_tokens"] == n and r["variant"] == "tokenprune" and r.get("intra_llm")]


def check(row: dict) -> dict[str, tuple[bool | None, str]]:
    """Each target: (met, shown value). Targets: ×ideal ≤ 1.05, overhead ≤ 3 %, peak ≤ 1.1 × unpruned,
    decode within ±3 % of the stock model on the same cache."""

    def judge(value, ok, text):
        return (None, "—") if value is None else (ok(value), text.format(value))

    return {
        "prefill ≤ 1.05 × ideal": judge(row.get("prefill_vs_ideal"), lambda v: v <= TARGETS["prefill_vs_ideal"],
                                        "×{:.3f}"),
        "overhead ≤ 3 %": judge(row.get("overhead_pct"), lambda v: v <= TARGETS["overhead_pct"], "{:.2f} %"),
        "peak ≤ 1.1 × unpruned": judge(row.get("peak_vs_baseline"), lambda v: v <= TARGETS["peak_vs_baseline"],
                                       "×{:.3f}"),
        "decode ±3 % of stock": judge(row.get("decode_vs_stock"), lambda v: abs(v - 1) <= TARGETS["decode_vs_stock"],
                                      "×{:.3f}"),
    }


def targets_table(rows: list[dict], target_tokens: int) -> list[str]:
    n, selected = target_rows(rows, target_tokens)
    if not selected:
        return []
    names = list(check(selected[0]))
    lines = [f"Targets at N = {n} (closest measured to {target_tokens}); ✅ met, ❌ missed:", "",
             "| method | input | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in selected:
        cells = [f"{'✅' if met else '❌' if met is not None else ''} {text}" for met, text in check(row).values()]
        lines.append(f"| {row['label']} | {row['input']} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: dict, target_tokens: int = 4096, level: int = 1, title: bool = True) -> str:
    """The whole report; ``level``: the heading level of its title (models one level below, sections two)."""
    meta, rows = results["meta"], results["rows"]
    h = "#" * level
    lines = ([f"{h} Speed and memory against the ideal ({meta['device']})", ""] if title else []) + header(meta)
    for model in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == model]
        lines += ["", f"{h}# {model}", "", f"{h}## Vision encoder and time to first token", "", *vision_table(own),
                  "", f"{h}## Decoder prefill, decode and memory", "", *main_table(own)]
        targets = targets_table(own, target_tokens)
        if targets:
            lines += ["", f"{h}## Targets", "", *targets]
        skipped = [r for r in own if r["status"] == "skipped"]
        if skipped:
            lines += ["", "Skipped: " + "; ".join(f"`{r['method']}` ({r['reason']})" for r in skipped) + "."]
    lines += ["", COLUMNS]
    return "\n".join(lines) + "\n"


COLUMNS = """Columns: *tokens / layer* Σ_l n_l / L (visual in brackets); *prefill* the text decoder's forward (the
method's selections, scoring and the driver's work included); *ideal* Σ_l t(n_l), one decoder layer's measured time
at each layer's token count (sublayers for layer-skip plans); *×ideal* prefill / ideal (the unpruned row shows what
the stock loop adds to its layers); *overhead* method hooks (scoring + selection) from the PrefillReport, and its
share of the prefill; *pre-LLM* the part of it spent before the decoder by a pre-LLM method (``before_llm``: vision
signals, selection, merging: VisionZip & co, pool, PruneVid stage 1; the vision encoder itself runs outside the
prefill); a downsampled row runs on its own smaller input, with its own vision-encoder time in its TTFT;
*speed-up* unpruned prefill / prefill (ideal: the same for the ideal times); *decode* one
step on the method's KV cache with the method applied, *×stock decode* against the stock model stepping the same
cache (same per-layer lengths, no hooks); *peak memory* allocated during the prefill (GPU: weights included, *extra
peak* the same minus the memory in use before the call; CPU: the peak live bytes of the tensors the prefill creates,
`TensorMemory`, weights excluded, so *extra peak* equals it); *KV cache* bytes after
the prefill; *TTFT* vision encoder + decoder prefill (a lower bound: no preprocessing, no LM head); *syncs*
host-device synchronisations in one prefill (CUDA sync debug mode; on CPU the reads of tensor values back to the
host that would synchronise on a GPU, `HostReads`). Peer rows: eager attention in
every decoder layer, with the scoring layers' attention maps kept as `output_attentions=True` keeps them."""


# ---------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> Path:
    """Per model: prefill / ideal against N for every row label, and measured against ideal speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ok(results["rows"])
    models = list(dict.fromkeys(r["model"] for r in rows)) or ["(no rows)"]
    figure, axes = plt.subplots(len(models), 2, figsize=(15, 7.5 * len(models)), squeeze=False)
    for (left, right), model in zip(axes, models):
        own = [r for r in rows if r["model"] == model and r.get("prefill_vs_ideal") is not None]
        labels = list(dict.fromkeys((r["label"], r["input"]) for r in own))
        colours = plt.get_cmap("tab20")
        for i, (label, kind) in enumerate(labels):
            line = sorted((r for r in own if (r["label"], r["input"]) == (label, kind)),
                          key=lambda r: r["visual_tokens"])
            style = "--" if line[0]["variant"] == "peer" else "-"
            name = label if kind == "image" else f"{label} ({kind})"
            left.plot([r["visual_tokens"] for r in line], [r["prefill_vs_ideal"] for r in line], style, marker="o",
                      color=colours(i % 20), label=name)
            points = [r for r in line if r.get("speedup") and r.get("ideal_speedup")]
            right.scatter([r["ideal_speedup"] for r in points], [r["speedup"] for r in points], color=colours(i % 20),
                          marker="s" if style == "--" else "o", s=[12 + 4 * r["visual_tokens"] ** 0.5 for r in points])
        left.axhline(1.0, color="black", linewidth=0.8)
        left.axhline(1.05, color="red", linewidth=0.8, linestyle=":")
        left.set_xscale("log")
        left.set_xlabel("visual tokens N")
        left.set_ylabel("measured prefill / ideal")
        left.set_title(f"{model}: prefill against the ideal (red: 1.05)")
        left.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(0, -0.12))  # below: keep the data clear
        limit = max([r.get("ideal_speedup") or 1 for r in own] + [r.get("speedup") or 1 for r in own] + [1.5])
        right.plot([0, limit], [0, limit], color="black", linewidth=0.8)
        right.set_xlabel("ideal speed-up over the unpruned prefill")
        right.set_ylabel("measured speed-up")
        right.set_title(f"{model}: measured vs ideal speed-up (size ~ N; squares: peer-style)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def write_outputs(results: dict, out: Path, plot_png: bool = True, target_tokens: int = 4096) -> dict:
    """Write speed.json, speed.md (and speed.png) under ``out``; returns their paths and the Markdown text."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "speed.json", "markdown": out / "speed.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str))
    text = render_markdown(results, target_tokens)
    paths["markdown"].write_text(text)
    if plot_png:
        paths["png"] = plot(results, out / "speed.png")
    return {**paths, "markdown_text": text}
