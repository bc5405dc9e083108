"""HiMAP's scoring cost: decoder prefill time and peak memory beside the unpruned SDPA prefill.

    python benchmarks/himap_memory.py                 # CPU: tiny Qwen2.5-VL decoder (12 layers), 1k-8k visual tokens
    python benchmarks/himap_memory.py --smoke         # a few seconds, tiny shapes (run by tests/test_himap.py)
    python benchmarks/himap_memory.py --device cuda   # GPU: the real Qwen2.5-VL-7B architecture, random bf16 weights

Prints a Markdown table. One row per length: the same prompt (system text, one image of N visual tokens,
question), once with ``method=baseline`` (the stock model, SDPA, no hook) and once with HiMAP (SDPA main pass,
scores recomputed for |Q_T| and k1 query rows only). Only the decoder prefill is timed: the outer model is
called with ``input_ids`` and the image grid but no pixels (the vision encoder does not run; its cost does not
depend on the method), with a KV cache, and without the LM head.

Peak memory:
  * CUDA: ``torch.cuda.max_memory_allocated`` over one call (weights included), after a warm-up call.
  * CPU: the process high-water mark ``VmHWM`` over one call, reset by writing "5" to ``/proc/self/clear_refs``
    (Linux). Each (method, length) runs in a fresh subprocess after a short warm-up, with glibc's mmap threshold
    fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS at once; the smoke mode runs in
    process (its numbers are then indicative only).
"extra peak %" = (HiMAP peak - SDPA peak) / SDPA peak, both totals; "vs act." divides by SDPA's activations
(peak minus the memory in use before the call) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import tokenprune as tp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables import meta, source, table  # noqa: E402  (registers this script's tables; see benchmarks/tables.py)

MIB = 2**20
DEFAULTS = {
    "cpu": {"model": "tiny", "lengths": [1024, 2048, 4096, 8192], "layers": 12, "dtype": "float32", "repeats": 3},
    "cuda": {"model": "qwen25vl_7b", "lengths": [1024, 2048, 4096, 8192, 16384], "layers": None, "dtype": "bfloat16",
             "repeats": 5},
}
SMOKE = {"model": "tiny", "lengths": [64, 144], "layers": 6, "dtype": "float32", "repeats": 1, "text_layer": 2,
         "image_layer": 4}
PREFIX_TEXT, SUFFIX_TEXT = 14, 20  # text tokens before the image (system prompt) and after it (question, template)


# ---------------------------------------------------------------------------------------------------------
# model and inputs
# ---------------------------------------------------------------------------------------------------------
def load(model: str, device: str, dtype: str, layers: int | None):
    if model == "tiny":
        from tokenprune.models.zoo.tiny import tiny_qwen25vl_config

        adapter = tp.models.adapter_named("qwen25vl")
        built = adapter.build_random(tiny_qwen25vl_config(layers=layers or 12), tp.models.base.DTYPES[dtype], "sdpa",
                                     seed=0)
        return tp.models.VLM("tiny_qwen25vl", built.to(device).eval(), None, adapter)
    return tp.load_model(model, weights="random", dtype=dtype, device=device, attn_implementation="sdpa")


def grid_for(visual: int) -> tuple[int, int]:
    """Rows x columns of LLM tokens with rows * cols == visual, as square as possible."""
    rows = int(visual**0.5)
    while visual % rows:
        rows -= 1
    return rows, visual // rows


def build_inputs(vlm, visual: int, device) -> dict:
    """A Qwen2.5-VL prompt: PREFIX_TEXT text tokens, <|vision_start|>, ``visual`` image tokens, <|vision_end|>,
    SUFFIX_TEXT text tokens. ``input_ids`` ``[1, L]``, ``image_grid_thw`` in patches (2x2 merge)."""
    config = vlm.model.config
    rows, cols = grid_for(visual)
    merge = config.vision_config.spatial_merge_size
    generator = torch.Generator().manual_seed(visual)
    vocab = min(1000, config.text_config.vocab_size)
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}

    def text(n):
        ids = torch.randint(0, vocab, (n,), generator=generator)
        return torch.where(torch.isin(ids, torch.tensor(sorted(special))), torch.zeros_like(ids), ids)

    ids = torch.cat([text(PREFIX_TEXT), torch.tensor([config.vision_start_token_id]),
                     torch.full((visual,), config.image_token_id), torch.tensor([config.vision_end_token_id]),
                     text(SUFFIX_TEXT)])[None]
    token_type = (ids == config.image_token_id).int()
    return {"input_ids": ids.to(device), "mm_token_type_ids": token_type.to(device),
            "image_grid_thw": torch.tensor([[1, rows * merge, cols * merge]], device=device)}


# ---------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak bytes over a block and the bytes in use before it (CUDA allocator, or the process RSS on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- current RSS
            self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = _status_kib("VmHWM") * 1024
        return False


def timed_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1000


def measure(vlm, method, visual: int, repeats: int) -> dict:
    """Prefill of ``visual`` image tokens under ``method``: peak memory of one call, median time of ``repeats``."""
    device = vlm.device
    outer = vlm.adapter.outer_model(vlm.model)
    inputs = build_inputs(vlm, visual, device)
    warmup = build_inputs(vlm, 16, device)
    result = {}

    def prefill(batch):
        with tp.apply(vlm.model, method) as session:
            outer(**batch, use_cache=True)
        return session.last_report

    with torch.inference_mode():
        prefill(warmup)
        if device.type == "cuda":
            prefill(inputs)  # CUDA kernels and workspaces for this shape
        with PeakMemory(device) as memory:
            report = prefill(inputs)
        result.update(peak=memory.peak, before=memory.before, tokens=inputs["input_ids"].shape[1], visual=visual,
                      layer_visual=None if report is None else report.layer_visual,
                      overhead_ms=None if report is None else report.overhead_ms)
        result["ms"] = statistics.median(timed_ms(lambda: prefill(inputs), device) for _ in range(repeats))
    return result


def method_for(name: str, text_layer: int, image_layer: int):
    if name == "baseline":
        return tp.methods.create("baseline")
    return tp.methods.create("himap", text_layer=text_layer, image_layer=image_layer)


def measure_isolated(args, name: str, visual: int) -> dict:
    """One (method, length) in a fresh Python process (CPU: a clean RSS high-water mark)."""
    command = [sys.executable, __file__, "--worker", name, str(visual), "--device", args.device, "--model", args.model,
               "--dtype", args.dtype, "--repeats", str(args.repeats), "--text-layer", str(args.text_layer),
               "--image-layer", str(args.image_layer)] + (["--layers", str(args.layers)] if args.layers else []) \
        + (["--threads", str(args.threads)] if args.threads else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MIB))
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------------------
def markdown(rows: list[dict], title: str) -> str:
    lines = [title, "",
             "| decoder tokens | visual | SDPA prefill ms | SDPA peak MiB (act.) | HiMAP prefill ms | HiMAP scoring ms "
             "| HiMAP peak MiB (act.) | extra peak % | vs act. % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        sdpa_act = row["sdpa_peak_mib"] - row["sdpa_before_mib"]
        himap_act = row["himap_peak_mib"] - row["himap_before_mib"]
        extra = row["himap_peak_mib"] - row["sdpa_peak_mib"]
        lines.append(
            f"| {row['tokens']} | {row['visual']} | {row['sdpa_ms']:.1f} | {row['sdpa_peak_mib']:.0f} ({sdpa_act:.1f}) "
            f"| {row['himap_ms']:.1f} | {row['himap_scoring_ms']:.1f} | {row['himap_peak_mib']:.0f} ({himap_act:.1f}) "
            f"| {100 * extra / row['sdpa_peak_mib']:+.1f} | {100 * extra / max(sdpa_act, 1e-9):+.0f} |")
    return "\n".join(lines)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="'tiny' (tiny Qwen2.5-VL) or a named model built with weights=random")
    parser.add_argument("--lengths", type=int, nargs="+", help="visual tokens per prompt")
    parser.add_argument("--layers", type=int, help="decoder layers of the tiny model")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--text-layer", type=int, default=2)
    parser.add_argument("--image-layer", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, in process, one repeat")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "VISUAL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = SMOKE if args.smoke else DEFAULTS[args.device]
    for key, value in preset.items():
        if getattr(args, key, None) is None or (args.smoke and key in ("text_layer", "image_layer")):
            setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        vlm = load(args.model, args.device, args.dtype, args.layers)
        name, visual = args.worker[0], int(args.worker[1])
        print(json.dumps(measure(vlm, method_for(name, args.text_layer, args.image_layer), visual, args.repeats)))
        return []
    in_process = args.smoke or args.device == "cuda"
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise SystemExit("CPU peak memory needs Linux /proc/self/clear_refs")
    vlm = load(args.model, args.device, args.dtype, args.layers) if in_process else None
    rows = []
    for visual in args.lengths:
        results = {}
        for name in ("baseline", "himap"):
            if in_process:
                results[name] = measure(vlm, method_for(name, args.text_layer, args.image_layer), visual, args.repeats)
            else:
                results[name] = measure_isolated(args, name, visual)
        sdpa, himap = results["baseline"], results["himap"]
        rows.append({"tokens": sdpa["tokens"], "visual": visual,
                     "sdpa_ms": sdpa["ms"], "sdpa_peak_mib": sdpa["peak"] / MIB, "sdpa_before_mib": sdpa["before"] / MIB,
                     "himap_ms": himap["ms"], "himap_peak_mib": himap["peak"] / MIB,
                     "himap_before_mib": himap["before"] / MIB, "himap_scoring_ms": himap["overhead_ms"],
                     "himap_layer_visual": himap["layer_visual"]})
    model = "tiny Qwen2.5-VL" if args.model == "tiny" else args.model
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    title = (f"HiMAP (text_layer={args.text_layer}, image_layer={args.image_layer}, 0.5 / 0.125) vs unpruned SDPA "
             f"prefill: {model}, {args.dtype}, {device}, median of {args.repeats}"
             + (" — smoke mode, in process: indicative only" if args.smoke else ""))
    print(markdown(rows, title))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Generated table (docs/methods/himap.md): python benchmarks/tables.py himap_memory
# ---------------------------------------------------------------------------------------------------------
MEASURED = ("sdpa_ms", "sdpa_peak_mib", "sdpa_before_mib", "himap_ms", "himap_peak_mib", "himap_before_mib",
            "himap_scoring_ms")


@source("himap_memory", volatile=MEASURED)
def himap_memory(quick: bool) -> dict:
    """HiMAP prefill time and peak memory against unpruned SDPA, CPU preset; quick: the 1k row's token schedule."""
    if quick:
        defaults = DEFAULTS["cpu"]
        vlm = load(defaults["model"], "cpu", defaults["dtype"], defaults["layers"])
        visual = defaults["lengths"][0]
        result = measure(vlm, method_for("himap", 2, 8), visual, repeats=1)
        rows = [{"tokens": result["tokens"], "visual": visual, "himap_layer_visual": result["layer_visual"]}]
    else:
        rows = main([])
    return {"meta": meta("python benchmarks/himap_memory.py"), "records": [{**r, "key": str(r["visual"])} for r in rows]}


@table("himap_memory", source="himap_memory")
def himap_memory_table(data: dict) -> str:
    return markdown(data["records"], "").strip("\n")


if __name__ == "__main__":
    main()
