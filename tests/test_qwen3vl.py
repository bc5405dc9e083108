"""Qwen3-VL: DeepStack features follow the surviving rows at any prune layer, scores and partial layers use the
stock q/k-norm attention, and videos (one placeholder run per temporal step, timestamp text between) work through
the processor from a real mp4 with every method.

References: the stock decoder layers run one by one (``helpers.stock_decoder_call`` gives the DeepStack features
the stock loop would add), with the pruned rows and their features gathered by hand; eager attention maps of
the stock model; the processor's own ``video_grid_thw``.
"""

from __future__ import annotations

import json

import pytest
import torch

import tokenprune as tp
from conftest import make_sample, stock_logits, tiny_vlm
from helpers import stock_decoder_call
from tokenprune.data.synthetic import SyntheticVideoQA
from tokenprune.engine.contract import VIDEO

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAME = "tiny_qwen3vl"


# ---------------------------------------------------------------------------------------------------------
# DeepStack follows the survivors
# ---------------------------------------------------------------------------------------------------------
def reference_logits(vlm, inputs, kept: dict[int, list[int]], features: str = "gathered") -> torch.Tensor:
    """Logits of every surviving row: the stock layers one by one; at each layer in ``kept`` (layer -> original
    rows of the surviving visual tokens) the rows are gathered after that layer's DeepStack feature is added.
    ``features``: "gathered" (each later feature follows the survivors), "dropped" (later features omitted) or
    "first" (the features of the first visual rows instead of the survivors': a gather left out)."""
    text_model = vlm.adapter.text_model(vlm.model)
    call = stock_decoder_call(vlm, inputs)
    hidden, positions, side = call["embeds"], call["positions"], dict(call["side"])
    rows = torch.arange(hidden.shape[1])  # original row of each current row
    for index, layer in enumerate(text_model.layers):
        if index in side:
            hidden = hidden + side.pop(index)
        if index in kept:
            visual = inputs.layout.is_visual[rows]
            survive = ~visual | torch.isin(rows, torch.tensor(kept[index]))
            index_rows = survive.nonzero().flatten()
            hidden, positions, rows = hidden[:, index_rows], positions[:, :, index_rows], rows[index_rows]
            for later, values in side.items():
                if features == "gathered":
                    side[later] = values[:, index_rows]
                elif features == "dropped":
                    side[later] = torch.zeros_like(values[:, index_rows])
                else:  # the first rows' features: what indexing a full-length mask against a shorter sequence gives
                    is_visual_now = inputs.layout.is_visual[rows]
                    stacked = values[0, inputs.layout.is_visual][: int(is_visual_now.sum())]
                    shifted = torch.zeros_like(values[:, index_rows])
                    shifted[0, is_visual_now] = stacked
                    side[later] = shifted
        tables = text_model.rotary_emb(hidden, positions.permute(1, 0, 2))
        hidden = layer(hidden, attention_mask=None, position_embeddings=tables)
    return vlm.model.lm_head(text_model.norm(hidden))[0]


@pytest.mark.parametrize("layer", [1, 2, 3, 4])
def test_fastv_at_and_across_the_deepstack_layers_equals_a_hand_gathered_reference(layer):
    vlm = tiny_vlm(NAME)
    inputs = vlm.prepare(make_sample(51))
    with torch.no_grad(), tp.apply(vlm.model, "fastv", layer=layer, keep_ratio=0.25) as session:
        logits = vlm.model(**inputs).logits[0]
    kept = session.last_report.kept
    with torch.no_grad():
        assert torch.equal(logits, reference_logits(vlm, inputs, kept))  # bitwise: same kernels, same numbers
        if layer < 3:  # features still to come (layers 2, 3): leaving out their gather changes the logits
            for wrong in ("dropped", "first"):
                assert not torch.allclose(logits, reference_logits(vlm, inputs, kept, wrong), rtol=1e-4, atol=1e-4)


