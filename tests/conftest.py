"""Shared fixtures: tiny random models of both families (fp32, CPU), deterministic samples."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tokenprune as tp  # noqa: E402
from tokenprune.models.zoo import tiny  # noqa: E402

FAMILIES = ["tiny_llava", "tiny_qwen25vl"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are latency-bound: one intra-op thread is as fast alone and much faster on a busy machine
    (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_image(seed: int, size=(168, 168)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def make_sample(seed: int = 0, question: str = "what colour is the square at the top left ?", size=(168, 168)):
    return tp.Sample(id=str(seed), question=question, images=[make_image(seed, size)])


# Small test architectures (36 visual tokens per image): far faster than the trained tiny models' shapes.
TEST_ARCHITECTURES = {
    "tiny_llava": (tiny.tiny_llava_config, tiny.tiny_llava_processor),
    "tiny_qwen25vl": (tiny.tiny_qwen25vl_config, tiny.tiny_qwen25vl_processor),
}


@lru_cache(maxsize=None)
def _load(name: str, attn: str, layers: int):
    config_builder, processor_builder = TEST_ARCHITECTURES[name]
    adapter = tp.models.adapter_named(tp.models.model_spec(name).family)
    model = adapter.build_random(config_builder(layers=layers), torch.float32, attn, seed=0).eval()
    vlm = tp.models.VLM(name=name, model=model, processor=processor_builder(), adapter=adapter)
    with torch.no_grad():  # transformers installs its output-capturing hooks on the first call
        vlm.model(**vlm.prepare(make_sample(0)))
    return vlm


def tiny_vlm(name: str, attn: str = "sdpa", layers: int = 6):
    """A cached tiny random VLM (fp32). Tests must not modify it (apply() always restores it)."""
    return _load(name, attn, layers)


SHARPEN = 16.0


@lru_cache(maxsize=None)
def sharp_tiny_vlm(name: str, attn: str = "sdpa", layers: int = 6):
    """``tiny_vlm``'s architecture and seed with every decoder layer's q/k projections scaled by 4 (scores x16).

    Random initialisation gives near-uniform attention, whose rankings mostly reflect how many rows can see a
    column (causality): "keep the earliest tokens" would pass a brute-force comparison. Sharper attention makes
    the rankings depend on content, so the comparison tells implementations apart.
    """
    config_builder, processor_builder = TEST_ARCHITECTURES[name]
    adapter = tp.models.adapter_named(tp.models.model_spec(name).family)
    model = adapter.build_random(config_builder(layers=layers), torch.float32, attn, seed=0).eval()
    with torch.no_grad():
        for layer in adapter.text_model(model).layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(SHARPEN ** 0.5)
                if projection.bias is not None:
                    projection.bias.mul_(SHARPEN ** 0.5)
    vlm = tp.models.VLM(name=name, model=model, processor=processor_builder(), adapter=adapter)
    with torch.no_grad():
        vlm.model(**vlm.prepare(make_sample(0)))
    return vlm


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def stock_logits(vlm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return vlm.model(**inputs).logits


def hook_snapshot(module) -> dict:
    """Every forward hook and instance-level forward of every submodule (transformers installs a few of its own
    output-capturing hooks on first use; tokenprune must leave exactly what it found)."""
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks), "forward" in m.__dict__)
            for name, m in module.named_modules()}
