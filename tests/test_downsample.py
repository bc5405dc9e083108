"""The downsampling baseline (``tokenprune/methods/downsample.py``) against the card (``downsample.md`` §8.1-3):
token counts computed by hand for LLaVA-1.5 (336 px, 14 px patches) and Qwen2.5-VL (28 px per token, min/max
pixels) at 192/128/64 tokens, the real tiny processors emitting exactly the predicted count; then through the
families' ``prepare``, the engine and the runner: budget 1 is the baseline (inputs and logits), the encoder emits
the planned grid (LLaVA: placeholders counted, CLIP's position table interpolated only while applied), videos.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from conftest import hook_snapshot, make_image, make_sample, stock_logits, tiny_vlm

from tokenprune.methods.downsample import (Downsample, DynamicGeometry, FixedGeometry, native_grid, plan_image,
                                           plan_sample, resize_frames, resize_image, vtc_factor, vtc_image)
from tokenprune.models import adapter_named
from tokenprune.models.zoo import tiny

LLAVA15 = FixedGeometry(336, 14)
QWEN25VL = DynamicGeometry(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056)  # the 7B's config
QWEN3VL = DynamicGeometry(patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216)  # Qwen3-VL's config


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
    geometry = adapter_named("llava").input_geometry(processor)
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


def qwen3vl_published_processor():
    """The stock Qwen3-VL processor with the published image settings (16 px patches, a 2 x 2 merge: 32 px per
    token side; 65536 to 16777216 px) and the test tokenizer."""
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    template = adapter_named("qwen3vl").tiny_processor().chat_template
    return tiny.tiny_qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, min_pixels=65536, max_pixels=16777216,
                                    patch_size=16, chat_template=template)


def test_qwen3vl_counts_by_hand():
    # 640 x 480 px at 32 px per token: 15 x 20 (N = 300). sqrt(b / 300) scales each side:
    # 192: 12 x 16 = 192; 128: 9.80 x 13.06 → 10 x 13 = 130; 64: 6.93 x 9.24 → 7 x 9 = 63
    geometry = adapter_named("qwen3vl").input_geometry(qwen3vl_published_processor())
    assert geometry == QWEN3VL and native_grid(geometry, (480, 640)) == (15, 20)
    plans = {b: plan_sample(geometry, [(480, 640)], b)[0] for b in (192, 128, 64)}
    assert {b: (p.tokens, p.grid, p.resize) for b, p in plans.items()} == {
        192: (192, (12, 16), (384, 512)), 128: (130, (10, 13), (320, 416)), 64: (63, (7, 9), (224, 288))}
    # 20 x 30 px is raised above min_pixels: scale sqrt(65536 / 600) = 10.45, ceil(209 / 32) = 7, ceil(313.5 / 32) = 10
    assert native_grid(geometry, (20, 30)) == (7, 10)


@pytest.mark.parametrize("processor_fn,family", [(tiny.tiny_qwen25vl_processor, "qwen25vl"),
                                                 (tiny.trained_qwen25vl_processor, "qwen25vl"),
                                                 (qwen3vl_published_processor, "qwen3vl")])
def test_qwen_processor_emits_the_predicted_count(processor_fn, family):
    processor = processor_fn()
    geometry = adapter_named(family).input_geometry(processor)
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
    geometry = adapter_named("qwen25vl").input_geometry(tiny.trained_qwen25vl_processor())  # 14 px per token side
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


# ---------------------------------------------------------------------------------------------------------
# Through the families' prepare, the engine and the runner (tiny random models: 6 x 6 tokens per image)
# ---------------------------------------------------------------------------------------------------------
def test_budget_one_is_a_no_op(family):
    vlm = tiny_vlm(family)
    sample = make_sample(71)
    baseline = vlm.prepare(sample)
    inputs = vlm.prepare(sample, Downsample(budget=1.0))
    assert inputs.keys() == baseline.keys() and all(torch.equal(inputs[k], baseline[k]) for k in baseline)
    assert inputs.stats == {"native_visual_tokens": 36, "downsample_visual_tokens": 36}
    with torch.no_grad(), tp.apply(vlm.model, Downsample(budget=1.0)):  # LLaVA: interpolation at the native size
        logits = vlm.model(**inputs).logits
    assert torch.equal(logits, stock_logits(vlm, baseline))


@pytest.mark.parametrize("budget,side", [(0.25, 3), (9, 3), (16, 4), (1, 1)])
def test_the_encoder_emits_the_planned_grid(family, budget, side):
    vlm = tiny_vlm(family)
    method = Downsample(budget=budget)
    inputs = vlm.prepare(make_sample(72, size=(168, 168)), method)
    layout = inputs.layout
    assert layout.num_visual == side * side == inputs.stats["downsample_visual_tokens"]
    assert [(g.rows, g.cols) for g in layout.groups] == [(side, side)]  # LLaVA: counted from the placeholders
    with torch.no_grad(), tp.apply(vlm.model, method):
        out = vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_llava_runs_clip_with_an_interpolated_position_table_only_while_applied():
    vlm = tiny_vlm("tiny_llava")
    inputs = vlm.prepare(make_sample(73), Downsample(budget=0.25))  # CLIP at 14 * 3 = 42 px
    assert inputs["pixel_values"].shape[-2:] == (42, 42)
    before = hook_snapshot(vlm.model)
    with pytest.raises(ValueError, match="doesn't match model"):  # the stock CLIP refuses another input size
        with torch.no_grad():
            vlm.model(**inputs)
    with torch.no_grad(), tp.apply(vlm.model, "downsample"):
        vlm.model(**inputs)
    assert hook_snapshot(vlm.model) == before
    # the interpolated table: CLIP's own bicubic interpolation of its 6 x 6 position grid to 3 x 3
    vision = vlm.model.model.vision_tower
    with torch.no_grad():
        resized = vision(inputs["pixel_values"], interpolate_pos_encoding=True).last_hidden_state
        with tp.apply(vlm.model, "downsample"):
            hooked = vision(inputs["pixel_values"]).last_hidden_state
    assert torch.equal(hooked, resized)


def test_two_llava_images_are_two_square_grids():
    vlm = tiny_vlm("tiny_llava")
    sample = tp.Sample(id="two", question="which is brighter ?", images=[make_image(74), make_image(75, (300, 200))])
    inputs = vlm.prepare(sample, Downsample(budget=0.25))
    assert [(g.rows, g.cols) for g in inputs.layout.groups] == [(3, 3), (3, 3)]


@pytest.mark.parametrize("family", ["tiny_qwen25vl", "tiny_qwen3vl"])
def test_qwen_video_frames_share_one_smaller_grid(family):
    """Qwen2.5-VL: one run of 4 groups; Qwen3-VL: one run per temporal group (timestamps between), each 2 x 2."""
    from test_prunevid_decode import video_inputs  # 8 frames of 84 px: 4 temporal groups of 3 x 3

    vlm = tiny_vlm(family)
    native = video_inputs(vlm, frames=8, size=84)
    sample = tp.Sample(id="v", question="where does it move ?", video=tp.VideoFrames(
        frames=np.random.default_rng(0).integers(0, 255, (8, 3, 84, 84), dtype=np.uint8), fps=4.0,
        frame_indices=list(range(8)), total_frames=8))
    inputs = vlm.prepare(sample, Downsample(budget=0.5))  # 3 x 3 → round(2.12) = 2 x 2 per temporal group
    assert native.layout.num_visual == 36 and inputs.layout.num_visual == 16
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 4]]
    assert inputs.stats == {"native_visual_tokens": 36, "downsample_visual_tokens": 16}
    assert [(g.rows, g.cols) for g in inputs.layout.groups] == [(2, 2)] * 4
    with torch.no_grad():
        vlm.model(**inputs)  # the stock model takes the smaller video (its rope index, DeepStack rows)


def test_the_runner_prepares_downsample_its_own_way():
    from types import SimpleNamespace

    from tokenprune.run.runner import run_method

    vlm = tiny_vlm("tiny_qwen25vl")
    sample = make_sample(76)
    scorer = SimpleNamespace(score=lambda prediction, sample: 1.0)
    plan = SimpleNamespace(max_new_tokens=2, dataset=SimpleNamespace(scorer=scorer, stop=[]))  # a Dataset has stop strings
    run = run_method(vlm, vlm.prepare(sample), Downsample(budget=0.25), sample, plan, eos=None)
    assert run["error"] is None
    assert (run["visual_tokens"], run["visual_tokens_original"]) == (9, 36)
    assert run["method_stats"] == {"native_visual_tokens": 36, "downsample_visual_tokens": 9}
    assert run["timing"]["vision_ms"] > 0
    bad = run_method(vlm, vlm.prepare(sample), Downsample(budget=0.25, match="vtc"), sample, plan, eos=None)
    assert bad["error"] is None  # Qwen: VTC-Bench's own pipeline runs
