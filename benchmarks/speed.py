"""Performance benchmark: every registered method's decoder prefill, decode and memory against its ideal.

    python benchmarks/speed.py --device cuda --model qwen25vl_7b --out outputs/speed/qwen25vl_7b   # H100: ~5-7 min
    python benchmarks/speed.py --device cuda --model llava15_7b --out outputs/speed/llava15_7b
    python benchmarks/speed.py --smoke --out /tmp/speed          # CPU, tiny shapes, seconds (the CI smoke test)
    python benchmarks/speed.py --device cpu                      # CPU, tiny architectures, larger N

The real architectures are built with random weights (timing does not depend on weight values), bf16, SDPA,
batch 1. For each N (visual tokens) a synthetic prompt (short prefix, N visual tokens, short question) is
encoded once by the vision encoder (timed: ``vision ms``); then, for the unpruned model and every registered
method at 2-3 budgets, the decoder prefill runs with the encoder output passed in (``mm_encoder_outputs``):

* prefill: the text decoder's forward, warm-up then median of ``--repeats`` (CUDA events);
* ideal: sum over layers of one decoder layer's measured time at that layer's token count (PrefillReport);
* overhead: the method hooks' time (scoring + selection), from the PrefillReport; the part spent before the
  decoder (``before_llm``: vision signals, selection, merging of pre-LLM methods) in its own column;
* a preprocessing method (``downsample``) runs on its own smaller input (the prompt's grids scaled to its token
  fraction), whose vision-encoder time is that row's;
* decode: one step per token on the resulting KV cache, with the method applied and for the stock model on the
  same cache (same per-layer lengths), interleaved, median;
* peak allocated memory during the prefill and KV-cache bytes after it;
* peer-style rows for FastV and HiMAP: the same selection from eager attention maps (``attn_implementation=
  "eager"``, the maps of the scoring layers kept as ``output_attentions=True`` keeps them).

Pre-LLM methods that read the vision encoder's signals (VisionZip, VisPruner) get the encoder run before each
decoder prefill (untimed: the captures their hooks need); their signal computation is in the pre-LLM column. No
method scores with eager attention maps (only the peer-style rows do).

Writes ``speed.json``, ``speed.md`` and ``speed.png`` under ``--out`` and prints the Markdown tables.
PruneVid (a video method) runs on a video-shaped input (``--video-frames`` temporal steps, same N) on
Qwen2.5-VL, with its own unpruned row on that input; on LLaVA-1.5 (images only) it is reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the benchmarks/_speed_*.py helpers

import tokenprune as tp  # noqa: E402
from tokenprune.engine.apply import apply  # noqa: E402
from tokenprune.engine.flops import DecoderShape, all_conventions  # noqa: E402
from tokenprune.methods._budget import budget_fraction  # noqa: E402
from tokenprune.methods.pdrop import stage_boundaries  # noqa: E402
from tokenprune.run.measure import release_memory  # noqa: E402
from tokenprune.run.runner import method_label  # noqa: E402

from _speed_inputs import build_prompt, encode, load_random_model, resized_grids, supports_video  # noqa: E402
from _speed_measure import (PEER_SCORING_LAYERS, EagerMapScoring, LayerTimer, Schedule,  # noqa: E402
                            eager_attention_maps, ideal_prefill_ms, measure_decode, measure_prefill, measure_vision)
from _speed_report import render_markdown, write_outputs  # noqa: E402
from _tables import source, table  # noqa: E402  (registers this script's table; see benchmarks/tables.py)

PRESETS = {
    "cuda": dict(models=["qwen25vl_7b"], dtype="bfloat16", repeats=10, warmup=2, decode_steps=10,
                 lengths={"dynamic": [576, 1196, 4096, 16384], "llava": [576, 1152, 2304, 4032]},
                 budgets=[0.5, 0.25], peer_max_tokens=8192),
    "cpu": dict(models=["tiny_qwen25vl", "tiny_llava"], dtype="float32", repeats=5, warmup=1, decode_steps=5,
                lengths={"dynamic": [144, 576, 1024], "llava": [144, 576, 1008]},
                budgets=[0.5, 0.25], peer_max_tokens=1 << 30),
    # every registered family's tiny model
    "smoke": dict(models=sorted(adapter.tiny_model for adapter in tp.models.adapters()), dtype="float32", repeats=2,
                  warmup=1, decode_steps=2, lengths={"dynamic": [64], "llava": [144]}, budgets=[0.5, 0.25],
                  peer_max_tokens=1 << 30),
}
# N per family: LLaVA-1.5 in whole fixed-size images; the families with dynamic resolution ("dynamic") any N
VIDEO_METHODS = {"prunevid"}  # methods measured on a video-shaped input


# ---------------------------------------------------------------------------------------------------------
# Which methods, at which budgets
# ---------------------------------------------------------------------------------------------------------
def method_configs(name: str, num_layers: int, budgets: list[float]) -> list[tuple[float | None, dict]]:
    """(budget, fields) of each configuration measured for a registered method.

    A budget r is the fraction of the visual tokens a method keeps at its first reduction: FastV / random /
    uniform keep r at layer 2; PDrop keeps r, r/2, r/4 at i * floor(L / 4); HiMAP keeps r then r/4; PruneVid
    merges to r clusters per group; layer skip runs visual rows through the first r of the layers only (both
    sublayers skipped in the rest); SparseVLM ends with r·N tokens after its (depth-scaled) stages. A method not
    listed here runs at ``budget=r`` (the retained-token fraction of the issue-18 methods: VisionZip, VisPruner,
    DivPrune, CDPruner, DART, pool, downsample: r·N tokens) or ``keep_ratio=r`` if it has that field, else once
    with its defaults.
    """
    if name == "baseline":
        return []
    quarter = stage_boundaries(num_layers)  # i * floor(L / 4): 8, 16, 24 on 32 layers
    configs = []
    for r in budgets:
        if name in ("fastv", "random", "uniform"):
            fields = {"keep_ratio": r}
        elif name == "pdrop":
            fields = {"layers": quarter, "ratios": [r, r / 2, r / 4]}
        elif name == "himap":
            fields = {"text_keep": r, "image_keep": r / 4, "image_layer": min(8, num_layers - 2)}
        elif name == "prunevid":
            fields = {"cluster_ratio": r, "stage2_layer": min(10, num_layers // 2)}
        elif name == "layerskip":
            skipped = list(range(max(1, round(num_layers * r)), num_layers))
            fields = {"mlp": skipped, "attn": skipped}
        elif name == "sparsevlm":  # the official stages 3, 7, 16 of 32 scaled to the depth; exactly r·N tokens after
            fields = {"budget": r, "layers": sorted({min(num_layers - 1, max(1, round(num_layers * k / 32)))
                                                     for k in (3, 7, 16)})}
        else:
            cls = tp.methods.method_class(name)
            known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
            field_name = next((f for f in ("budget", "keep_ratio") if f in known), None)
            if field_name is None:
                return [(None, {})]
            fields = {field_name: r}
        configs.append((r, fields))
    return configs


# ---------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------
def base_row(model: str, prompt, method_name: str, label: str, variant: str, budget, fields: dict) -> dict:
    return {"model": model, "input": prompt.kind if prompt is not None else None,
            "visual_tokens": prompt.visual if prompt is not None else None,
            "prompt_tokens": prompt.tokens if prompt is not None else None,
            "method": method_name, "label": label, "variant": variant, "budget": budget, "fields": fields,
            "status": "ok", "reason": None}


def measure_row(vlm, args, prompt, inputs, method, row: dict, around=None, decode: bool = True) -> dict:
    """Fill ``row`` with one method's prefill / decode / memory numbers (errors are recorded, not raised)."""
    started = time.perf_counter()
    try:
        before_call = (lambda: encode(vlm, prompt)) if needs_vision_signals(method) else None
        prefill = measure_prefill(vlm, inputs, method, args.repeats, args.warmup, around=around or nullcontext,
                                  before_call=before_call)
        row.update(prefill_ms=prefill.ms, prefill_ms_all=prefill.times_ms, overhead_ms=prefill.overhead_ms,
                   pre_llm_ms=prefill.pre_llm_ms,
                   peak_bytes=prefill.peak_bytes, extra_peak_bytes=prefill.extra_peak_bytes,
                   memory_kind=prefill.memory_kind, kv_cache_bytes=prefill.kv_cache_bytes,
                   synchronizations=prefill.synchronizations)
        schedule = Schedule.of(prefill.report, vlm.info().num_layers, prompt.tokens, prompt.visual)
        row.update(layer_tokens=schedule.layer_tokens, layer_visual=schedule.layer_visual,
                   mean_tokens=schedule.mean_tokens, mean_visual=schedule.mean_visual,
                   planned_layers=sorted(schedule.plans), _schedule=schedule,
                   kept=None if prefill.report is None else {str(k): v for k, v in prefill.report.kept.items()})
        shape = DecoderShape.from_config(vlm.adapter.text_config(vlm.model))
        row["flops"] = all_conventions(shape, schedule.layer_tokens, schedule.layer_visual)["tokenprune"]
        if decode:
            token = int(prompt.input_ids[0, -1])
            row["decode_ms"], row["decode_stock_ms"] = measure_decode(vlm, prefill.cache, method, token,
                                                                      args.decode_steps, args.warmup)
        del prefill
    except Exception as error:  # an out-of-memory or a method refusing the input: record it and go on
        row.update(status="error", reason=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    finally:
        release_memory()
    row["wall_s"] = time.perf_counter() - started
    return row


def needs_vision_signals(method) -> bool:
    """Whether the method's before_llm reads the vision encoder's signals (then the encoder must run each call)."""
    return any(getattr(part, "needs_vision_signals", False) for part in method.components())


def finish_group(rows: list[dict], timer: LayerTimer, vision_ms: float) -> None:
    """Ideal times, and ratios against the group's unpruned SDPA row (same model, N and input)."""
    for row in rows:
        schedule = row.pop("_schedule", None)
        row["vision_ms"] = row.pop("_vision_ms", vision_ms)  # a downsampled input has its own encoder time
        if row["status"] != "ok":
            continue
        prefill = row["prefill_ms"]
        row["ideal_ms"] = ideal = ideal_prefill_ms(schedule, timer)
        row["prefill_vs_ideal"] = prefill / ideal
        row["overhead_pct"] = 100.0 * row["overhead_ms"] / prefill
        if row.get("decode_ms") is not None and row.get("decode_stock_ms"):
            row["decode_vs_stock"] = row["decode_ms"] / row["decode_stock_ms"]
        row["ttft_ms"], row["ttft_ideal_ms"] = row["vision_ms"] + prefill, row["vision_ms"] + ideal
    ok = [r for r in rows if r["status"] == "ok"]
    base = next((r for r in ok if r["method"] == "baseline" and r["variant"] == "tokenprune"), None)
    for row in ok:
        if base is not None:
            row["speedup"] = base["prefill_ms"] / row["prefill_ms"]
            row["ideal_speedup"] = base["ideal_ms"] / row["ideal_ms"]
            row["ttft_speedup"] = base["ttft_ms"] / row["ttft_ms"]
            row["ttft_speedup_bound"] = base["ttft_ms"] / vision_ms if vision_ms else None  # prefill -> 0
            for key in ("peak_bytes", "extra_peak_bytes", "kv_cache_bytes"):
                if row.get(key) is not None and base.get(key):
                    row[key.replace("_bytes", "_vs_baseline")] = row[key] / base[key]
        if row["variant"] == "peer":
            twin = next((r for r in ok if r["variant"] == "tokenprune" and r["label"] == row["label"].split(" [")[0]),
                        None)
            row["kept_overlap"] = _kept_overlap(row.get("kept"), twin.get("kept") if twin else None)
    for row in rows:
        row.pop("kept", None)  # thousands of row indices: not worth the JSON


def _kept_overlap(peer: dict | None, ours: dict | None) -> float | None:
    """Fraction of tokenprune's surviving visual tokens (last selection) that the peer-style run also kept."""
    if not peer or not ours:
        return None
    last = max(ours, key=int)
    if last not in peer or not ours[last]:
        return None
    return len(set(peer[last]) & set(ours[last])) / len(ours[last])


def skipped_row(model: str, method_name: str, reason: str) -> dict:
    row = base_row(model, None, method_name, method_name, "tokenprune", None, {})
    row.update(status="skipped", reason=reason)
    return row


# ---------------------------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------------------------
def measure_group(vlm, args, prompt, names: list[str], timer: LayerTimer, log) -> list[dict]:
    """Every row of one prompt: the unpruned model, each method at each budget, and the peer-style rows."""
    num_layers = vlm.info().num_layers
    vision_ms, encoded = measure_vision(vlm, prompt, args.repeats, args.warmup)
    inputs = prompt.decoder_inputs(encoded)
    group = []

    def run(method, method_name, label, variant="tokenprune", budget=None, fields=None, around=None, decode=True):
        row = base_row(vlm.name, prompt, method_name, label, variant, budget, fields or {})
        row["intra_llm"] = method.uses_prune_layers or method.uses_layer_plan
        row["pre_llm"] = method.uses_before_llm
        if method.uses_before_processor:  # a smaller input (downsample): its own prompt and encoder time
            row["_vision_ms"], own_prompt, own_inputs = resized_input(vlm, args, prompt, method)
            group.append(measure_row(vlm, args, own_prompt, own_inputs, method, row, around, decode))
        else:
            group.append(measure_row(vlm, args, prompt, inputs, method, row, around, decode))
        result = f"{row['prefill_ms']:9.2f} ms" if row["status"] == "ok" else row["reason"]
        log(f"{vlm.name} N={prompt.visual} {prompt.kind:5s} {label:60s} {result}  ({row['wall_s']:.1f} s)")

    run(tp.methods.create("baseline"), "baseline", "baseline")
    for name in names:
        if name == "baseline" or (name in VIDEO_METHODS) != (prompt.kind == "video"):
            continue
        for budget, fields in method_configs(name, num_layers, args.budgets):
            try:
                method = tp.methods.create(name, **fields)
            except (TypeError, ValueError) as error:
                row = base_row(vlm.name, prompt, name, name, "tokenprune", budget, fields)
                group.append({**row, "status": "error", "reason": f"{type(error).__name__}: {error}"})
                continue
            run(method, name, method_label(method), budget=budget, fields=method.describe())

    if prompt.kind == "image" and prompt.tokens <= args.peer_max_tokens:
        run(tp.methods.create("baseline"), "baseline", "baseline [eager]", variant="peer", decode=False,
            around=lambda: eager_attention_maps(vlm, []))
        for name in [n for n in names if n in PEER_SCORING_LAYERS]:
            for budget, fields in method_configs(name, num_layers, args.budgets):
                inner = tp.methods.create(name, **fields)
                layers = None if args.peer_maps == "all" else PEER_SCORING_LAYERS[name](inner)
                maps = {}  # filled by eager_attention_maps during each forward, read by the peer selection
                run(EagerMapScoring(inner, maps), name, f"{method_label(inner)} [peer: eager maps]", variant="peer",
                    budget=budget, fields={**inner.describe(), "maps": args.peer_maps}, decode=False,
                    around=lambda layers=layers, maps=maps: eager_attention_maps(vlm, layers, maps))
    del encoded, inputs
    release_memory()
    finish_group(group, timer, vision_ms)
    return group


def resized_input(vlm, args, prompt, method):
    """(vision ms, prompt, decoder inputs) of the input a preprocessing method (downsample) gives: the prompt's grids
    scaled to its token fraction, encoded while the method is applied (LLaVA: CLIP's position table interpolated)."""
    fraction = budget_fraction(prompt.visual, method.budget)
    small = build_prompt(vlm, prompt.visual, prompt.kind, grids=resized_grids(vlm, prompt.grids, fraction))
    with apply(vlm.model, method):
        vision_ms, encoded = measure_vision(vlm, small, args.repeats, args.warmup)
    return vision_ms, small, small.decoder_inputs(encoded)


def run_model(name: str, args, log) -> list[dict]:
    """All rows of one model: every N, the image input (and the video input for video methods)."""
    vlm = load_random_model(name, args.device, args.dtype)
    context = getattr(vlm.adapter.text_config(vlm.model), "max_position_embeddings", None)
    names = [m for m in tp.methods.available() if args.methods is None or m in args.methods]
    rows = [skipped_row(name, m, f"{name} takes no video input ({m} is a video method)")
            for m in names if m in VIDEO_METHODS and not supports_video(vlm)]
    kinds = ["image"] + (["video"] if supports_video(vlm) and any(m in VIDEO_METHODS for m in names) else [])
    timer = LayerTimer(vlm, args.repeats, args.warmup)
    preset_lengths = PRESETS[args.preset]["lengths"]
    lengths = args.lengths or preset_lengths.get(vlm.adapter.family, preset_lengths["dynamic"])
    # Every row releases memory (gc.collect, then the CUDA cache); freezing what exists now (modules, the model)
    # keeps those collections from rescanning ~10^5 long-lived objects each time (0.5 s a collection here).
    gc.collect()
    gc.freeze()
    try:
        with torch.inference_mode():
            for visual in lengths:
                for kind in kinds:
                    prompt = build_prompt(vlm, visual, kind, frames=args.video_frames)
                    if context and prompt.tokens > context:
                        log(f"{name} N={prompt.visual} {kind}: {prompt.tokens} tokens exceed the context "
                            f"({context}); skipped")
                        continue
                    try:
                        rows += measure_group(vlm, args, prompt, names, timer, log)
                    except Exception as error:  # e.g. the vision encoder out of memory: record it, go on
                        reason = f"{type(error).__name__}: {error}"[:300]
                        row = base_row(name, prompt, "baseline", "(vision encoder)", "tokenprune", None, {})
                        rows.append({**row, "status": "error", "reason": reason})
                        log(f"{name} N={prompt.visual} {kind}: {reason}")
                        release_memory()
    finally:
        del vlm, timer
        gc.unfreeze()
        release_memory()
    return rows


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
def environment(args) -> dict:
    """Machine, versions, date and command: what docs/benchmarks.md must state beside a table."""
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device, "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda if args.device == "cuda" else None,
            "transformers": transformers.__version__, "tokenprune": tp.__version__, "commit": commit,
            "dtype": args.dtype, "attention": "sdpa", "batch": 1, "repeats": args.repeats, "warmup": args.warmup,
            "decode_steps": args.decode_steps, "budgets": args.budgets, "preset": args.preset,
            "peer_maps": args.peer_maps, "command": " ".join(["python", "benchmarks/speed.py", *args.argv])}


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 2 repeats (CI smoke test)")
    parser.add_argument("--model", nargs="+", dest="models", help="named models (weights=random); "
                        "default: qwen25vl_7b on cuda, tiny_qwen25vl tiny_llava on cpu")
    parser.add_argument("--lengths", type=int, nargs="+", help="visual tokens N (LLaVA rounds to whole images)")
    parser.add_argument("--budgets", type=float, nargs="+", help="keep fractions (see method_configs)")
    parser.add_argument("--methods", nargs="+", help="registered methods to run (default: all)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, help="timed prefills per row (median)")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing")
    parser.add_argument("--decode-steps", type=int, help="timed decode steps per variant (median)")
    parser.add_argument("--peer-max-tokens", type=int, help="no peer-style (eager) rows above this prompt length")
    parser.add_argument("--peer-maps", choices=["scoring", "all"], default="scoring",
                        help="eager maps kept: the scoring layers' (default) or every layer's "
                        "(generate(output_attentions=True), as HiMAP's official evaluation)")
    parser.add_argument("--video-frames", type=int, default=8, help="temporal steps of the video-shaped input")
    parser.add_argument("--out", default="outputs/speed", help="output directory (speed.json, speed.md, speed.png)")
    parser.add_argument("--target-tokens", type=int, default=4096, help="N at which the targets are checked")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default on CPU: 1; several threads on a "
                        "loaded machine spin on each other and time nothing but contention)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.smoke:
        args.device = "cpu"
    args.preset = "smoke" if args.smoke else args.device
    for key, value in PRESETS[args.preset].items():
        if key != "lengths" and getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.device == "cpu" else threads))

    def log(message):
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    results = {"meta": environment(args), "rows": []}
    try:
        for name in args.models:
            results["rows"] += run_model(name, args, log)
    finally:
        torch.set_num_threads(threads)
    results["meta"]["wall_s"] = time.perf_counter() - started
    paths = write_outputs(results, Path(args.out), plot_png=not args.no_plot, target_tokens=args.target_tokens)
    print(paths["markdown_text"])
    log(f"wrote {', '.join(str(p) for k, p in paths.items() if k != 'markdown_text')}")
    return results


