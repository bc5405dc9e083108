"""Done-when 2: FastV and PDrop kept indices equal a brute-force reference from eager attention probabilities.

The models have sharpened attention (conftest.sharp_tiny_vlm) so that rankings depend on content, not only on
causality; ``test_the_reference_is_not_positional`` checks that the selections are not simply the earliest or
latest tokens.

The reference runs the stock model with eager attention and output_attentions=True (full maps, built only
here), takes the head mean of the relevant layer's probabilities at the relevant query rows and image
columns, and ranks them. tokenprune computes its scores lazily with SDPA in the main pass.
"""

import pytest
import torch

import tokenprune as tp
from conftest import make_sample, sharp_tiny_vlm as tiny_vlm
from helpers import current_rows, eager_attentions, topk_original


@pytest.mark.parametrize("query", ["last", "mean"])
@pytest.mark.parametrize("layer,keep_ratio", [(1, 0.5), (2, 0.25), (4, 0.125)])
def test_fastv_matches_eager_reference(family, layer, keep_ratio, query):
    vlm = tiny_vlm(family, "eager")
    inputs = vlm.prepare(make_sample(5))
    layout = inputs.layout
    attentions, _ = eager_attentions(vlm, inputs)
    mean_heads = attentions[layer - 1].mean(0)  # [L, L]
    visual = layout.visual_rows()
    scores = mean_heads[-1, visual] if query == "last" else mean_heads[:, visual].mean(0)
    k = round(visual.numel() * keep_ratio)
    expected = topk_original(scores, visual.tolist(), k)

    sdpa = tiny_vlm(family, "sdpa")
    with torch.no_grad(), tp.apply(sdpa.model, "fastv", layer=layer, keep_ratio=keep_ratio, query=query) as session:
        sdpa.model(**inputs)
    report = session.last_report
    assert set(report.kept[layer]) == expected
    assert report.layer_visual == [visual.numel()] * layer + [k] * (len(report.layer_visual) - layer)
    assert report.layer_tokens[layer] == layout.length - visual.numel() + k


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_pdrop_matches_eager_reference_stage_by_stage(family, positions):
    if positions == "reindex" and not tiny_vlm(family).info().reindex_positions:
        pytest.skip("reindex is defined for 1-D RoPE only (tested to raise in test_validation)")
    layers, ratios = [1, 3, 5], [0.5, 0.25, 0.125]
    vlm = tiny_vlm(family, "eager")
    inputs = vlm.prepare(make_sample(6))
    layout = inputs.layout
    n_visual = layout.num_visual
    with torch.no_grad(), tp.apply(vlm.model, "pdrop", layers=layers, ratios=ratios, positions=positions) as session:
        vlm.model(**inputs)
    full_run = session.last_report

    for stage, layer in enumerate(layers):
        # reference: earlier boundaries applied, this one disabled; eager maps of layer `layer` itself
        earlier = tp.methods.create("pdrop", layers=layers[:stage], ratios=ratios[:stage], positions=positions) \
            if stage else None
        attentions, report = eager_attentions(vlm, inputs, earlier)
        kept_before = report.kept[layers[stage - 1]] if stage else layout.visual_rows().tolist()
        rows = current_rows(layout, kept_before)
        columns = [i for i, original in enumerate(rows) if original in set(kept_before)]
        scores = attentions[layer].mean(0)[-1, columns]
        k = int(n_visual * ratios[stage])
        expected = topk_original(scores, [rows[c] for c in columns], k)
        assert set(full_run.kept[layer]) == expected, f"stage {stage} (layer {layer})"
        assert set(full_run.kept[layer]) <= set(kept_before)  # nested


def test_pdrop_first_boundary_is_the_same_under_keep_and_reindex():
    vlm = tiny_vlm("tiny_llava")
    inputs = vlm.prepare(make_sample(7))
    kept = {}
    for positions in ("keep", "reindex"):
        with torch.no_grad(), tp.apply(vlm.model, "pdrop", layers=[2, 4], ratios=[0.5, 0.25], positions=positions) as s:
            vlm.model(**inputs)
        kept[positions] = s.last_report.kept[2]
    assert kept["keep"] == kept["reindex"]


def test_fastv_selection_is_ascending_and_keeps_every_text_row(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(8))
    layout = inputs.layout
    seen = {}

    def spy(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    with torch.no_grad(), tp.apply(vlm.model, "fastv", layer=2, keep_ratio=0.25) as session:
        handle = vlm.adapter.text_model(vlm.model).layers[2].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            vlm.model(**inputs)
        finally:
            handle.remove()
    kept_visual = session.last_report.kept[2]
    k = round(layout.num_visual * 0.25)
    assert len(kept_visual) == k
    assert seen["hidden"].shape[1] == layout.length - layout.num_visual + k
    assert kept_visual == sorted(kept_visual)


def test_the_reference_is_not_positional(family):
    """The selections compared above are content-dependent: neither the first nor the last k visual tokens."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(5))
    visual = inputs.layout.visual_rows().tolist()
    for name, fields, layer in (("fastv", {"layer": 2, "keep_ratio": 0.25}, 2),
                                ("pdrop", {"layers": [1, 3], "ratios": [0.5, 0.25]}, 3)):
        with torch.no_grad(), tp.apply(vlm.model, name, **fields) as session:
            vlm.model(**inputs)
        kept = session.last_report.kept[layer]
        assert kept not in (visual[: len(kept)], visual[-len(kept):]), (name, kept)
