"""Shared fixtures: tiny random models of every registered family (fp32, CPU), deterministic samples."""

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

# One tiny test architecture per registered model family (``ModelAdapter.tiny_config`` / ``tiny_processor``),
# named by the family's tiny model: family-parametrised tests take their list from the registry.
TEST_ARCHITECTURES = {adapter.tiny_model: adapter for adapter in tp.models.adapters()}
FAMILIES = sorted(TEST_ARCHITECTURES)


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


@lru_cache(maxsize=None)
def _load(name: str, attn: str, layers: int):
    """The family's small test architecture (36 visual tokens per image): far faster than the trained tiny models'."""
    adapter = TEST_ARCHITECTURES[name]
    model = adapter.build_random(adapter.tiny_config(layers=layers), torch.float32, attn, seed=0).eval()
    vlm = tp.models.VLM(name=name, model=model, processor=adapter.tiny_processor(), adapter=adapter)
    with torch.no_grad():  # transformers installs its output-capturing hooks on the first call
        vlm.model(**vlm.prepare(make_sample(0)))
    return vlm


def tiny_vlm(name: str, attn: str = "sdpa", layers: int = 6):
    """A cached tiny random VLM (fp32). Tests must not modify it (apply() always restores it)."""
    return _load(name, attn, layers)


SHARPEN = 16.0


def sharpen_queries_and_keys(attention, factor: float = SHARPEN ** 0.5) -> None:
    """Scale one attention layer's queries and keys by ``factor`` (so its scores by ``factor`` squared)."""
    if hasattr(attention, "q_norm"):  # a norm after the projection would undo a scaled projection
        modules = (attention.q_norm, attention.k_norm)
    else:
        modules = (attention.q_proj, attention.k_proj)
    for module in modules:
        module.weight.mul_(factor)
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(factor)


@lru_cache(maxsize=None)
def sharp_tiny_vlm(name: str, attn: str = "sdpa", layers: int = 6):
    """``tiny_vlm``'s architecture and seed with every decoder layer's queries and keys scaled by 4 (scores x16): the
    q/k projections, or the per-head q/k norms where the layer normalises them after projecting (Qwen3).

    Random initialisation gives near-uniform attention, whose rankings mostly reflect how many rows can see a
    column (causality): "keep the earliest tokens" would pass a brute-force comparison. Sharper attention makes
    the rankings depend on content, so the comparison tells implementations apart.
    """
    adapter = TEST_ARCHITECTURES[name]
    model = adapter.build_random(adapter.tiny_config(layers=layers), torch.float32, attn, seed=0).eval()
    with torch.no_grad():
        for layer in adapter.text_model(model).layers:
            sharpen_queries_and_keys(layer.self_attn)
    vlm = tp.models.VLM(name=name, model=model, processor=adapter.tiny_processor(), adapter=adapter)
    with torch.no_grad():
        vlm.model(**vlm.prepare(make_sample(0)))
    return vlm


def takes_video(name: str) -> bool:
    """Whether a test architecture's family takes video input."""
    return TEST_ARCHITECTURES[name].video


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


@pytest.fixture(autouse=True)
def named_models_restored():
    """A run with a user's model YAML registers that model by name (run/checks.py); each test starts and ends with
    the packaged registry, so a test's user model never reaches registry-wide tests that run after it."""
    from tokenprune.models import base

    before = dict(base._SPECS)
    yield
    base._SPECS.clear()
    base._SPECS.update(before)