# ---------------------------------------------------------------------------------------------------------
# Generated table (docs/benchmarks.md, CPU section): python benchmarks/tables.py speed_cpu
# ---------------------------------------------------------------------------------------------------------
MEASURED = ("prefill_ms", "prefill_ms_all", "overhead_ms", "peak_bytes", "extra_peak_bytes", "memory_kind", "decode_ms",
            "decode_stock_ms", "wall_s", "vision_ms", "ideal_ms", "prefill_vs_ideal", "overhead_pct", "decode_vs_stock",
            "ttft_ms", "ttft_ideal_ms", "speedup", "ideal_speedup", "ttft_speedup", "ttft_speedup_bound",
            "peak_vs_baseline", "extra_peak_vs_baseline", "pre_llm_ms")


@source("speed_cpu", volatile=MEASURED)
def speed_cpu(quick: bool) -> dict:
    """The speed benchmark on CPU (tiny architectures); quick: N = 144 with one repeat (token counts, KV cache)."""
    import tempfile

    argv = ["--device", "cpu", "--no-plot"] + (["--lengths", "144", "--repeats", "1", "--warmup", "0",
                                                 "--decode-steps", "1"] if quick else [])
    with tempfile.TemporaryDirectory() as out:
        results = main([*argv, "--out", out])
    results["meta"]["command"] = "python benchmarks/speed.py --device cpu"
    records = []
    for row in results["rows"]:
        where = f"{row['input']}/{row['visual_tokens']}" if row["status"] != "skipped" else "skipped"
        records.append({**row, "key": f"{row['model']}/{where}/{row['label']}"})
    return {"meta": results["meta"], "records": records}


@table("speed_cpu", source="speed_cpu")
def speed_cpu_table(data: dict) -> str:
    rows = [{k: v for k, v in r.items() if k != "key"} for r in data["records"]]
    peers = [r.get("kept_overlap") for r in rows if r.get("variant") == "peer" and r.get("kept_overlap") is not None]
    overlap = (f"\n\nPeer-style selections against tokenprune's: kept overlap {min(peers):.3f} (lowest) on all "
               f"{len(peers)} peer rows that select.") if peers else ""
    return render_markdown({"meta": data["meta"], "rows": rows}, level=2, title=False).rstrip("\n") + overlap


if __name__ == "__main__":
    main()
