"""Vision-encoder signals (issue 18): the trace's scores and keys against brute force on the tiny models.

References are built here, independently of ``models/vision_signals.py``: eager CLIP attention maps from the
stock tower (``output_attentions=True``, on a twin model built with eager attention and the same seed), the
stock ``k_proj`` / ``qkv`` outputs captured by hooks, full ``H x T x T`` softmax maps per attention segment,
and the window permutation undone through each patch's stock (t, h, w) coordinates rather than the inverse
window index. The trace itself always runs on the SDPA model.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch

import tokenprune as tp
import tokenprune.models.vision_signals as signals_module
from conftest import hook_snapshot, make_image, make_sample
from tokenprune.methods.vispruner import vispruner_select
from tokenprune.models.vision_signals import VisionTrace, clip_signal_layer
from tokenprune.models.qwen2vl import Qwen2VLAdapter, tiny_qwen2vl_config
from tokenprune.models.qwen3vl import Qwen3VLAdapter, tiny_qwen3vl_config
from tokenprune.models.zoo.tiny import (tiny_llava_config, tiny_llava_processor, tiny_qwen25vl_config,
                                        tiny_qwen25vl_processor)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# float32 recomputation vs the stock kernels: the same products, summed in another order
TOLERANCE = dict(rtol=1e-5, atol=1e-7)
BUILDERS = {
    # three vision layers: the feature layer -2 is produced by layer 1, neither the first nor the last
    "tiny_llava": (lambda: tiny_llava_config(layers=1, vision_layers=3), tiny_llava_processor, "llava"),
    # three ViT blocks, the last one full attention, windows of 2 x 2 LLM tokens
    "tiny_qwen25vl": (lambda: tiny_qwen25vl_config(layers=1, vision_depth=3), tiny_qwen25vl_processor, "qwen25vl"),
    # Qwen2-VL: a plain ViT (every block full attention per temporal step, no window permutation)
    "tiny_qwen2vl": (lambda: tiny_qwen2vl_config(layers=1, vision_depth=3), lambda: Qwen2VLAdapter().tiny_processor(),
                     "qwen2vl"),
    # Qwen3-VL: a plain ViT like Qwen2-VL's (LayerNorm, learned + 2-D RoPE positions), DeepStack from every block
    # (four decoder layers: more than the three DeepStack features)
    "tiny_qwen3vl": (lambda: tiny_qwen3vl_config(layers=4, vision_depth=3), lambda: Qwen3VLAdapter().tiny_processor(),
                     "qwen3vl"),
}
QWEN = [(name, family) for name, (_, _, family) in BUILDERS.items() if family != "llava"]


def test_every_registered_family_is_compared_with_brute_force():
    assert sorted(family for _, _, family in BUILDERS.values()) == sorted(a.family for a in tp.models.adapters())


@lru_cache(maxsize=None)
def build(name: str, attn: str):
    config_builder, processor_builder, family = BUILDERS[name]
    adapter = tp.models.adapter_named(family)
    model = adapter.build_random(config_builder(), torch.float32, attn, seed=0).eval()
    return tp.models.VLM(name=name, model=model, processor=processor_builder(), adapter=adapter)


def twins(name: str):
    sdpa, eager = build(name, "sdpa"), build(name, "eager")
    for (key, a), b in zip(sdpa.model.state_dict().items(), eager.model.state_dict().values()):
        assert torch.equal(a, b), key
    return sdpa, eager


def two_images(seed: int = 1) -> tp.Sample:
    return tp.Sample(id="two", question="what colour is the square at the top left ?",
                     images=[make_image(seed), make_image(seed + 50)])


def trace_forward(vlm, sample, family: str, **kwargs) -> tuple[VisionTrace, dict]:
    inputs = vlm.prepare(sample)
    with VisionTrace(vlm.model, family, **kwargs) as trace, torch.no_grad():
        vlm.model(**inputs)
    return trace, inputs


# ---------------------------------------------------------------------------------------------------------
# LLaVA / CLIP
# ---------------------------------------------------------------------------------------------------------
def test_clip_signal_layer_is_the_producer_of_the_feature_layer():
    def config(feature_layer, layers=24):
        return SimpleNamespace(vision_feature_layer=feature_layer,
                               vision_config=SimpleNamespace(num_hidden_layers=layers))

    assert clip_signal_layer(config(-2)) == 22  # LLaVA-1.5: hidden_states[-2] is layer 22's output
    assert clip_signal_layer(config(-1)) == 23
    assert clip_signal_layer(config(23)) == 22  # hidden_states[23] is layer 22's output
    for bad in (0, -25, 25, [-2, -1], True):
        with pytest.raises(ValueError, match="vision_feature_layer"):
            clip_signal_layer(config(bad))


def test_llava_scores_keys_and_features_equal_eager_clip():
    sdpa, eager = twins("tiny_llava")
    trace, inputs = trace_forward(sdpa, two_images(), "llava")
    groups = trace.groups()
    assert len(groups) == 2 and trace.has_cls
    layer_index = 1
    captured = {}
    handle = eager.model.model.vision_tower.encoder.layers[layer_index].self_attn.k_proj.register_forward_hook(
        lambda module, args, output: captured.update(k=output))
    try:
        with torch.no_grad():
            out = eager.model.model.vision_tower(inputs["pixel_values"], output_attentions=True,
                                                 output_hidden_states=True)
            stock = sdpa.model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    finally:
        handle.remove()
    cls_row = out.attentions[layer_index][:, :, 0, 1:].mean(dim=1)  # [2, 36]: eager CLS row, head mean
    heads = eager.model.config.vision_config.num_attention_heads
    keys = captured["k"].view(2, 37, heads, -1).mean(dim=2)  # [2, 37, hd]
    for image, group in enumerate(groups):
        assert group.source == signals_module.GroupSource(0, image, 0)
        torch.testing.assert_close(group.scores, cls_row[image], **TOLERANCE)
        assert torch.equal(torch.argsort(group.scores, descending=True), torch.argsort(cls_row[image], descending=True))
        torch.testing.assert_close(group.keys, keys[image, 1:], **TOLERANCE)
        torch.testing.assert_close(group.cls_key, keys[image, 0], **TOLERANCE)
        # features: the SDPA tower's own hidden_states[-2], CLS separate (same forward: bit-equal)
        assert torch.equal(group.features, stock.hidden_states[-2][image, 1:])
        assert torch.equal(group.cls_feature, stock.hidden_states[-2][image, 0])


def test_llava_projected_features_are_the_decoder_image_embeddings():
    vlm = build("tiny_llava", "sdpa")
    captured = {}
    language_model = vlm.adapter.text_model(vlm.model)
    handle = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        trace, inputs = trace_forward(vlm, two_images(), "llava")
    finally:
        handle.remove()
    image_rows = (inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero().flatten()
    decoder_rows = captured["embeds"][0, image_rows].view(2, 36, -1)
    projected = trace.project(torch.stack([group.features for group in trace.groups()]))  # [2, 36, d]
    assert torch.equal(projected, decoder_rows)


# ---------------------------------------------------------------------------------------------------------
# Qwen2.5-VL windowed ViT
# ---------------------------------------------------------------------------------------------------------
def qwen_reference(vlm, pixel_values, grid_thw):
    """Brute force on the eager twin: per LLM token, received attention (head mean, summed over the segment's
    query rows, averaged over its 4 patches) and head-mean RoPE'd keys, placed by the patches' coordinates (the
    window permutation applied to them where the ViT has windows)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    visual = vlm.model.model.visual
    block = visual.blocks[-1]
    captured = {}
    handles = [
        block.attn.qkv.register_forward_hook(lambda m, a, out: captured.update(qkv=out)),
        block.attn.proj.register_forward_pre_hook(lambda m, a: captured.update(attn_out=a[0])),
        block.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            visual(pixel_values, grid_thw=grid_thw)
    finally:
        for handle in handles:
            handle.remove()
    length = pixel_values.shape[0]
    heads = visual.config.num_heads
    q, k, v = captured["qkv"].reshape(length, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # [T, H, hd] each
    cos, sin = captured["position_embeddings"]
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    bounds = captured["cu_seqlens"].tolist()
    received = torch.zeros(length)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[start:stop], k[start:stop]) * block.attn.scaling
        probs = torch.softmax(scores, dim=-1)  # [H, n, n]: the full map, brute force
        # the reference reproduces the stock block's own attention output
        torch.testing.assert_close(torch.einsum("hqk,khd->qhd", probs, v[start:stop]).reshape(stop - start, -1),
                                   captured["attn_out"][start:stop], **TOLERANCE)
        received[start:stop] = probs.mean(dim=0).sum(dim=0)
    # (t, h, w) of every patch in the stock ViT order, permuted into window order by the stock model's own method
    position = get_vision_position_ids(grid_thw, visual.spatial_merge_size)  # [T, 2]
    frames = torch.cat([torch.arange(t).repeat_interleave(h * w) for t, h, w in grid_thw.tolist()])
    item = torch.cat([torch.full((t * h * w,), i) for i, (t, h, w) in enumerate(grid_thw.tolist())])
    coordinates = torch.stack([item, frames, position[:, 0], position[:, 1]], dim=-1).float()
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: the stock ViT's own window permutation
        window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
        coordinates = visual.permute_input_for_window_attn(coordinates, window_index, length)
    coordinates = coordinates.long()
    # LLM token index: items in order, frames in order, then raster order of the merged grid
    offsets, starts = [], 0
    for t, h, w in grid_thw.tolist():
        offsets.append(starts)
        starts += t * (h // 2) * (w // 2)
    cols = [w // 2 for _, _, w in grid_thw.tolist()]
    rows = [h // 2 for _, h, _ in grid_thw.tolist()]
    token = torch.tensor([offsets[i] + f * rows[i] * cols[i] + (y // 2) * cols[i] + x // 2
                          for i, f, y, x in coordinates.tolist()])
    assert torch.equal(torch.bincount(token), torch.full((length // 4,), 4))
    scores = torch.zeros(length // 4).index_add_(0, token, received) / 4
    keys = torch.zeros(length // 4, k.shape[-1]).index_add_(0, token, k.float().mean(dim=1)) / 4
    return scores, keys


def random_grids(seed: int = 0):
    """Two items called at once: a 2-step video-like grid of 8 x 12 patches and an image of 4 x 8 patches."""
    grid_thw = torch.tensor([[2, 8, 12], [1, 4, 8]])
    patches = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
    return torch.randn(patches, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed)), grid_thw


@pytest.mark.parametrize("name,family", QWEN)
def test_qwen_merge_unit_scores_and_keys_equal_brute_force_in_raster_order(name, family):
    sdpa, eager = twins(name)
    pixel_values, grid_thw = random_grids()
    with VisionTrace(sdpa.model, family) as trace, torch.no_grad():
        sdpa.model.model.visual(pixel_values, grid_thw=grid_thw)
    groups = trace.groups()
    assert [g.source for g in groups] == [signals_module.GroupSource(0, 0, 0), signals_module.GroupSource(0, 0, 1),
                                          signals_module.GroupSource(0, 1, 0)]
    assert [g.scores.numel() for g in groups] == [24, 24, 8] and not trace.has_cls
    scores, keys = qwen_reference(eager, pixel_values, grid_thw)
    torch.testing.assert_close(torch.cat([g.scores for g in groups]), scores, **TOLERANCE)
    torch.testing.assert_close(torch.cat([g.keys for g in groups]), keys, **TOLERANCE)
    # each temporal step is its own segment: its scores sum to its own patch count / 4
    assert [round(float(g.scores.sum()), 3) for g in groups] == [24.0, 24.0, 8.0]


@pytest.mark.parametrize("name,family", QWEN)
def test_qwen_trace_through_the_model_equals_brute_force_on_the_processed_image(name, family):
    sdpa, eager = twins(name)
    trace, inputs = trace_forward(sdpa, two_images(), family)
    scores, keys = qwen_reference(eager, inputs["pixel_values"], inputs["image_grid_thw"])
    groups = trace.groups()
    assert len(groups) == 2
    torch.testing.assert_close(torch.cat([g.scores for g in groups]), scores, **TOLERANCE)
    torch.testing.assert_close(torch.cat([g.keys for g in groups]), keys, **TOLERANCE)


def test_chunked_scores_equal_one_block():
    vlm = build("tiny_qwen25vl", "sdpa")
    pixel_values, grid_thw = random_grids(3)
    results = []
    for chunk_bytes in (1, signals_module.SCORE_CHUNK_BYTES):  # one query row at a time, then all at once
        with VisionTrace(vlm.model, "qwen25vl", chunk_bytes=chunk_bytes) as trace, torch.no_grad():
            vlm.model.model.visual(pixel_values, grid_thw=grid_thw)
        results.append(torch.cat([g.scores for g in trace.groups()]))
    torch.testing.assert_close(results[0], results[1], **TOLERANCE)


# ---------------------------------------------------------------------------------------------------------
# The trace itself
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,family", [(name, family) for name, (_, _, family) in BUILDERS.items()])
def test_trace_is_lazy_changes_nothing_and_removes_its_hooks(name, family, monkeypatch):
    vlm = build(name, "sdpa")
    inputs = vlm.prepare(make_sample(2))
    before = hook_snapshot(vlm.model)
    with torch.no_grad():
        plain = vlm.model(**inputs).logits
    calls = []
    original = signals_module.attention_probabilities
    monkeypatch.setattr(signals_module, "attention_probabilities", lambda *a, **k: calls.append(1) or original(*a, **k))
    with VisionTrace(vlm.model, family) as trace, torch.no_grad():
        traced = vlm.model(**inputs).logits
    assert torch.equal(plain, traced)
    assert hook_snapshot(vlm.model) == before
    assert vlm.model.config._attn_implementation == "sdpa"
    assert not calls  # nothing computed during the forward
    trace.groups()
    computed = len(calls)
    assert computed > 0
    trace.groups()
    assert len(calls) == computed  # computed once
    with pytest.raises(RuntimeError, match="boom"):
        with VisionTrace(vlm.model, family):
            raise RuntimeError("boom")
    assert hook_snapshot(vlm.model) == before


@pytest.mark.parametrize("name,family", [(name, family) for name, (_, _, family) in BUILDERS.items()])
def test_generate_encodes_the_images_once_before_its_first_forward_and_the_trace_sees_it(name, family):
    """transformers 5 ``generate`` runs the vision encoder itself (``mm_encoder_outputs``), before the first forward:
    a trace around ``generate`` gets one encoder call with the same signals as around a plain forward."""
    vlm = build(name, "sdpa")
    inputs = vlm.prepare(two_images(4))
    forward_trace, _ = trace_forward(vlm, two_images(4), family)
    with VisionTrace(vlm.model, family) as trace, torch.no_grad():
        vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert len(trace.captures) == 1
    for generated, forwarded in zip(trace.groups(), forward_trace.groups(), strict=True):
        assert torch.equal(generated.scores, forwarded.scores) and torch.equal(generated.keys, forwarded.keys)


def test_unknown_family_and_full_strategy_are_refused():
    with pytest.raises(ValueError, match="unknown model family .nope."):
        VisionTrace(None, "nope")
    vlm = build("tiny_llava", "sdpa")
    config = vlm.model.config
    previous = config.vision_feature_select_strategy
    config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
            with VisionTrace(vlm.model, "llava"):
                pass
    finally:
        config.vision_feature_select_strategy = previous


@pytest.mark.parametrize("name,family", [(name, family) for name, (_, _, family) in BUILDERS.items()])
def test_vispruner_important_set_is_the_top_of_the_brute_force_scores(name, family):
    """VisPruner card test 4: the important set equals the top-int(T r) of eager CLS attention / brute-force sums."""
    sdpa, eager = twins(name)
    trace, inputs = trace_forward(sdpa, two_images(7), family)
    if family == "llava":
        with torch.no_grad():
            out = eager.model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
        reference = out.attentions[1][:, :, 0, 1:].mean(dim=1)  # [2, 36]
    else:
        reference = qwen_reference(eager, inputs["pixel_values"], inputs["image_grid_thw"])[0].view(2, 36)
    scores = torch.stack([g.scores for g in trace.groups()])  # [2, 36]
    features = torch.randn(2, 36, 8, generator=torch.Generator().manual_seed(0))
    keep, ratio = 16, 0.5  # 8 important tokens
    kept = vispruner_select(scores, features, keep, ratio)
    for image in range(2):
        top = set(torch.argsort(reference[image], descending=True)[:8].tolist())
        assert top <= set(kept[image].tolist())
        assert top == set(torch.argsort(scores[image], descending=True, stable=True)[:8].tolist())


def check_device(device: str):
    for name, (_, _, family) in BUILDERS.items():
        vlm = build(name, "sdpa")
        inputs = vlm.prepare(two_images(3))
        with VisionTrace(vlm.model, family) as trace, torch.no_grad():
            vlm.model(**inputs)
        model = vlm.model.to(device)
        try:
            with VisionTrace(model, family) as moved, torch.no_grad():
                model(**inputs.to(device))
            for cpu, other in zip(trace.groups(), moved.groups()):
                assert other.scores.device.type == torch.device(device).type
                torch.testing.assert_close(other.scores.cpu(), cpu.scores, rtol=1e-4, atol=1e-6)  # TF32-free fp32
                torch.testing.assert_close(other.keys.cpu(), cpu.keys, rtol=1e-4, atol=1e-5)
        finally:
            vlm.model.to("cpu")


@pytest.mark.gpu
def test_cuda_trace_equals_cpu():
    check_device("cuda")
