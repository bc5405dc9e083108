"""Layer skip: decoder prefill FLOPs and measured prefill time against the number of skipped MLPs.

    python benchmarks/layerskip_prefill.py                     # CPU: a mid-size Qwen2.5-VL-shaped decoder
    python benchmarks/layerskip_prefill.py --device cuda       # GPU: the real Qwen2.5-VL-7B shape, random bf16 weights
    python benchmarks/layerskip_prefill.py --smoke             # seconds (run by tests/test_layerskip_benchmarks.py)

One row per number k of layers whose MLP the visual rows skip (layers L-1, L-2, ...; any k layers cost the same),
optionally with as many attention skips (``--attn``). "GFLOPs": tokenprune's analytic decoder prefill FLOPs
(``engine/sublayers.planned_prefill_flops``: skipped visual rows removed from the MLP / q, o and scores). "ms":
median decoder prefill time (the text model only, KV cache on; the outer model gets ``input_ids`` and the image
grid but no pixels, so the vision encoder, whose cost the method cannot change, does not run). Timing: CUDA events
on GPU, ``perf_counter`` on CPU; warm-up calls first; rows are measured interleaved, round by round, so that a
noisy machine blurs every row alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import tokenprune as tp
from tokenprune.engine.flops import DecoderShape
from tokenprune.engine.sublayers import planned_prefill_flops
from tokenprune.methods.layerskip import LayerSkip, SkipPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables import meta, source, table  # noqa: E402  (registers this script's tables; see benchmarks/tables.py)

PREFIX_TEXT, SUFFIX_TEXT = 14, 20  # text tokens before the image (system prompt) and after it (question, template)
PRESETS = {
    # a Qwen2.5-VL-shaped decoder small enough for 2 CPU cores (d_ff / d = 5.5 as in the 7B)
    "cpu": dict(model="medium", layers=8, hidden=512, intermediate=2816, heads=8, kv_heads=2, visual=1024,
                dtype="float32", repeats=5, max_skips=8),
    "cuda": dict(model="qwen25vl_7b", layers=None, visual=1024, dtype="bfloat16", repeats=10, max_skips=14),
    "smoke": dict(model="medium", layers=4, hidden=64, intermediate=256, heads=4, kv_heads=2, visual=64,
                  dtype="float32", repeats=1, max_skips=4),
}


def load(preset: dict, device: str):
    """The decoder to time, with random weights: a registered model's architecture, or the "medium" shape."""
    dtype = tp.models.base.DTYPES[preset["dtype"]]
    if preset["model"] == "medium":
        from tokenprune.models.zoo.tiny import tiny_qwen25vl_config

        config = tiny_qwen25vl_config(layers=preset["layers"], hidden=preset["hidden"], heads=preset["heads"],
                                      kv_heads=preset["kv_heads"], intermediate=preset["intermediate"])
        family = "qwen25vl"
    else:
        spec = tp.models.model_spec(preset["model"])
        config, family = spec.random_config(), spec.family
        if preset.get("layers"):
            config.text_config.num_hidden_layers = preset["layers"]
    adapter = tp.models.adapter_named(family)
    with torch.device(device):  # build the weights where they will run
        model = adapter.build_random(config, dtype, "sdpa", seed=0)
    return tp.models.VLM(preset["model"], model.eval(), None, adapter)


