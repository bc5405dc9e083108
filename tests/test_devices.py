"""Issue 19, models larger than one device: a model spread over devices by accelerate (``model.device_map``, or
``model.device=auto`` when a model does not fit one GPU) runs every method exactly as on one device; the placement
is planned on the meta device; ``weights=random`` is built on the meta device and materialised where it is placed.

On a machine without GPUs the two "devices" of the split are both the CPU: accelerate's device hooks wrap every
block as they do on GPUs (the engine's layer wrappers go inside them, the rows pass through them), but the tensors
do not change device. The same test with two GPUs (marked gpu) moves them."""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

import tokenprune as tp
from conftest import hook_snapshot, make_sample, tiny_vlm
from tokenprune.engine.devices import module_device
from tokenprune.engine.family import family_for
from tokenprune.models import model_spec
from tokenprune.models.checks import (ModelCheckError, auto_device_map, build_random_placed, estimate_weight_bytes,
                                      plan_placement)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = 32  # deep enough for every method's published default layers
# Every registered method with its defaults, plus the settings that reach what the defaults do not: sublayer skips on
# both devices (layer plans run inside accelerate's wrapped forward), a selection at the first layer of the second
# device scored from the last layer of the first.
CASES = {**{name: (name, {}) for name in tp.methods.available()},
         "layerskip(mlp=[4,20],attn=[20])": ("layerskip", {"mlp": [4, 20], "attn": [20]}),
         "fastv(layer=16)": ("fastv", {"layer": 16})}
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def split_map(model, first: str, second: str) -> dict:
    """``{module: device}``: everything on ``first`` except the upper half of the decoder layers (and what follows
    them: the final norm and the LM head), which go to ``second``."""
    family = family_for(model)
    names = {id(module): name for name, module in model.named_modules()}
    layers = family.layers(model)
    placement = {"": first}
    for index, layer in enumerate(layers):
        placement[names[id(layer)]] = first if index < len(layers) // 2 else second
    placement[names[id(family.text_model(model).norm)]] = second
    placement["lm_head"] = second
    return placement


@lru_cache(maxsize=None)
def spread_copy(family: str, first: str, second: str):
    """A copy of the family's tiny test model, dispatched by accelerate over two devices."""
    from accelerate import dispatch_model

    vlm = tiny_vlm(family, layers=LAYERS)
    model = copy.deepcopy(vlm.model)
    return dispatch_model(model, device_map=split_map(model, first, second), force_hooks=True)


def generate_logits(model, inputs, method) -> list[torch.Tensor]:
    with torch.no_grad(), tp.apply(model, method):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return [step.cpu() for step in out.logits]


@pytest.mark.parametrize("devices", [("cpu", "cpu"), pytest.param(("cuda:0", "cuda:1"), marks=[pytest.mark.gpu,
                                                                                               TWO_GPUS])])
@pytest.mark.parametrize("case", CASES)
def test_a_model_split_over_two_devices_gives_the_single_device_logits(family, case, devices):
    vlm = tiny_vlm(family, layers=LAYERS)
    spread = spread_copy(family, *devices)
    layers = vlm.adapter.layers(spread)
    assert [module_device(layer) for layer in (layers[0], layers[-1])] == [torch.device(d) for d in devices]
    assert all(getattr(layer, "_hf_hook", None) is not None for layer in layers)  # accelerate's hooks are in place
    inputs = vlm.prepare(make_sample(21))
    name, fields = CASES[case]
    method = tp.methods.create(name, **fields)
    single = generate_logits(vlm.model.to(devices[0]), inputs.to(devices[0]), method)
    before = hook_snapshot(spread)
    split = generate_logits(spread, inputs.to(devices[0]), method)
    assert hook_snapshot(spread) == before  # accelerate's wrappers are back as they were
    assert len(split) == len(single) == 3
    for step, (a, b) in enumerate(zip(single, split)):
        assert torch.equal(a, b), f"{case}: logits of step {step} differ by {(a - b).abs().max()}"
    vlm.model.to("cpu")


def test_placement_is_planned_on_the_meta_device_whole_layers_per_gpu():
    adapter = tp.models.adapter_named("llava")
    config = adapter.tiny_config(layers=8)
    need = estimate_weight_bytes("llava", config, torch.float32)
    budget = {0: int(0.7 * need), 1: int(0.7 * need)}  # neither GPU holds the model alone
    for how in ("auto", "sequential"):
        placement = plan_placement("tiny", "llava", config, torch.float32, how, budget=budget)
        layers = [placement[f"model.language_model.layers.{i}"] for i in range(8)]
        assert set(placement.values()) == {0, 1} and layers == sorted(layers)  # both GPUs, layers in order, no CPU
    assert auto_device_map("llava", config, torch.float32, budget=budget) == "auto"
    assert auto_device_map("llava", config, torch.float32, budget={0: 2 * need, 1: 2 * need}) is None  # fits one
    assert auto_device_map("llava", config, torch.float32, budget={0: need // 2}) is None  # one GPU: nothing to spread
    with pytest.raises(ModelCheckError, match=r"needs about 1\.\d MiB for its weights, and the 2 visible GPU\(s\)"):
        plan_placement("tiny", "llava", config, torch.float32, "auto", budget={0: need // 3, 1: need // 3})


def test_random_weights_are_built_on_meta_and_every_tensor_initialised_where_it_is_placed(family):
    adapter = tp.models.adapter_named(model_spec(family).family)
    config = adapter.tiny_config(layers=4)
    model = adapter.build_random(copy.deepcopy(config), torch.float32, "sdpa", seed=0)
    placement = split_map(model, "cpu", "cpu")

    def build(seed):
        return build_random_placed(family, model_spec(family).family, copy.deepcopy(config), torch.float32, "sdpa",
                                   seed, placement)

    first, again, other = build(3), build(3), build(4)
    state = first.state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(not t.is_meta and (not t.is_floating_point() or t.isfinite().all()) for t in state.values())
    assert all(torch.equal(state[k], again.state_dict()[k]) for k in state)  # seeded
    assert not all(torch.equal(state[k], other.state_dict()[k]) for k in state)
    assert all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in first.named_buffers())  # rotary tables...


def test_device_map_is_checked_before_any_model_work(tmp_path):
    from test_runner import config

    from tokenprune.run.runner import ConfigError, build_plan

    cases = {"model.device_map=everywhere": r"model.device_map=.everywhere. is not allowed; choose from \[.auto., .balanced.",
             "model.device_map=auto model.device=cpu": "give one of them",
             "+model.device_map.lm_head=gpu7": r"model.device_map\['lm_head'\]='gpu7' is not a device"}
    if not torch.cuda.is_available():
        cases["model.device_map=auto"] = "CUDA is not available"
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_plan(config(tmp_path, "method=fastv", *overrides.split()))


def test_device_auto_on_several_gpus_too_small_is_refused_before_any_model_work(tmp_path, monkeypatch):
    """model.device=auto plans a model that does not fit one of several GPUs over all of them, at the check."""
    from test_runner import config

    from tokenprune.models import checks
    from tokenprune.run.runner import ConfigError, build_plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(checks, "gpu_budget", lambda: {0: 2**20, 1: 2**20})  # two GPUs of 1 MiB each
    with pytest.raises(ConfigError, match=r"model.device=auto \(over all visible GPUs\): tiny_llava in float32 needs about \d+\.\d MiB for "
                                          r"its weights, and the 2 visible GPU\(s\) can give 2\.0 MiB"):
        build_plan(config(tmp_path, "method=fastv"))
    assert not (tmp_path / "run.json").exists()