def test_pdrop_across_the_deepstack_layers_equals_a_hand_gathered_reference():
    vlm = tiny_vlm(NAME)
    inputs = vlm.prepare(make_sample(52))
    with torch.no_grad(), tp.apply(vlm.model, "pdrop", layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]) as session:
        logits = vlm.model(**inputs).logits[0]
    report = session.last_report
    n = inputs.layout.num_visual
    assert report.layer_visual == [n, n // 2, n // 4, n // 8, n // 8, n // 8]
    with torch.no_grad():
        assert torch.equal(logits, reference_logits(vlm, inputs, report.kept))
        assert not torch.allclose(logits, reference_logits(vlm, inputs, report.kept, "dropped"), rtol=1e-4, atol=1e-4)


def test_the_stock_model_cannot_prune_below_the_deepstack_layers_and_the_engine_can():
    """What the engine replaces: the stock loop adds DeepStack through a full-length mask, so a shortened sequence
    breaks it; under tokenprune the same prune runs, and keeping everything gives the stock logits bitwise."""
    vlm = tiny_vlm(NAME)
    inputs = vlm.prepare(make_sample(53))
    text_model = vlm.adapter.text_model(vlm.model)
    def drop_first_row(module, args, kwargs):  # a consistent shorter sequence: rows, rotary tables, no mask
        kwargs["position_embeddings"] = tuple(t[:, 1:] for t in kwargs["position_embeddings"])
        return (args[0][:, 1:], *args[1:]), kwargs

    handle = text_model.layers[1].register_forward_pre_hook(drop_first_row, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(IndexError, match="mask"):
            vlm.model(**inputs, use_cache=False)  # the stock _deepstack_process after layer 1
    finally:
        handle.remove()
    reference = stock_logits(vlm, inputs)
    with torch.no_grad(), tp.apply(vlm.model, "fastv", layer=1, keep_ratio=1.0):
        assert torch.equal(vlm.model(**inputs).logits, reference)


def test_a_pre_llm_merge_merges_the_deepstack_features_with_the_same_weights():
    """``test_reduction`` checks this on every family; here the Qwen3-VL side: a merge before the decoder changes
    what DeepStack adds, so ignoring the weights (plain gather of the first member) would give other logits."""
    from test_reduction import PairMergeBefore

    vlm = tiny_vlm(NAME)
    inputs = vlm.prepare(make_sample(54))
    call = stock_decoder_call(vlm, inputs)
    assert sorted(call["side"]) == [1, 2, 3] and all(bool(v.abs().sum()) for v in call["side"].values())
    with torch.no_grad(), tp.apply(vlm.model, PairMergeBefore()) as session:
        vlm.model(**inputs)
    assert session.last_report.visual_entering_decoder == inputs.layout.num_visual // 2


# ---------------------------------------------------------------------------------------------------------
# The stock q/k-norm attention in scores
# ---------------------------------------------------------------------------------------------------------
def test_scores_apply_the_q_k_norms_as_the_stock_attention():
    """FastV's scores equal the stock eager attention maps; without the q/k norms they would not."""
    from tokenprune.engine.attention import AttentionMath, QKNormAttentionMath

    eager = tiny_vlm(NAME, "eager")
    inputs = eager.prepare(make_sample(55))
    with torch.no_grad():
        out = eager.model(**inputs, output_attentions=True)
    maps = out.attentions[1][0].float()  # [H, L, L] layer 1
    seen = {}

    class Spy(tp.methods.create("fastv").__class__):
        def select(self, step):
            seen["scores"] = step.attention(layer=1, queries="last", keys="all", heads="none")
            return super().select(step)

    with torch.no_grad(), tp.apply(eager.model, Spy(layer=2, keep_ratio=0.5)):
        eager.model(**inputs)
    torch.testing.assert_close(seen["scores"][:, 0], maps[:, -1], rtol=0, atol=1e-6)  # fp32 softmax
    layer = eager.adapter.text_model(eager.model).layers[1]
    assert isinstance(eager.adapter.attention_math(layer), QKNormAttentionMath)
    x = layer.input_layernorm(torch.randn(1, 3, layer.self_attn.config.hidden_size))
    assert not torch.allclose(AttentionMath(layer).queries(x), QKNormAttentionMath(layer).queries(x))


# ---------------------------------------------------------------------------------------------------------
# Video: one run per temporal step, timestamps between
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    """An 8-frame, 4 fps, 112 x 112 synthetic video written as a real H.264 mp4."""
    dataset = SyntheticVideoQA(n_samples=1, frames=8, fps=4.0, format="mp4",
                               cache_dir=str(tmp_path_factory.mktemp("videos")))
    return dataset[0]


def prepare_video(vlm, sample):
    options, vlm.options = vlm.options, vlm.adapter.check_options(
        {"video": {"nframes": 8, "min_pixels": 112 * 112, "max_pixels": 112 * 112}})
    try:
        return vlm.prepare(sample)
    finally:
        vlm.options = options


def test_the_layout_of_a_video_matches_the_processors_grid_with_timestamps_between_frames(mp4):
    vlm = tiny_vlm(NAME)
    inputs = prepare_video(vlm, mp4)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    merge = vlm.model.config.vision_config.spatial_merge_size
    layout = inputs.layout
    assert (t, h // merge, w // merge) == (4, 4, 4)  # 8 frames / 2; 112 px / 14 / 2
    assert [(g.kind, g.source, g.frame, g.rows, g.cols) for g in layout.groups] == \
        [(VIDEO, 0, frame, h // merge, w // merge) for frame in range(t)]
    ids = inputs["input_ids"][0]
    runs = []  # placeholder runs: one per temporal step, text (timestamp, vision start / end) between them
    for frame in range(t):
        rows = layout.group_rows(frame)
        assert rows.numel() == (h // merge) * (w // merge) and bool((rows[1:] - rows[:-1] == 1).all())
        runs.append((int(rows[0]), int(rows[-1])))
    config = vlm.model.config
    for (_, end), (start, _) in zip(runs, runs[1:]):
        between = ids[end + 1 : start].tolist()
        assert config.vision_end_token_id in between and config.vision_start_token_id in between
        assert len(between) > 2  # the timestamp text "<t seconds>" as well
    # inside generate the grids are gone: the same layout from the 3-D positions and mm_encoder_outputs
    seen = []

    class Spy(tp.methods.create("uniform").__class__):
        def select(self, step):
            seen.append(step.layout)
            return super().select(step)

    with torch.no_grad(), tp.apply(vlm.model, Spy(layer=1, keep_ratio=0.5)):
        vlm.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert seen[0].groups == layout.groups and torch.equal(seen[0].group, layout.group)


@pytest.mark.parametrize("name", [n for n in tp.methods.available() if n != "baseline"])
def test_every_method_runs_on_a_real_mp4_with_timestamps(mp4, name):
    vlm = tiny_vlm(NAME)
    inputs = prepare_video(vlm, mp4)
    fields = {"prunevid": {"stage2_layer": 2}, "pdrop": {"layers": [1, 2, 3]}, "himap": {"image_layer": 4},
              "layerskip": {"mlp": [2, 3], "attn": [3]}}.get(name, {})
    with torch.no_grad(), tp.apply(vlm.model, name, **fields) as session:
        out = vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    report = session.last_report
    n = inputs.layout.num_visual
    if name == "prunevid":
        assert report.visual_entering_decoder < n and report.layer_visual[-1] < report.visual_entering_decoder
    elif name != "layerskip":
        assert report.layer_visual[-1] < n
    if name == "uniform":  # per frame: round(16 / 2) of each temporal step's 4 x 4 grid
        kept = torch.tensor(report.kept[fields.get("layer", 2)])
        assert torch.bincount(inputs.layout.group[kept], minlength=4).tolist() == [8, 8, 8, 8]


# ---------------------------------------------------------------------------------------------------------
# The MoE variant: the same family file, FLOPs of the top-k experts
# ---------------------------------------------------------------------------------------------------------
def test_the_moe_variant_runs_through_the_same_family():
    from tokenprune.engine.flops import layer_flops
    from tokenprune.models.qwen3vl import tiny_qwen3vl_config

    adapter = tp.models.adapter_named("qwen3vl")
    config = tiny_qwen3vl_config(layers=4, experts=4)  # top-2 of 4 experts of width 64, every layer sparse
    vlm = tp.models.VLM("tiny_qwen3vl_moe", adapter.build_random(config, torch.float32, "sdpa", 0).eval(),
                        adapter.tiny_processor(), adapter)
    assert type(vlm.model).__name__ == "Qwen3VLMoeForConditionalGeneration" and tp.models.adapter_for(vlm.model) is adapter
    inputs = vlm.prepare(make_sample(56))
    reference = stock_logits(vlm, inputs)
    with torch.no_grad():
        with tp.apply(vlm.model, "fastv", layer=1, keep_ratio=1.0):
            assert torch.equal(vlm.model(**inputs).logits, reference)
        with tp.apply(vlm.model, "fastv", layer=1, keep_ratio=0.25) as session:
            vlm.model(**inputs)
    n = inputs.layout.num_visual
    assert session.last_report.layer_visual == [n] + [round(n * 0.25)] * 3
    shape = adapter.decoder_shape(config.text_config)
    assert (shape.intermediate, shape.router) == (2 * 64, 4)
    T, d = inputs.layout.length, 64  # one layer by hand: q/o of 4 x 16, k/v of 2 x 16, causal scores, MoE MLP
    by_hand = 2 * T * d * 2 * 32 + 2 * T * d * 2 * 64 + 4 * 64 * T * (T + 1) // 2 + 2 * T * d * (3 * 2 * 64 + 4)
    assert layer_flops(shape, T) == by_hand


# ---------------------------------------------------------------------------------------------------------
# python -m tokenprune model=tiny_qwen3vl method=<each>
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", tp.methods.available())
def test_the_runner_runs_every_method_on_tiny_qwen3vl(tmp_path, method):
    """What ``python -m tokenprune model=tiny_qwen3vl method=<name>`` runs (in-process; one sample): the model's
    YAML (random weights) and the per-(model, method) settings that fit its 6 layers."""
    from hydra import compose, initialize_config_module

    from tokenprune.run.runner import run_benchmark

    with initialize_config_module("tokenprune.conf", version_base=None):
        cfg = compose("config", overrides=[f"run.output_dir={tmp_path}", "run.progress=false", "model=tiny_qwen3vl",
                                           f"method={method}", "run.n_samples=1", "run.paired=false",
                                           "model.device=cpu"])
    payload = run_benchmark(cfg)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and not any(run.get("error") for run in records[0]["runs"].values()), records
    assert payload is not None
