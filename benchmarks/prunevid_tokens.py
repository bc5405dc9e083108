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
import statistics
import tempfile

import torch

import tokenprune as tp
from tokenprune.data.synthetic import SyntheticVideoQA
from tokenprune.engine.flops import DecoderShape, prefill_flops
from tokenprune.models.zoo.tiny import TRAINED_QWEN, tiny_qwen25vl_config

CONFIGURATIONS = {
    "baseline": None,
    "stage 1": {"stage2": False},
    "stage 2": {"stage1": False},
    "stage 1 + 2": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--layers", type=int, default=28)
    args = parser.parse_args()

    vlm = tp.load_model("tiny_qwen25vl", weights="random", device="cpu",
                        options={"video": {"nframes": args.frames, "min_pixels": 112 * 112, "max_pixels": 112 * 112}})
    vlm.model = vlm.adapter.build_random(tiny_qwen25vl_config(**{**TRAINED_QWEN, "layers": args.layers}),
                                         torch.float32, "sdpa", seed=0).eval()
    shape = DecoderShape.from_config(vlm.adapter.text_config(vlm.model))
    with tempfile.TemporaryDirectory() as cache:
        dataset = SyntheticVideoQA(limit=args.videos, frames=args.frames, format="mp4", cache_dir=cache)
        rows = {name: [] for name in CONFIGURATIONS}
        for index in range(args.videos):
            inputs = vlm.prepare(dataset[index])
            for name, fields in CONFIGURATIONS.items():
                rows[name].append(run(vlm, inputs, fields, shape))
    baseline = rows["baseline"]
    print(f"PruneVid (tau 0.8, cluster_ratio 0.5, temporal_segment_ratio 0.25, k 7, stage2_layer 10, "
          f"stage2_keep 0.4) · tiny Qwen2.5-VL shapes, {args.layers} layers · {args.videos} synthetic videos of "
          f"{args.frames} frames ({baseline[0]['visual']} video tokens)\n")
    print("| configuration | visual tokens in | after stage 2 | layer mean | retained (final) | retained (layer mean) "
          "| segments | static | prefill FLOPs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, measured in rows.items():
        mean = {key: statistics.fmean(m[key] for m in measured) for key in measured[0]}
        ratio = statistics.fmean(m["flops"] / b["flops"] for m, b in zip(measured, baseline))
        print(f"| {name} | {mean['visual']:.1f} | {mean['final']:.1f} | {mean['layer_mean']:.1f} "
              f"| {100 * mean['final'] / mean['original']:.1f}% | {100 * mean['layer_mean'] / mean['original']:.1f}% "
              f"| {_number(mean['segments'], '.2f')} | {_number(100 * mean['static'], '.1f', '%')} | {ratio:.3f}x |")


def _number(value: float, spec: str, suffix: str = "") -> str:
    return "—" if value != value else f"{value:{spec}}{suffix}"


def run(vlm, inputs, fields, shape) -> dict:
    original = inputs.layout.num_visual
    if fields is None:
        layers = shape.layers
        return {"original": original, "visual": original, "final": original, "layer_mean": original,
                "segments": float("nan"), "static": float("nan"),
                "flops": prefill_flops(shape, [inputs.layout.length] * layers)}
    with torch.no_grad(), tp.apply(vlm.model, "prunevid", **fields) as session:
        vlm.model(**inputs)
    report = session.last_report
    stats = report.stats
    return {"original": original, "visual": report.visual_entering_decoder, "final": report.layer_visual[-1],
            "layer_mean": report.visual_layer_mean, "segments": stats.get("prunevid_segments", float("nan")),
            "static": stats.get("prunevid_static_fraction", float("nan")),
            "flops": prefill_flops(shape, report.layer_tokens)}


if __name__ == "__main__":
    main()