def qwen_inputs(config, visual: int, device) -> dict:
    """``PREFIX_TEXT`` text tokens, <|vision_start|>, ``visual`` image tokens, <|vision_end|>, ``SUFFIX_TEXT``."""
    rows = int(visual**0.5)
    while visual % rows:
        rows -= 1
    merge = config.vision_config.spatial_merge_size
    special = torch.tensor([config.image_token_id, config.video_token_id, config.vision_start_token_id,
                            config.vision_end_token_id])
    ids = torch.cat([_text(PREFIX_TEXT, config, special), torch.tensor([config.vision_start_token_id]),
                     torch.full((visual,), config.image_token_id), torch.tensor([config.vision_end_token_id]),
                     _text(SUFFIX_TEXT, config, special)])[None]
    return {"input_ids": ids.to(device), "mm_token_type_ids": (ids == config.image_token_id).int().to(device),
            "image_grid_thw": torch.tensor([[1, rows * merge, visual // rows * merge]], device=device)}


def llava_inputs(config, visual: int, device) -> dict:
    """LLaVA has a fixed number of tokens per image (``visual`` is ignored): text, image tokens, text."""
    count = tp.models.adapter_named("llava").tokens_per_image(config)[0]
    special = torch.tensor([config.image_token_id])
    ids = torch.cat([_text(PREFIX_TEXT, config, special), torch.full((count,), config.image_token_id),
                     _text(SUFFIX_TEXT, config, special)])[None]
    return {"input_ids": ids.to(device)}


INPUTS = {"qwen25vl": qwen_inputs, "llava": llava_inputs}


def _text(n: int, config, special: torch.Tensor) -> torch.Tensor:
    vocab = min(1000, config.text_config.vocab_size)
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n))
    return torch.where(torch.isin(ids, special), torch.zeros_like(ids), ids)


class DecoderTimer:
    """Time of each text-model call (its forward pre-hook to its forward hook)."""

    def __init__(self, text_model, device: torch.device):
        self.cuda = device.type == "cuda"
        self.samples: list[float] = []
        self._handles = [text_model.register_forward_pre_hook(self._start),
                         text_model.register_forward_hook(self._stop)]

    def _start(self, *args):
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._begin = time.perf_counter()

    def _stop(self, *args):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            self.samples.append(self._begin.elapsed_time(end))
        else:
            self.samples.append((time.perf_counter() - self._begin) * 1000)

    def remove(self):
        for handle in self._handles:
            handle.remove()


def policies(num_layers: int, max_skips: int, attn: bool) -> list[SkipPolicy]:
    """k = 0..max_skips MLP skips at layers L-1, L-2, ... (and as many attention skips with ``attn``)."""
    layers = list(range(num_layers - 1, -1, -1))
    return [SkipPolicy(mlp=tuple(layers[:k]), attn=tuple(layers[:k]) if attn else ())
            for k in range(min(max_skips, num_layers) + 1)]


def setup(preset: dict, device: str, attn: bool = False):
    """The model, its inputs and one row per policy with its analytic FLOPs (no timing)."""
    device = torch.device(device)
    vlm = load(preset, device)
    text_model = vlm.adapter.text_model(vlm.model)
    inputs = INPUTS[vlm.adapter.family](vlm.model.config, preset["visual"], device)
    layout = tp.TokenLayout.from_input_ids(inputs["input_ids"][0], vlm.adapter.visual_specs(vlm.model, inputs)[0])
    shape = DecoderShape.from_config(text_model.config)
    rows = [{"policy": policy, "flops": planned_prefill_flops(shape, layout, policy.plans()), "ms": [],
             "tokens": layout.length, "visual": layout.num_visual, "layers": shape.layers}
            for policy in policies(shape.layers, preset["max_skips"], attn)]
    return vlm, inputs, rows


def run(preset: dict, device: str, attn: bool = False) -> list[dict]:
    vlm, inputs, rows = setup(preset, device, attn)
    outer, text_model = vlm.adapter.outer_model(vlm.model), vlm.adapter.text_model(vlm.model)

    def prefill(policy):
        with torch.no_grad(), tp.apply(vlm.model, LayerSkip.from_policy(policy)):
            outer(**inputs, use_cache=True)

    for row in rows:  # warm-up
        prefill(row["policy"])
    timer = DecoderTimer(text_model, torch.device(device))
    try:
        for _ in range(preset["repeats"]):
            for row in rows:
                prefill(row["policy"])
                row["ms"].append(timer.samples[-1])
    finally:
        timer.remove()
    for row in rows:
        row["median_ms"] = statistics.median(row["ms"])
    return rows


def markdown(rows: list[dict], title: str) -> str:
    full = rows[0]
    lines = [title, "",
             "| skipped MLPs | layers | prefill GFLOPs | FLOPs vs none | prefill ms (median) | time vs none |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        policy = row["policy"]
        skipped = f"{len(policy.mlp)}" + (f" (+{len(policy.attn)} attn)" if policy.attn else "")
        lines.append(f"| {skipped} | {list(policy.mlp) or '-'} | {row['flops'] / 1e9:.4g} | "
                     f"{row['flops'] / full['flops']:.3f} | {row['median_ms']:.2f} | "
                     f"{row['median_ms'] / full['median_ms']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (seconds)")
    parser.add_argument("--model", help="a registered model name (random weights of its architecture), or 'medium'")
    parser.add_argument("--layers", type=int, help="keep only this many decoder layers")
    parser.add_argument("--visual", type=int, help="visual tokens (Qwen2.5-VL; LLaVA has a fixed count)")
    parser.add_argument("--dtype", choices=sorted(tp.models.base.DTYPES))
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--max-skips", type=int)
    parser.add_argument("--attn", action="store_true", help="also skip the attention of the same layers")
    args = parser.parse_args(argv)
    preset = dict(PRESETS["smoke" if args.smoke else ("cuda" if args.device.startswith("cuda") else "cpu")])
    for key in ("model", "layers", "visual", "dtype", "repeats", "max_skips"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    rows = run(preset, args.device, attn=args.attn)
    first = rows[0]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(markdown(rows, f"Layer skip, decoder prefill: {preset['model']} ({first['layers']} layers), "
                      f"{first['tokens']} tokens ({first['visual']} visual), {preset['dtype']}, SDPA, {device_name}, "
                      f"median of {preset['repeats']}; torch {torch.__version__}"))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Generated tables (README.md, docs/methods/layerskip.md): python benchmarks/tables.py layerskip_prefill
# ---------------------------------------------------------------------------------------------------------
@source("layerskip_prefill", volatile=("ms", "median_ms"))
def layerskip_prefill(quick: bool) -> dict:
    """Decoder prefill FLOPs and time against skipped MLPs (and MLP + attention) on the CPU preset; quick: FLOPs."""
    records = []
    for attn in (False, True):
        rows = setup(PRESETS["cpu"], "cpu", attn)[2] if quick else run(PRESETS["cpu"], "cpu", attn)
        for row in rows:
            policy = row.pop("policy")
            records.append({**row, "key": f"{'mlp+attn' if attn else 'mlp'}/{len(policy.mlp)}",
                            "mlp": list(policy.mlp), "attn": list(policy.attn)})
    return {"meta": meta("python benchmarks/layerskip_prefill.py; python benchmarks/layerskip_prefill.py --attn"),
            "repeats": PRESETS["cpu"]["repeats"], "records": records}


def _stored_rows(data: dict, kind: str) -> list[dict]:
    return [{**r, "policy": SkipPolicy(mlp=tuple(r["mlp"]), attn=tuple(r["attn"]))}
            for r in data["records"] if r["key"].startswith(kind + "/")]


@table("layerskip_prefill", source="layerskip_prefill")
def layerskip_prefill_table(data: dict) -> str:
    rows, both = _stored_rows(data, "mlp"), _stored_rows(data, "mlp+attn")
    lines = markdown(rows, "").strip("\n").splitlines()
    lines[0] = lines[0].replace("(median)", f"(median of {data['repeats']})")
    last = both[-1]
    sentence = (f"With as many attention skips in the same layers (`--attn`): {len(last['mlp'])} + {len(last['attn'])} "
                f"skips leave {last['flops'] / both[0]['flops']:.3f} of the FLOPs and "
                f"{last['median_ms'] / both[0]['median_ms']:.3f} of the time.")
    return "\n".join(lines) + "\n\n" + sentence


@table("layerskip_prefill_readme", source="layerskip_prefill")
def layerskip_prefill_readme(data: dict) -> str:
    rows = [r for r in _stored_rows(data, "mlp") if len(r["mlp"]) % 2 == 0]
    full = rows[0]
    return "\n".join([
        "| skipped MLPs | " + " | ".join(str(len(r["mlp"])) for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
        "| prefill FLOPs vs none | " + " | ".join(f"{r['flops'] / full['flops']:.3f}" for r in rows) + " |",
        "| prefill time vs none | " + " | ".join(f"{r['median_ms'] / full['median_ms']:.3f}" for r in rows) + " |"])


if __name__ == "__main__":
    main()
