"""benchmarks/speed.py: the CPU smoke run (structure only — no timing assertions), the ideal, the peer-style
scores, the method budgets and the real 7B shapes (built on the meta device)."""

from __future__ import annotations

import importlib.util
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

import tokenprune as tp
from tokenprune.methods.base import LayerPlan, Method, ModelInfo

ROOT = Path(__file__).resolve().parents[1]


def _load_speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for the _speed_*.py helpers
    return module


speed = _load_speed()
from _speed_inputs import build_prompt, encode, load_random_model  # noqa: E402
from _speed_measure import EagerMapScoring, Schedule, eager_attention_maps, ideal_prefill_ms  # noqa: E402
from _speed_report import check  # noqa: E402


SMOKE_MODELS = ("tiny_llava", "tiny_qwen3vl")  # a fixed-grid family and the one with DeepStack and per-step videos


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    with redirect_stdout(io.StringIO()) as printed, redirect_stderr(io.StringIO()):
        results = speed.main(["--smoke", "--model", *SMOKE_MODELS, "--out", str(out)])
    return results, out, printed.getvalue()


def test_the_smoke_preset_covers_every_registered_family():
    assert speed.PRESETS["smoke"]["models"] == sorted(adapter.tiny_model for adapter in tp.models.adapters())


def test_smoke_run_writes_json_markdown_and_plot(smoke):
    results, out, printed = smoke
    assert json.loads((out / "speed.json").read_text())["rows"] == json.loads(json.dumps(results["rows"], default=str))
    markdown = (out / "speed.md").read_text()
    assert printed == markdown + "\n"  # the same tables are printed
    for heading in ("## tiny_qwen3vl", "## tiny_llava", "### Vision encoder and time to first token",
                    "### Decoder prefill, decode and memory", "### Targets", "| N | input | method |"):
        assert heading in markdown
    assert (out / "speed.png").stat().st_size > 10_000
    meta = results["meta"]
    for key in ("date", "device", "torch", "transformers", "dtype", "repeats", "command"):
        assert meta[key]


def test_every_registered_method_has_rows_or_a_skip_reason(smoke):
    results, _, _ = smoke
    rows = results["rows"]
    for model in SMOKE_MODELS:
        own = [r for r in rows if r["model"] == model]
        for name in tp.methods.available():
            mine = [r for r in own if r["method"] == name and r["variant"] == "tokenprune"]
            assert mine, f"{model}: no row for {name}"
            if name == "prunevid" and model == "tiny_llava":
                assert [r["status"] for r in mine] == ["skipped"] and "video" in mine[0]["reason"]
                continue
            assert all(r["status"] == "ok" for r in mine), [(r["label"], r["reason"]) for r in mine]
            expected = 1 if name == "baseline" else len(speed.PRESETS["smoke"]["budgets"])
            per_input = {r["input"] for r in mine}
            assert len(mine) == expected * len(per_input), (model, name, len(mine))


def test_measured_rows_carry_every_number(smoke):
    results, _, _ = smoke
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    assert ok
    for row in ok:
        for key in ("prefill_ms", "ideal_ms", "prefill_vs_ideal", "overhead_ms", "overhead_pct", "peak_bytes",
                    "kv_cache_bytes", "vision_ms", "ttft_ms", "speedup", "ideal_speedup", "mean_tokens", "flops"):
            assert row.get(key) is not None, (row["label"], key)
        assert len(row["prefill_ms_all"]) == speed.PRESETS["smoke"]["repeats"]
        assert row["ideal_ms"] > 0 and row["prefill_ms"] > 0 and row["kv_cache_bytes"] > 0
        assert len(row["layer_tokens"]) == 6  # the tiny architectures' decoder layers
        if row["variant"] == "tokenprune":
            assert row["decode_ms"] > 0 and row["decode_stock_ms"] > 0 and row["decode_vs_stock"] > 0
        if row["method"] == "baseline":
            assert row["layer_tokens"] == [row["prompt_tokens"]] * 6
            assert row["overhead_ms"] == 0.0
    pruned = [r for r in ok if r["method"] in ("fastv", "pdrop", "himap") and r["variant"] == "tokenprune"]
    assert all(r["mean_tokens"] < r["prompt_tokens"] and r["kv_cache_vs_baseline"] < 1 for r in pruned)


def test_peer_rows_select_the_same_tokens_from_eager_maps(smoke):
    results, _, _ = smoke
    peers = [r for r in results["rows"] if r["variant"] == "peer"]
    for model in SMOKE_MODELS:
        labels = {r["label"] for r in peers if r["model"] == model and r["status"] == "ok"}
        assert "baseline [eager]" in labels
        assert sum("[peer: eager maps]" in label for label in labels) == 2 * len(speed.PRESETS["smoke"]["budgets"])
    for row in peers:
        if row["method"] != "baseline":
            assert row["kept_overlap"] == 1.0, row["label"]  # fp32: eager maps and lazy scores agree


class _Recorder(Method):
    """At ``layer``, record tokenprune's lazy scores and the peer-style scores from the kept eager maps."""

    def __init__(self, maps, layer, queries, reduce):
        self.maps, self.layer, self.queries, self.reduce, self.seen = maps, layer, queries, reduce, []

    def prune_layers(self, layout):
        return [self.layer]

    def select(self, step):
        lazy = step.attention(layer=self.layer - 1, queries=self.queries, keys="visual", reduce=self.reduce)
        peer = EagerMapScoring(self, self.maps)._scores(self.layer - 1, step.rows(self.queries), step.columns("visual"),
                                                         True, True, "mean", self.reduce)
        self.seen.append((lazy, peer))
        return step.keep_visual(step.layout.visual_rows())


