"""Issue 17, "the out-of-memory pattern cannot come back": every registered method's decoder prefill, on both
families at N = 1024 visual tokens, allocates at its peak at most 1.1 x the bytes the unpruned SDPA prefill of the
same input allocates — measured on CPU by ``TensorMemory`` (live bytes of every tensor created in the call), the
figure ``benchmarks/speed.py`` reports in its CPU table. A method that materialises an L x L attention map fails.

Tiny hidden sizes and 6 layers keep it cheap; the 1024 visual tokens come from a larger image grid (LLaVA: a
448 px CLIP input, 32 x 32 patches; Qwen2.5-VL: 64 x 64 patches merged 2 x 2) built in code.
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
from tokenprune.models.zoo.tiny import tiny_llava_config, tiny_qwen25vl_config
from tokenprune.run.measure import TensorMemory

ROOT = Path(__file__).resolve().parents[1]
LAYERS, VISUAL, BUDGET, LIMIT = 6, 1024, 0.5, 1.1
ARCHITECTURES = {"tiny_llava": lambda: tiny_llava_config(image_size=14 * 32, layers=LAYERS),
                 "tiny_qwen25vl": lambda: tiny_qwen25vl_config(layers=LAYERS)}

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
def prefill_case(family: str, kind: str):
    """(vlm, decoder inputs with the vision output passed in, the unpruned SDPA prefill's peak bytes)."""
    from _speed_inputs import build_prompt, encode

    adapter = tp.models.adapter_named(tp.models.model_spec(family).family)
    model = adapter.build_random(ARCHITECTURES[family](), torch.float32, "sdpa", seed=0).eval()
    vlm = tp.models.VLM(name=family, model=model, processor=None, adapter=adapter)
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
    speed = _speed()
    for name in tp.methods.available():
        if name == "baseline":
            continue
        for family in ARCHITECTURES:
            video = name in speed.VIDEO_METHODS
            if video and family == "tiny_llava":
                continue  # a video method; LLaVA-1.5 takes images only
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
    vlm, inputs, unpruned = prefill_case("tiny_llava", "image")
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
