"""The pooling baseline (``tokenprune/methods/pool.py``) against the card (``downsample.md`` §8.4-5): the pure
algorithm, then the method in the engine on every family.

References: hand-computed means, PyTorch's own pooling ops (``avg_pool2d``/``avg_pool3d`` with ``ceil_mode``,
``adaptive_avg_pool2d``, ``max_pool2d``), HF LLaVA-OneVision's ``apply_pooling``, Qwen2.5-VL's own
``get_rope_index`` on the pooled ``grid_thw``; in the engine, prefills built by hand (window means, positions by
each rule, the stock decoder layers one by one) and the model's own rope index of the pooled input.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import tokenprune as tp
from conftest import FAMILIES, make_sample, stock_logits, takes_video, tiny_vlm
from helpers import (LayerSpy, assert_cached_decoding_equals_recompute, final_logits, forced_generation, layers_by_hand,
                     rotary_tables, stock_decoder_call)
from tokenprune.engine.contract import DecoderInput
from tokenprune.methods._budget import budget_fraction
from tokenprune.methods.base import ModelInfo
from tokenprune.methods.pool import (Pool, adaptive_windows, grid_positions, mean_positions, plan_grid,
                                     stride_windows)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LLAVA_INFO = ModelInfo(num_layers=32, rope="1d", family="llava", reindex_positions=True)
QWEN_INFO = ModelInfo(num_layers=28, rope="mrope", family="qwen25vl", reindex_positions=False)


def as_image(x, h, w):  # [h*w, d] raster rows -> [1, d, h, w]
    return x.reshape(h, w, -1).permute(2, 0, 1)[None]


def as_rows(image):  # [1, d, h, w] -> [h*w, d]
    return image[0].permute(1, 2, 0).reshape(-1, image.shape[1])


def test_stride_one_is_the_identity():
    x = torch.randn(20, 7)
    for mode in ("avg", "max"):
        assert torch.equal(plan_grid((1, 4, 5), mode, stride=1).apply(x), x)


def test_four_by_four_to_two_by_two_by_hand():
    x = torch.arange(16.0)[:, None]  # cell value = row * 4 + col
    pooled = plan_grid((1, 4, 4), "avg", stride=2).apply(x)
    assert pooled[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # (0+1+4+5)/4, (2+3+6+7)/4, ...
    assert plan_grid((1, 4, 4), "max", stride=2).apply(x)[:, 0].tolist() == [5.0, 7.0, 13.0, 15.0]


def test_five_by_five_ceil_windows():
    x = torch.arange(25.0)[:, None]
    pooling = plan_grid((1, 5, 5), "avg", stride=2)
    assert pooling.out_shape == (1, 3, 3) and stride_windows(5, 2) == [(0, 2), (2, 4), (4, 5)]
    pooled = pooling.apply(x)[:, 0]
    assert pooled[0] == (0 + 1 + 5 + 6) / 4 and pooled[2] == (4 + 9) / 2 and pooled[8] == 24  # in-range cells only
    y = torch.randn(35, 6)  # 5 x 7 grid, stride 2 and 3, against PyTorch's ceil-mode pooling
    for stride in (2, 3, 4):
        expected = F.avg_pool2d(as_image(y, 5, 7), stride, stride, ceil_mode=True)
        torch.testing.assert_close(plan_grid((1, 5, 7), "avg", stride=stride).apply(y), as_rows(expected))
        expected = F.max_pool2d(as_image(y, 5, 7), stride, stride, ceil_mode=True)
        assert torch.equal(plan_grid((1, 5, 7), "max", stride=stride).apply(y), as_rows(expected))


def test_adaptive_bins_equal_adaptive_pooling():
    y = torch.randn(24 * 24, 5)
    for out in ((11, 11), (7, 13), (24, 24), (1, 1)):
        pooling = plan_grid((1, 24, 24), "avg", out=out)
        torch.testing.assert_close(pooling.apply(y), as_rows(F.adaptive_avg_pool2d(as_image(y, 24, 24), out)))
        pooling = plan_grid((1, 24, 24), "max", out=out)
        assert torch.equal(pooling.apply(y), as_rows(F.adaptive_max_pool2d(as_image(y, 24, 24), out)))
    assert adaptive_windows(5, 3) == [(0, 2), (1, 4), (3, 5)]  # overlapping bins, as PyTorch


def test_budget_fraction_picks_the_scaled_grid():
    sides = {budget: plan_grid((1, 24, 24), fraction=budget_fraction(576, budget)).out_shape
             for budget in (192, 144, 128, 64, 1, 576, 0.25)}
    assert sides == {192: (1, 14, 14), 144: (1, 12, 12), 128: (1, 11, 11), 64: (1, 8, 8), 1: (1, 1, 1),
                     576: (1, 24, 24), 0.25: (1, 12, 12)}
    assert plan_grid((1, 6, 10), fraction=0.25).out_shape == (1, 3, 5)  # each axis scaled by sqrt(f)
    assert Pool(budget=128).plan((1, 24, 24), fraction=budget_fraction(576, 128)).num_out == 121


def test_bilinear_equals_llava_onevision_apply_pooling():
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    stub = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=98, patch_size=14)))
    features = torch.randn(3, 49, 8)  # 3 frames of 7 x 7
    expected = LlavaOnevisionModel.apply_pooling(stub, features)  # [3, 16, 8]
    pooling = plan_grid((1, 7, 7), "bilinear", stride=2)
    got = torch.stack([pooling.apply(frame) for frame in features])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # separable vs 2-D kernel: float32 order


def test_temporal_stride_equals_avg_pool3d():
    y = torch.randn(5 * 4 * 6, 3)  # 5 temporal groups of 4 x 6
    pooling = plan_grid((5, 4, 6), "avg", stride=2, t_stride=2)
    assert pooling.out_shape == (3, 2, 3)
    video = y.reshape(5, 4, 6, 3).permute(3, 0, 1, 2)[None]  # [1, d, t, h, w]
    expected = F.avg_pool3d(video, 2, 2, ceil_mode=True)[0].permute(1, 2, 3, 0).reshape(-1, 3)
    torch.testing.assert_close(pooling.apply(y), expected)


def test_weights_reproduce_the_values_and_side_inputs_pool_alike():
    y = torch.randn(30, 4, dtype=torch.float64)
    for mode in ("avg", "bilinear"):
        pooling = plan_grid((1, 5, 6), mode, stride=2)
        torch.testing.assert_close(pooling.weights() @ y, pooling.apply(y), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pooling.weights().sum(-1), torch.ones(pooling.num_out, dtype=torch.float64))
    side = torch.randn(30, 2, 3)  # any trailing shape (e.g. DeepStack features): the same windows
    assert plan_grid((1, 5, 6), "max").apply(side).shape == (9, 2, 3)


def test_sparse_entries_are_the_separable_window_weights():
    """``entries()`` (what the engine hands on: never the dense [n_out, n] matrix) = the non-zeros of the Kronecker
    product of the per-axis weights, bitwise, in every mode."""
    for shape, fields in (((1, 5, 7), dict(stride=2)), ((3, 4, 6), dict(stride=3, t_stride=2)),
                          ((1, 24, 24), dict(fraction=128 / 576)), ((1, 7, 7), dict(mode="bilinear", stride=2)),
                          ((2, 5, 5), dict(mode="max", stride=2))):
        pooling = plan_grid(shape, **fields)
        wt, wh, ww = pooling.axis_weights()
        dense = torch.kron(torch.kron(wt, wh), ww)
        out, member = dense.nonzero(as_tuple=True)
        assert [x.tolist() for x in pooling.entries()] == [out.tolist(), member.tolist(), dense[out, member].tolist()]


def test_mean_positions_by_hand():
    pooling = plan_grid((1, 3, 3), "avg", stride=2)  # windows rows/cols (0, 2), (2, 3)
    positions = torch.arange(10, 19)[None]  # 1-D positions of the 9 cells
    # cells {10, 11, 13, 14} -> 12; {12, 15} -> 13.5 -> 14 (half to even); {16, 17} -> 16.5 -> 16; {18}
    assert mean_positions(positions, pooling).tolist() == [[12, 14, 16, 18]]


def test_grid_positions_one_d_renumber():
    positions = torch.arange(30)[None]
    sources = [(5, 21, plan_grid((1, 4, 4), stride=2))]  # 16 rows -> 4
    assert grid_positions(positions, sources).tolist() == [list(range(18))]


def _qwen_rope_index(segments):
    """The stock Qwen2.5-VL rope index for a sequence of ("text", n) / ("image", (h, w)) / ("video", (t, h, w))
    (h, w in LLM tokens): positions [3, L]."""
    from tokenprune.models.zoo.tiny import QWEN_SPECIALS, tiny_qwen25vl_config
    from transformers import Qwen2_5_VLModel

    config = tiny_qwen25vl_config()
    model = _qwen_rope_index.__dict__.setdefault("model", Qwen2_5_VLModel(config))
    ids, types, images, videos = [], [], [], []
    for kind, value in segments:
        if kind == "text":
            ids += [QWEN_SPECIALS.index("<|endoftext|>") + 20] * value
            types += [0] * value
        else:
            t, h, w = (1, *value) if kind == "image" else value
            token = config.image_token_id if kind == "image" else config.video_token_id
            ids[-1:] = [config.vision_start_token_id]
            ids += [token] * (t * h * w)
            types += [1 if kind == "image" else 2] * (t * h * w)
            (images if kind == "image" else videos).append([t, 2 * h, 2 * w])
    ids, types = torch.tensor([ids]), torch.tensor([types])
    position_ids, _ = model.get_rope_index(ids, types, torch.tensor(images) if images else None,
                                           torch.tensor(videos) if videos else None,
                                           second_per_grid_ts=torch.ones(len(videos)) if videos else None)
    return position_ids[:, 0]  # [3, L]


def test_grid_positions_equal_qwen_rope_index_of_the_pooled_grids():
    # text 5, image 6 x 8, text 4, video of 3 temporal groups of 4 x 4, text 3, image 5 x 5, text 2
    original = [("text", 5), ("image", (6, 8)), ("text", 4), ("video", (3, 4, 4)), ("text", 3), ("image", (5, 5)),
                ("text", 2)]
    positions = _qwen_rope_index(original)
    poolings = [plan_grid((1, 6, 8), stride=2), plan_grid((3, 4, 4), stride=3), plan_grid((1, 5, 5), stride=2)]
    starts = [5, 5 + 48 + 4, 5 + 48 + 4 + 48 + 3]
    sources = [(s, s + p.shape[0] * p.shape[1] * p.shape[2], p) for s, p in zip(starts, poolings)]
    pooled = [("text", 5), ("image", (3, 4)), ("text", 4), ("video", (3, 2, 2)), ("text", 3), ("image", (3, 3)),
              ("text", 2)]
    assert torch.equal(grid_positions(positions, sources), _qwen_rope_index(pooled))
    # temporal pooling: a pooled group takes its window's first group's time (a video sampled at 1/t_stride)
    video = _qwen_rope_index([("text", 3), ("video", (5, 2, 2)), ("text", 2)])
    got = grid_positions(video, [(3, 23, plan_grid((5, 2, 2), stride=1, t_stride=2))])
    times = video[0, 3:23:4][[0, 2, 4]]  # groups 0, 2, 4 start the windows
    assert got[0, 3:15].tolist() == times.repeat_interleave(4).tolist()
    assert got[:, 15:].tolist() == [[5, 6]] * 3  # 3 + max(2, 2): the spatial extent, as the stock rope index


def test_settings_defaults_and_validation():
    pool = Pool()
    assert pool.position_rule(LLAVA_INFO) == "reindex" and pool.position_rule(QWEN_INFO) == "keep"
    assert Pool(positions="grid").position_rule(QWEN_INFO) == "grid" and pool.plan((1, 24, 24)).out_shape == (1, 12, 12)
    with pytest.raises(ValueError, match=r"pool\.positions='reindex' .* not defined"):
        Pool(positions="reindex").validate(QWEN_INFO)
    with pytest.raises(ValueError, match=r"pool\.mode='max' is not a weighted sum"):
        Pool(mode="max").validate(ModelInfo(num_layers=4, family="qwen3vl", side_inputs=True))
    Pool(mode="max").validate(QWEN_INFO)
    assert Pool(stride=3).plan((1, 24, 24)).num_out == 64
    bad = [({"budget": 0}, r"pool\.budget must be"), ({"budget": 64, "stride": 2}, "at most one of budget, stride"),
           ({"stride": 0}, r"pool\.stride must be an integer >= 1"), ({"t_stride": 1.5}, r"pool\.t_stride"),
           ({"mode": "median"}, r"pool\.mode must be one of \['avg', 'max', 'bilinear'\]"),
           ({"positions": "mean"}, r"pool\.positions must be one of \['auto', 'keep', 'reindex', 'grid'\]"),
           ({"mode": "bilinear", "t_stride": 2}, r"pool\.t_stride must be 1 with mode='bilinear'")]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            Pool(**fields)
    with pytest.raises(ValueError, match="needs the sample's token fraction"):
        Pool(budget=0.5).plan((1, 4, 4))


# ---------------------------------------------------------------------------------------------------------
# In the engine, on every family (tiny random models: one 6 x 6 image, fp32)
# ---------------------------------------------------------------------------------------------------------
def test_keeping_every_cell_gives_the_stock_logits(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(61))
    for fields in ({"stride": 1}, {"budget": 1.0}, {"stride": 1, "mode": "max"}):
        if fields.get("mode") == "max" and vlm.info().side_inputs:  # Qwen3-VL's DeepStack: refused, even at stride 1
            with pytest.raises(ValueError, match=rf"pool\.mode='max' is not a weighted sum: the {vlm.adapter.family} "):
                with tp.apply(vlm.model, "pool", **fields):
                    pass
            continue
        with torch.no_grad(), tp.apply(vlm.model, "pool", **fields):
            assert torch.equal(vlm.model(**inputs).logits, stock_logits(vlm, inputs)), fields


def pooled_by_hand(vlm, inputs, rule: str):
    """Decoder input of the image pooled 2 x 2 (6 x 6 → 3 x 3) by hand: embeddings (float64 window means), the
    positions of ``rule``, and the side inputs (Qwen3-VL's DeepStack features) pooled with the same window means;
    ``grid`` on mRoPE from the model's own rope index of the pooled input."""
    call = stock_decoder_call(vlm, inputs)
    embeds, positions = call["embeds"][0], call["positions"][0]  # [L, d], [P, L]
    visual = inputs.layout.visual_rows()
    start, grid = int(visual[0]), visual.view(6, 6)
    windows = [grid[2 * i: 2 * i + 2, 2 * j: 2 * j + 2].flatten() for i in range(3) for j in range(3)]
    after = torch.arange(int(visual[-1]) + 1, embeds.shape[0])

    def pool_rows(x):  # [L, d] → [L', d]: the image's rows replaced by its window means
        pooled = torch.stack([x[w].double().mean(0) for w in windows]).to(x.dtype)
        return torch.cat([x[:start], pooled, x[after]])

    new_embeds = pool_rows(embeds)
    side = {layer: pool_rows(values[0])[None] for layer, values in call["side"].items()}
    length = new_embeds.shape[0]
    if rule == "keep":
        means = torch.tensor([[round(float(positions[p, w].double().mean())) for w in windows]
                              for p in range(positions.shape[0])])
        new_positions = torch.cat([positions[:, :start], means, positions[:, after]], dim=1)
    elif positions.shape[0] == 1:  # reindex / grid on 1-D RoPE: contiguous
        new_positions = torch.arange(length)[None]
    else:  # grid on mRoPE: the stock rope index of the pooled prompt (a native 3 x 3 image)
        keep = torch.cat([torch.arange(start + 9), after])
        ids = inputs["input_ids"][:, keep]
        types = inputs["mm_token_type_ids"][:, keep]
        outer = vlm.adapter.outer_model(vlm.model)
        thw = inputs["image_grid_thw"].clone()
        thw[0, 1:] = 6  # 3 x 3 LLM tokens = 6 x 6 patches
        new_positions = outer.get_rope_index(ids, types, image_grid_thw=thw)[0][:, 0]
    return new_embeds[None], new_positions[None], side


@pytest.mark.parametrize("positions", ["auto", "keep", "reindex", "grid"])
def test_pooled_prefill_equals_a_hand_built_reference(family, positions):
    vlm = tiny_vlm(family)
    info = vlm.info()
    if positions == "reindex" and not info.reindex_positions:
        with pytest.raises(ValueError, match=r"pool\.positions='reindex'"):
            with tp.apply(vlm.model, "pool", positions="reindex"):
                pass
        return
    rule = Pool(positions=positions).position_rule(info)
    inputs = vlm.prepare(make_sample(62))
    embeds, new_positions, side = pooled_by_hand(vlm, inputs, rule)
    with torch.no_grad():
        reference = final_logits(vlm, layers_by_hand(vlm, embeds, new_positions, side,
                                                     range(len(vlm.adapter.layers(vlm.model)))))
        with tp.apply(vlm.model, "pool", positions=positions) as session, LayerSpy(vlm, 0) as spy:
            logits = vlm.model(**inputs).logits[0]
    entering = spy.calls[0]
    torch.testing.assert_close(entering["hidden"], embeds, rtol=0, atol=1e-7)  # fp32 weights x rows vs fp64 means
    for got, want in zip(entering["tables"], rotary_tables(vlm, new_positions)):
        assert torch.equal(got, want)  # exactly the positions of the rule
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)  # fp32, rounding of the means only
    report = session.last_report
    assert report.visual_entering_decoder == 9 and report.layer_visual == [9] * 6


