"""PruneVid token reduction at the paper's default setting on 16-frame synthetic videos.

    python benchmarks/prunevid_tokens.py                      # 8 videos, tiny Qwen2.5-VL shapes, 28 layers
    python benchmarks/prunevid_tokens.py --videos 2 --frames 8

The model is the tiny Qwen2.5-VL architecture of the packaged checkpoint (random weights unless a trained
checkpoint is packaged) rebuilt with 28 decoder layers, the depth of Qwen2.5-VL-7B, so that the paper's
``stage2_layer=10`` applies unchanged. Each video is written as an mp4 and read by qwen-vl-utils (decord) with
``nframes`` frames at 112 x 112 px: ``nframes / 2`` temporal groups of 8 x 8 = 64 tokens.

Printed (Markdown), averaged over the videos, per configuration (baseline, stage 1 alone, stage 2 alone, both):
visual tokens entering the decoder, visual tokens after stage 2 (what decoding attends to), the layer average
of the visual tokens, retained fractions, segments, static fraction and the decoder prefill FLOPs ratio
(``tokenprune.engine.flops``, all tokens, vs the baseline). Token counts do not depend on the weights except
through stage 1's clustering (segments and static fraction follow the features).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import tokenprune as tp
from tokenprune.data.synthetic import SyntheticVideoQA
from tokenprune.engine.flops import DecoderShape, prefill_flops
from tokenprune.models.zoo.tiny import TRAINED_QWEN, tiny_qwen25vl_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables import meta, source, table  # noqa: E402  (registers this script's tables; see benchmarks/tables.py)

FIELDS = ("original", "visual", "final", "layer_mean", "segments", "static", "flops")
CONFIGURATIONS = {
    "baseline": None,
    "stage 1": {"stage2": False},
    "stage 2": {"stage1": False},
    "stage 1 + 2": {},
}


def measure(videos: int = 8, frames: int = 16, layers: int = 28) -> list[dict]:
    """One record per (video, configuration): token counts, segments, static fraction and prefill FLOPs."""
    vlm = tp.load_model("tiny_qwen25vl", weights="random", device="cpu",
                        options={"video": {"nframes": frames, "min_pixels": 112 * 112, "max_pixels": 112 * 112}})
    vlm.model = vlm.adapter.build_random(tiny_qwen25vl_config(**{**TRAINED_QWEN, "layers": layers}),
                                         torch.float32, "sdpa", seed=0).eval()
    shape = DecoderShape.from_config(vlm.adapter.text_config(vlm.model))
    records = []
    with tempfile.TemporaryDirectory() as cache:
        dataset = SyntheticVideoQA(limit=videos, frames=frames, format="mp4", cache_dir=cache)
        for index in range(videos):
            inputs = vlm.prepare(dataset[index])
            for name, fields in CONFIGURATIONS.items():
                records.append({"key": f"{index}/{name}", "video": index, "configuration": name,
                                **run(vlm, inputs, fields, shape)})
    return records


def markdown(records: list[dict]) -> str:
    """Means over the videos, per configuration (FLOPs: the mean per-video ratio to the baseline)."""
    baseline = [r for r in records if r["configuration"] == "baseline"]
    lines = ["| configuration | visual tokens in | after stage 2 | layer mean | retained (final) | retained (layer mean) "
             "| segments | static | prefill FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    for name, mean in means(records).items():
        ratio = statistics.fmean(m["flops"] / b["flops"] for m, b in
                                 zip([r for r in records if r["configuration"] == name], baseline))
        lines.append(f"| {name} | {mean['visual']:.1f} | {mean['final']:.1f} | {mean['layer_mean']:.1f} "
                     f"| {100 * mean['final'] / mean['original']:.1f}% | {100 * mean['layer_mean'] / mean['original']:.1f}% "
                     f"| {_number(mean['segments'], '.2f')} | {_number(100 * mean['static'], '.1f', '%')} | {ratio:.3f}x |")
    return "\n".join(lines)


def means(records: list[dict]) -> dict[str, dict]:
    """Configuration -> mean of every measured field over the videos."""
    out = {}
    for name in CONFIGURATIONS:
        measured = [r for r in records if r["configuration"] == name]
        out[name] = {key: _mean(m[key] for m in measured) for key in FIELDS}
    return out


def _mean(values) -> float:
    values = [math.nan if v is None else v for v in values]
    return statistics.fmean(values)


@source("prunevid_tokens")
def prunevid_tokens(quick: bool) -> dict:
    """PruneVid token reduction at the paper's defaults on 16-frame synthetic videos (28-layer tiny Qwen2.5-VL)."""
    return {"meta": meta("python benchmarks/prunevid_tokens.py"), "videos": 1 if quick else 8,
            "records": measure(videos=1 if quick else 8)}


@table("prunevid_tokens", source="prunevid_tokens")
def prunevid_tokens_table(data: dict) -> str:
    return markdown(data["records"])


@table("prunevid_tokens_readme", source="prunevid_tokens")
def prunevid_tokens_sentence(data: dict) -> str:
    mean = means(data["records"])
    stage1, both = mean["stage 1"], mean["stage 1 + 2"]
    return (f"At the paper's default setting on 16-frame synthetic videos ({mean['baseline']['original']:.0f} tokens, "
            f"`python benchmarks/prunevid_tokens.py`) stage 1 keeps {100 * stage1['final'] / stage1['original']:.1f}% of "
            f"the video tokens and both stages {100 * both['final'] / both['original']:.1f}% "
            f"({100 * both['layer_mean'] / both['original']:.1f}% layer-averaged; the paper: 16.2%).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--layers", type=int, default=28)
    args = parser.parse_args()
    records = measure(args.videos, args.frames, args.layers)
    print(f"PruneVid (tau 0.8, cluster_ratio 0.5, temporal_segment_ratio 0.25, k 7, stage2_layer 10, "
          f"stage2_keep 0.4) · tiny Qwen2.5-VL shapes, {args.layers} layers · {args.videos} synthetic videos of "
          f"{args.frames} frames ({records[0]['visual']} video tokens)\n")
    print(markdown(records))


def _number(value: float, spec: str, suffix: str = "") -> str:
    return "—" if value != value else f"{value:{spec}}{suffix}"


def run(vlm, inputs, fields, shape) -> dict:
    original = inputs.layout.num_visual
    if fields is None:
        layers = shape.layers
        return {"original": original, "visual": original, "final": original, "layer_mean": original,
                "segments": None, "static": None,
                "flops": prefill_flops(shape, [inputs.layout.length] * layers)}
    with torch.no_grad(), tp.apply(vlm.model, "prunevid", **fields) as session:
        vlm.model(**inputs)
    report = session.last_report
    stats = report.stats
    return {"original": original, "visual": report.visual_entering_decoder, "final": report.layer_visual[-1],
            "layer_mean": report.visual_layer_mean, "segments": stats.get("prunevid_segments"),
            "static": stats.get("prunevid_static_fraction"),
            "flops": prefill_flops(shape, report.layer_tokens)}


if __name__ == "__main__":
    main()
