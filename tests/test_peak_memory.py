"""Issue 17, "the out-of-memory pattern cannot come back": every registered method's decoder prefill, on every
registered model family at N >= 1024 visual tokens, allocates at its peak at most 1.1 x the bytes the unpruned SDPA
prefill of the same input allocates — measured on CPU by ``TensorMemory`` (live bytes of every tensor created in
the call), the figure ``benchmarks/speed.py`` reports in its CPU table. A method that materialises an L x L
attention map fails.

Each family's tiny test architecture (tiny hidden sizes, 6 layers) keeps it cheap; the visual tokens come from
``benchmarks/speed.py``'s synthetic prompts (LLaVA: 29 images of 36 tokens; Qwen-VL: one 26 x 40 grid), encoded once.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import tokenprune as tp
from tokenprune.methods.fastv import FastV
from tokenprune.run.measure import TensorMemory

ROOT = Path(__file__).resolve().parents[1]
LAYERS, VISUAL, BUDGET, LIMIT = 6, 1040, 0.5, 1.1
FAMILIES = [adapter.family for adapter in tp.models.adapters()]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _speed():
    """benchmarks/speed.py (its method budgets, inputs and prefill measurement are what this test checks)."""
    if "speed_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("speed_benchmark", ROOT / "benchmarks" / "speed.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for the _speed_*.py helpers
        sys.modules["speed_benchmark"] = module
    return sys.modules["speed_benchmark"]


@lru_cache(maxsize=None)
def tiny_model(family: str):
    adapter = tp.models.adapter_named(family)
    model = adapter.build_random(adapter.tiny_config(layers=LAYERS), torch.float32, "sdpa", seed=0).eval()
    return tp.models.VLM(name=family, model=model, processor=None, adapter=adapter)


@lru_cache(maxsize=None)
def prefill_case(family: str, kind: str):
    """(vlm, decoder inputs with the vision output passed in, the unpruned SDPA prefill's peak bytes)."""
    from _speed_inputs import build_prompt, encode

    vlm = tiny_model(family)
    with torch.inference_mode():
        prompt = build_prompt(vlm, VISUAL, kind)
        inputs = prompt.decoder_inputs(encode(vlm, prompt))
    assert prompt.visual >= 1024
    return vlm, inputs, peak_bytes(vlm, inputs, tp.methods.create("baseline"))


def peak_bytes(vlm, inputs, method) -> int:
    from _speed_measure import measure_prefill

    gc.collect()
    gc.freeze()  # the collections measure_prefill runs stay cheap
    try:
        with torch.inference_mode():
            prefill = measure_prefill(vlm, inputs, method, repeats=0, warmup=0, count_syncs=False)
    finally:
        gc.unfreeze()
    assert prefill.memory_kind == "tensor_bytes"
    return prefill.peak_bytes


def cases():
    speed = _speed()  # puts benchmarks/ on sys.path
    from _speed_inputs import supports_video

    for name in tp.methods.available():
        if name == "baseline":
            continue
        for family in FAMILIES:
            video = name in speed.VIDEO_METHODS
            if video and not supports_video(tiny_model(family)):
                continue  # a video method on a family that takes images only (LLaVA-1.5)
            yield pytest.param(family, "video" if video else "image", name, id=f"{family}-{name}")


@pytest.mark.parametrize("family,kind,name", list(cases()))
def test_method_peak_memory_stays_within_the_unpruned_sdpa_run(family, kind, name):
    vlm, inputs, unpruned = prefill_case(family, kind)
    (budget, fields), *_ = _speed().method_configs(name, LAYERS, [BUDGET])
    peak = peak_bytes(vlm, inputs, tp.methods.create(name, **fields))
    assert peak <= LIMIT * unpruned, f"{name} {fields}: peak {peak / 2**20:.2f} MiB vs unpruned {unpruned / 2**20:.2f} MiB"


@dataclass
class FastVWithAttentionMap(FastV):
    """FastV that also materialises the full attention map of the layer below (H x L x L), as eager attention and
    the official HiMAP code do."""

    def select(self, step):
        length = step.hidden.shape[1]
        heads = step.hidden.shape[-1] // 16
        scores = step.hidden.new_empty(heads, length, length).uniform_()  # [H, L, L]
        del scores
        return super().select(step)


def test_an_attention_map_per_call_is_caught():
    vlm, inputs, unpruned = prefill_case("llava", "image")
    assert peak_bytes(vlm, inputs, FastV(keep_ratio=BUDGET)) <= LIMIT * unpruned
    assert peak_bytes(vlm, inputs, FastVWithAttentionMap(keep_ratio=BUDGET)) > 2 * unpruned


def test_tensor_memory_counts_live_bytes_of_the_call():
    weight = torch.randn(64, 64)  # created before: not counted, nor are its views
    with TensorMemory() as memory:
        big = torch.empty(1000, 1000)  # 4 MB
        view = big.t()
        product = weight.t() @ weight  # 16 KiB
        del big, view
        small = torch.zeros(10)
    assert memory.peak == 4_000_000 + 64 * 64 * 4
    assert memory.live == 64 * 64 * 4 + 40
    del product, small
