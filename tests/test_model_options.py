"""Image resolution bounds (``model.image.min_pixels`` / ``max_pixels``) on the Qwen-VL families: the numbers of
visual tokens by hand (``smart_resize``: round to multiples of patch x merge, then scale into [min, max] pixels),
the processor's own bounds when unset, and bad values refused before any model work."""

import math

import pytest
import torch
from hydra import compose, initialize_config_module

import tokenprune as tp
from conftest import TEST_ARCHITECTURES, make_sample
from tokenprune.run.runner import ConfigError, build_plan


def tokens_by_hand(side: int, factor: int, min_pixels: int, max_pixels: int) -> int:
    """LLM tokens of a ``side`` x ``side`` image: Qwen2-VL's smart_resize, then (side / factor)^2 merged tokens."""
    s = round(side / factor) * factor
    if s * s > max_pixels:
        s = math.floor(side / math.sqrt(side * side / max_pixels) / factor) * factor
    elif s * s < min_pixels:
        s = math.ceil(side * math.sqrt(min_pixels / (side * side)) / factor) * factor
    return (s // factor) ** 2


@pytest.fixture(scope="module")
def trained_qwen25vl():
    return tp.load_model("tiny_qwen25vl", device="cpu")


def visual_tokens(vlm, image_options: dict, side: int = 168) -> int:
    options, vlm.options = vlm.options, vlm.adapter.check_options({"image": image_options})
    try:
        return vlm.prepare(make_sample(0, size=(side, side))).layout.num_visual
    finally:
        vlm.options = options


def test_max_pixels_changes_the_visual_tokens_of_tiny_qwen25vl_as_computed_by_hand(trained_qwen25vl):
    vlm = trained_qwen25vl
    size = vlm.processor.image_processor.size  # the processor's own bounds: 112^2 .. 168^2 px; patch 7 x merge 2
    factor = 14
    assert (size["shortest_edge"], size["longest_edge"]) == (112 * 112, 168 * 168)
    assert visual_tokens(vlm, {}) == tokens_by_hand(168, factor, 112 * 112, 168 * 168) == 12 * 12
    # 168^2 > 112^2: scaled by 1.5 to 112 px -> 8 x 8 tokens
    assert visual_tokens(vlm, {"max_pixels": 112 * 112}) == tokens_by_hand(168, factor, 112 * 112, 112 * 112) == 64
    # 98^2: 168 / (168 / 98) / 14 is 6.999... in floating point, floored to 6 -> 84 px -> 6 x 6 tokens
    assert visual_tokens(vlm, {"min_pixels": 56 * 56, "max_pixels": 98 * 98}) == tokens_by_hand(168, factor, 56 * 56,
                                                                                                 98 * 98) == 6 * 6
    # a 56 px image is scaled up to min_pixels: 56 -> 112 px with the default bounds, 168 px with min 168^2
    assert visual_tokens(vlm, {}, side=56) == tokens_by_hand(56, factor, 112 * 112, 168 * 168) == 64
    assert visual_tokens(vlm, {"min_pixels": 168 * 168}, side=56) == 144


@pytest.mark.parametrize("name", [name for name, adapter in TEST_ARCHITECTURES.items() if adapter.option_keys])
def test_image_bounds_apply_to_every_qwen_family(name):
    adapter = TEST_ARCHITECTURES[name]
    config = adapter.tiny_config(layers=2)
    vlm = tp.models.VLM(name=name, model=adapter.build_random(config, torch.float32, "sdpa", 0), adapter=adapter,
                        processor=adapter.tiny_processor())
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    size = vlm.processor.image_processor.size
    assert visual_tokens(vlm, {}) == tokens_by_hand(168, factor, size["shortest_edge"], size["longest_edge"])
    assert visual_tokens(vlm, {"min_pixels": 56 * 56, "max_pixels": 112 * 112}) == \
        tokens_by_hand(168, factor, 56 * 56, 112 * 112) < visual_tokens(vlm, {})


@pytest.mark.parametrize("options,pattern", [
    ({"image": {"max_pixels": 0}}, r"model.image.max_pixels must be an integer >= 1, got 0"),
    ({"image": {"min_pixels": 1.5}}, r"model.image.min_pixels must be an integer >= 1"),
    ({"image": {"min_pixels": 200, "max_pixels": 100}}, r"model.image.min_pixels=200 exceeds model.image.max_pixels=100"),
    ({"image": {"pixels": 100}}, r"model.image.pixels is not an option of the qwen25vl family"),
])
def test_bad_image_options_are_refused_before_loading(options, pattern, monkeypatch):
    monkeypatch.setattr(tp.models.base.ModelAdapter, "load_pretrained",
                        lambda *a: pytest.fail("the model was loaded before the options were checked"))
    with pytest.raises(ValueError, match=pattern):
        tp.load_model("tiny_qwen25vl", device="cpu", options=options)


def test_a_bound_that_conflicts_with_the_processors_other_bound_names_the_fix(trained_qwen25vl):
    with pytest.raises(ValueError, match=r"model.image.max_pixels=3136 conflicts with the processor's min_pixels "
                                         r"\(12544\): set model.image.min_pixels too"):
        visual_tokens(trained_qwen25vl, {"max_pixels": 56 * 56})


def test_llava_has_no_image_bounds():
    with pytest.raises(ValueError, match=r"model.image.max_pixels is not an option of the llava family "
                                         r"\(no model.image options\)"):
        tp.load_model("tiny_llava", device="cpu", options={"image": {"max_pixels": 100}})


def test_the_runner_refuses_bad_image_bounds_before_loading(tmp_path):
    with initialize_config_module("tokenprune.conf", version_base=None):
        cfg = compose("config", overrides=[f"run.output_dir={tmp_path}", "model=tiny_qwen25vl",
                                           "model.image.max_pixels=-5"])
    with pytest.raises(ConfigError, match=r"model.image.max_pixels must be an integer >= 1, got -5"):
        build_plan(cfg)