@pytest.mark.parametrize("positions", ["auto", "grid"])
def test_cached_generation_equals_recomputing_the_pooled_prefill(family, positions):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(63))
    steps = 3
    with torch.no_grad(), tp.apply(vlm.model, "pool", positions=positions):
        out = vlm.model.generate(**inputs, **forced_generation(vlm, steps))
    # pooling does not depend on the text: the method itself recomputes the same pooled prefill
    assert_cached_decoding_equals_recompute(vlm, inputs, out, Pool(positions=positions), steps)


def test_budget_modes_and_side_inputs(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(64))
    modes = [({"budget": 9}, 9), ({"budget": 0.25}, 9), ({"stride": 4}, 4), ({"mode": "bilinear"}, 9)]
    for fields, visual in modes + ([] if vlm.info().side_inputs else [({"mode": "max"}, 9)]):
        with torch.no_grad(), tp.apply(vlm.model, "pool", **fields) as session:
            vlm.model(**inputs)
        assert session.last_report.visual_entering_decoder == visual, fields
    seq = DecoderInput(torch.zeros(1, 8, 4), torch.zeros(1, 1, 8, dtype=torch.long), inputs.layout,
                       side={1: torch.zeros(1, 8, 4)})
    with pytest.raises(ValueError, match=r"pool\.mode='max' cannot merge"):
        Pool(mode="max").before_llm(seq)


