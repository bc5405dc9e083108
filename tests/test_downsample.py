"""The downsampling baseline's planning (``tokenprune/methods/downsample.py``) against the card (``downsample.md``
§8.1-3): token counts computed by hand for LLaVA-1.5 (336 px, 14 px patches) and Qwen2.5-VL (28 px per token,
min/max pixels) at 192/128/64 tokens, and the real tiny processors emitting exactly the predicted count. The
model-level checks (g = 24 / budget 1 give the baseline logits) come with the runner wiring (phase 2).
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tokenprune.methods.downsample import (Downsample, DynamicGeometry, FixedGeometry, native_grid, plan_image,
                                           plan_sample, resize_frames, resize_image, vtc_factor, vtc_image)
from tokenprune.models.zoo import tiny

LLAVA15 = FixedGeometry(336, 14)
QWEN25VL = DynamicGeometry(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056)  # the 7B's config


def image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_llava15_counts_by_hand():
    # g = round(24 sqrt(b / 576)): 192 → 13.86 → 14; 128 → 11.31 → 11; 64 → 8; CLIP runs at 14 g px
    plans = {b: plan_sample(LLAVA15, [(480, 640)], b)[0] for b in (192, 128, 64, 144, 576, 1.0, 0.25)}
    assert {b: (p.tokens, p.grid) for b, p in plans.items()} == {
        192: (196, (14, 14)), 128: (121, (11, 11)), 64: (64, (8, 8)), 144: (144, (12, 12)), 576: (576, (24, 24)),
        1.0: (576, (24, 24)), 0.25: (144, (12, 12))}
    assert plans[128].processor_kwargs == {"size": {"shortest_edge": 154}, "crop_size": {"height": 154, "width": 154}}
    assert plans[128].model_kwargs == {"interpolate_pos_encoding": True} and plans[128].resize is None
    assert plans[576].is_identity and plans[1.0].is_identity  # g = 24: the baseline call, unchanged
    blur = plan_image(LLAVA15, (480, 640), 64 / 576, llava_mode="blur")
    assert (blur.tokens, blur.resize, blur.processor_kwargs) == (576, (160, 213), {})  # 480·8/24, 640·8/24


def test_qwen25vl_counts_by_hand():
    # 640 x 480 px: smart_resize → 476 x 644 (17 x 23 tokens, N = 391). sqrt(b / 391) scales each side:
    # 192: 11.91 x 16.12 → 12 x 16 = 192; 128: 9.73 x 13.16 → 10 x 13 = 130; 64: 6.88 x 9.31 → 7 x 9 = 63
    assert native_grid(QWEN25VL, (480, 640)) == (17, 23)
    plans = {b: plan_sample(QWEN25VL, [(480, 640)], b)[0] for b in (192, 128, 64)}
    assert {b: (p.tokens, p.grid, p.resize) for b, p in plans.items()} == {
        192: (192, (12, 16), (336, 448)), 128: (130, (10, 13), (280, 364)), 64: (63, (7, 9), (196, 252))}
    assert all(p.processor_kwargs == {"do_resize": False} and not p.model_kwargs for p in plans.values())
    # pixel bounds: 20 x 30 px is raised to min_pixels (2 x 3 tokens); a quarter → 1 x round(1.5) = 1 x 2
    assert native_grid(QWEN25VL, (20, 30)) == (2, 3)
    assert plan_image(QWEN25VL, (20, 30), 0.25).grid == (1, 2)
    assert plan_image(QWEN25VL, (480, 640), 1.0).is_identity and plan_image(QWEN25VL, (480, 640), 1e-9).tokens == 1
    # several images: one fraction for all (b / N with N = both images' tokens)
    two = plan_sample(QWEN25VL, [(480, 640), (20, 30)], 0.25)
    assert [p.grid for p in two] == [(8, 12), (1, 2)] and [p.native_tokens for p in two] == [391, 6]


def _count(ids, token_id):
    return int((ids == token_id).sum())


@pytest.mark.parametrize("processor_fn,image_size", [(tiny.tiny_llava_processor, 84),
                                                     (tiny.trained_llava_processor, 168)])
def test_llava_processor_emits_the_predicted_count(processor_fn, image_size):
    processor = processor_fn()
    geometry = FixedGeometry.from_processor(processor)
    assert geometry.image_size == image_size
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]}],
                                         tokenize=False, add_generation_prompt=True)
    img = image(150, 100)
    baseline = processor(text=text, images=[img], return_tensors="pt")
    for budget in (1, 4, 9, 0.5, 0.25, 1.0, 10**6):
        plan = plan_sample(geometry, [(100, 150)], budget)[0]
        encoded = processor(text=text, images=[resize_image(img, plan)], return_tensors="pt", **plan.processor_kwargs)
        assert _count(encoded["input_ids"], 4) == plan.tokens
        assert encoded["pixel_values"].shape[-1] == geometry.patch_size * plan.grid[1]
        if plan.is_identity:
            assert torch.equal(encoded["pixel_values"], baseline["pixel_values"])


@pytest.mark.parametrize("processor_fn", [tiny.tiny_qwen25vl_processor, tiny.trained_qwen25vl_processor])
def test_qwen_processor_emits_the_predicted_count(processor_fn):
    processor = processor_fn()
    geometry = DynamicGeometry.from_processor(processor)
    pad = tiny.QWEN_SPECIALS.index("<|image_pad|>")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                        {"type": "text", "text": "what"}]}],
                                         tokenize=False, add_generation_prompt=True)
    rng = np.random.default_rng(1)
    for trial in range(6):
        sizes = [(int(rng.integers(20, 400)), int(rng.integers(20, 400))) for _ in range(2)]  # (height, width)
        images = [image(w, h, seed=trial) for h, w in sizes]
        baseline = processor(text=[text], images=images, return_tensors="pt")
        native = [native_grid(geometry, size) for size in sizes]
        assert baseline["image_grid_thw"][:, 1:].tolist() == [[2 * a, 2 * b] for a, b in native]  # the processor's grid
        for budget in (1, 5, 0.5, 0.1, 1.0):
            plans = plan_sample(geometry, sizes, budget)
            kwargs = plans[0].processor_kwargs or plans[1].processor_kwargs
            encoded = processor(text=[text], images=[resize_image(im, p) for im, p in zip(images, plans)],
                                return_tensors="pt", **kwargs)
            assert _count(encoded["input_ids"], pad) == sum(p.tokens for p in plans)
            assert encoded["image_grid_thw"][:, 1:].tolist() == [[2 * p.grid[0], 2 * p.grid[1]] for p in plans]
            if all(p.is_identity for p in plans):
                assert torch.equal(encoded["pixel_values"], baseline["pixel_values"])  # budget 1.0: a no-op


def test_video_frames_share_one_grid():
    geometry = DynamicGeometry.from_processor(tiny.trained_qwen25vl_processor())  # 14 px per token side
    frames = torch.rand(4, 3, 112, 84) * 255
    plan = plan_image(geometry, (112, 84), 0.25, resized=False)
    assert plan.grid == (4, 3) and plan.resize == (56, 42)  # 8 x 6 tokens → round(4), round(3)
    out = resize_frames(frames, plan)
    assert out.shape == (4, 3, 56, 42) and out.min() >= 0 and out.max() <= 255
    with pytest.raises(ValueError, match="not multiples of 14 px"):
        plan_image(geometry, (100, 84), 0.25, resized=False)


def test_vtc_pipeline_equals_an_independent_pil_pipeline():
    # 500 x 375 px, k = 2 → 250 x 187 → JPEG q75 → qwen-vl-utils: round(187/28) = 7, round(250/28) = 9 → 196 x 252
    processor = tiny.tiny_qwen25vl_processor(min_pixels=3136, max_pixels=12845056)
    img = image(500, 375, seed=3)
    small = img.resize((250, 187), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=75)
    buffer.seek(0)
    expected = Image.open(buffer).convert("RGB").resize((252, 196), Image.Resampling.BICUBIC)
    got = vtc_image(img, vtc_factor(0.25), patch_size=14)
    assert got.size == (252, 196)
    text = "<|vision_start|> <|image_pad|> <|vision_end|> what"
    a = processor(text=[text], images=[got], return_tensors="pt")
    b = processor(text=[text], images=[expected], return_tensors="pt")
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["image_grid_thw"].tolist() == [[1, 14, 18]]
    assert [vtc_factor(b) for b in (1.0, 0.25, 0.1111, 0.0625, 0.04, 0.01)] == [1, 2, 3, 4, 5, 10]
    with pytest.raises(ValueError, match="not 1/k\\^2"):
        vtc_factor(0.3)


def test_settings_validation():
    assert Downsample().budget == 0.25
    bad = [({"budget": None}, r"downsample\.budget must be .* got None"), ({"budget": 0}, r"downsample\.budget"),
           ({"match": "pixels"}, r"downsample\.match must be one of \['tokens', 'vtc'\]"),
           ({"llava_mode": "crop"}, r"downsample\.llava_mode must be one of \['vit', 'blur'\]"),
           ({"jpeg_quality": 100}, r"downsample\.jpeg_quality must be an integer in \[1, 95\]"),
           ({"match": "vtc", "budget": 0.3}, "not 1/k\\^2"), ({"match": "vtc", "budget": 64}, "fraction 1/k\\^2")]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            Downsample(**fields)