@pytest.mark.parametrize("name", ["tiny_qwen25vl", "tiny_llava"])
@pytest.mark.parametrize("queries,reduce", [("last", None), ("text", "sum"), ("visual", "sum")])
def test_peer_scores_equal_lazy_scores(name, queries, reduce):
    vlm = load_random_model(name, "cpu", "float32")
    prompt = build_prompt(vlm, 64 if name == "tiny_qwen25vl" else 144)
    maps = {}
    recorder = _Recorder(maps, 2, queries, reduce)
    with torch.inference_mode():
        inputs = prompt.decoder_inputs(encode(vlm, prompt))
        with eager_attention_maps(vlm, [1], maps), tp.apply(vlm.model, recorder):
            vlm.adapter.outer_model(vlm.model)(**inputs, use_cache=True)
        assert not maps  # released at the end of the forward
    assert vlm.adapter.text_model(vlm.model).config._attn_implementation == "sdpa"
    (lazy, peer), = recorder.seen
    assert lazy.shape == peer.shape
    torch.testing.assert_close(peer, lazy, rtol=1e-4, atol=1e-6)


class _Timer:
    """A LayerTimer stand-in with analytic times."""

    def layer_ms(self, n):
        return float(n)

    def attention_ms(self, n):
        return 0.25 * n

    def mlp_ms(self, n):
        return 0.75 * n

    def kv_ms(self, n):
        return 0.1 * n


def test_ideal_sums_layer_times_and_counts_planned_sublayers():
    timer = _Timer()
    assert ideal_prefill_ms(Schedule([100, 100, 40, 40], [80, 80, 20, 20]), timer) == 280.0
    plans = {2: LayerPlan(skip_mlp=True), 3: LayerPlan(skip_attn=True, skip_mlp=True)}
    schedule = Schedule([100] * 4, [80] * 4, plans)
    # layers 0, 1: 100 each; layer 2: attention(100) + mlp(20 text rows); layer 3: kv(100) + attention(20) + mlp(20)
    assert ideal_prefill_ms(schedule, timer) == pytest.approx(200 + (25 + 15) + (10 + 5 + 15))
    assert Schedule.of(None, 3, 50, 30).layer_tokens == [50, 50, 50]


def test_target_checks():
    met = check({"prefill_vs_ideal": 1.02, "overhead_pct": 1.0, "peak_vs_baseline": 1.0, "decode_vs_stock": 0.98})
    assert all(ok for ok, _ in met.values())
    missed = check({"prefill_vs_ideal": 1.2, "overhead_pct": 4.0, "peak_vs_baseline": 1.3, "decode_vs_stock": 1.05})
    assert not any(ok for ok, _ in missed.values())
    assert check({})["overhead ≤ 3 %"] == (None, "—")


@pytest.mark.parametrize("layers,rope", [(28, "mrope"), (32, "1d"), (6, "mrope")])
def test_every_budget_is_a_valid_method_for_the_model(layers, rope):
    info = ModelInfo(num_layers=layers, rope=rope)
    for name in tp.methods.available():
        for budget, fields in speed.method_configs(name, layers, [0.5, 0.25, 0.125]):
            method = tp.methods.create(name, **fields)
            method.validate(info)


def test_real_7b_architectures_and_prompts_on_the_meta_device():
    """The GPU run's shapes without any memory: Qwen2.5-VL-7B and LLaVA-1.5-7B, N visual tokens each."""
    qwen = load_random_model("qwen25vl_7b", "meta", "bfloat16")
    assert qwen.info().num_layers == 28
    prompt = build_prompt(qwen, 1196)
    assert prompt.grids == [(1, 26, 46)] and prompt.visual == 1196
    assert prompt.pixel_inputs["pixel_values"].shape == (1196 * 4, 3 * 2 * 14 * 14)
    video = build_prompt(qwen, 4096, "video", frames=8)
    assert video.grids == [(8, 16, 32)] and video.visual == 4096 and video.tokens == 4096 + 2 + 14 + 20
    llava = load_random_model("llava15_7b", "meta", "bfloat16")
    assert llava.info().num_layers == 32
    prompt = build_prompt(llava, 4096)
    assert prompt.visual == 4032 and prompt.pixel_inputs["pixel_values"].shape == (7, 3, 336, 336)
    assert prompt.tokens <= llava.model.config.text_config.max_position_embeddings


def test_a_qwen3vl_video_prompt_has_one_run_per_temporal_step():
    """Qwen3-VL-8B on the meta device: each temporal step is its own run, a timestamp and the vision wrapper
    around it, so the stock rope index (which splits videos per step) lines up."""
    from _speed_inputs import TIMESTAMP_TOKENS

    qwen3 = load_random_model("qwen3vl_8b", "meta", "bfloat16")
    video = build_prompt(qwen3, 4096, "video", frames=8)
    assert video.grids == [(8, 16, 32)] and video.visual == 4096
    assert video.tokens == 4096 + 8 * (TIMESTAMP_TOKENS + 2) + 14 + 20  # 8 x (timestamp, start, end) + text