def test_video_temporal_pooling():
    from test_prunevid_decode import video_inputs

    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = video_inputs(vlm, frames=8, size=84)  # 4 temporal groups of 3 x 3
    assert [(g.rows, g.cols) for g in inputs.layout.groups] == [(3, 3)] * 4
    with torch.no_grad(), tp.apply(vlm.model, "pool", stride=2, t_stride=2, positions="grid") as session:
        vlm.model(**inputs)
    assert session.last_report.visual_entering_decoder == 2 * 2 * 2  # 4 → 2 groups, 3 x 3 → 2 x 2 (ceil)


@pytest.mark.parametrize("family", [name for name in FAMILIES if takes_video(name)])
def test_video_grid_positions_equal_the_models_own_rope_index_of_the_pooled_video(family):
    """4 temporal groups of 3 x 3 pooled 2 x 2 (ceil) with positions='grid': the layer-0 rotary tables are those of
    the model's own rope index of a native video of 2 x 2 tokens per group (Qwen3-VL: one run per frame, a
    timestamp before each, positioned run by run)."""
    from test_prunevid_decode import video_inputs

    vlm = tiny_vlm(family)
    inputs = video_inputs(vlm, frames=8, size=84)
    layout = inputs.layout
    assert [(g.rows, g.cols) for g in layout.groups] == [(3, 3)] * 4
    kept = torch.ones(layout.length, dtype=torch.bool)  # the pooled input's rows: the first 4 of each group
    for group in range(4):
        kept[layout.group_rows(group)[4:]] = False
    extra = {key: inputs[key] for key in ("second_per_grid_ts",) if key in inputs}
    outer = vlm.adapter.outer_model(vlm.model)
    thw = inputs["video_grid_thw"].clone()
    thw[0, 1:] = 4  # 2 x 2 LLM tokens = 4 x 4 patches
    positions, _ = outer.get_rope_index(inputs["input_ids"][:, kept], inputs["mm_token_type_ids"][:, kept],
                                        video_grid_thw=thw, **extra)
    with torch.no_grad(), tp.apply(vlm.model, "pool", stride=2, positions="grid") as session, \
            LayerSpy(vlm, 0) as spy:
        vlm.model(**inputs)
    assert session.last_report.visual_entering_decoder == 16
    for got, want in zip(spy.calls[0]["tables"], rotary_tables(vlm, positions.permute(1, 0, 2))):
        assert torch.equal(got, want)
    if vlm.adapter.video_runs_per_frame:  # a temporal window would span two runs
        with pytest.raises(ValueError, match=rf"pool\.positions='grid' with t_stride=2 is not defined for the "
                                             rf"{vlm.adapter.family} family"):
            with torch.no_grad(), tp.apply(vlm.model, "pool", stride=2, t_stride=2, positions="grid"):
                vlm.model(**inputs)
    with torch.no_grad(), tp.apply(vlm.model, "pool", stride=2, t_stride=2, positions="keep") as session:
        vlm.model(**inputs)
    assert session.last_report.visual_entering_decoder == 2 * 2 * 2
