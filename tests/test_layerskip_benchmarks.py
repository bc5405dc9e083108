"""CPU smoke tests of the layer-skip benchmark scripts (tables only; no timing is asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_prefill_benchmark_table(capsys):
    rows = script("layerskip_prefill").main(["--smoke", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "| skipped MLPs | layers | prefill GFLOPs |" in out
    assert [len(r["policy"].mlp) for r in rows] == [0, 1, 2, 3, 4]
    flops = [r["flops"] for r in rows]
    assert all(b < a for a, b in zip(flops, flops[1:]))  # analytic FLOPs fall with every skipped MLP
    assert all(len(r["ms"]) == 1 and r["median_ms"] > 0 for r in rows)


def test_prefill_benchmark_with_attention_skips_and_llava(capsys):
    rows = script("layerskip_prefill").main(["--smoke", "--device", "cpu", "--attn", "--max-skips", "2"])
    assert rows[2]["policy"].attn == (3, 2) and rows[2]["flops"] < rows[1]["flops"] < rows[0]["flops"]
    rows = script("layerskip_prefill").main(["--smoke", "--device", "cpu", "--model", "tiny_llava", "--max-skips", "1"])
    assert rows[0]["visual"] == 144 and rows[1]["flops"] < rows[0]["flops"]  # the tiny trained LLaVA shape
    assert "(+2 attn)" in capsys.readouterr().out


def test_search_benchmark_table(capsys):
    rows = script("layerskip_search").main(["--smoke", "--models", "tiny_qwen25vl"])
    out = capsys.readouterr().out
    assert "| model | weights | samples | budget |" in out and "tiny_qwen25vl" in out
    assert rows[0]["cost"] >= 1 and rows[0]["forwards"] > 0 and rows[0]["total_s"] > 0


@pytest.mark.parametrize("name", ["tiny_llava"])
def test_policies_benchmark_table(capsys, name):
    reports = script("layerskip_policies").main(["--smoke", "--models", name])
    out = capsys.readouterr().out
    assert "| policy | MLP skips | attention skips | cost | calibration KL | held-out KL | held-out accuracy % |" in out
    rows = reports[0]["rows"]
    assert [r["label"] for r in rows] == ["none (full model)", "searched", "random 1", "random 2",
                                          "every visual sublayer skipped (s = 1)"]
    assert rows[0]["calibration_kl"] == 0.0 and rows[0]["heldout_kl"] == 0.0
    assert all(r["cost"] == rows[1]["cost"] for r in rows[1:4])
    assert rows[4]["policy"].mlp == rows[4]["policy"].attn == tuple(range(6)) and rows[4]["calibration_kl"] > 0
    assert all(0.0 <= r["accuracy"] <= 100.0 for r in rows)
