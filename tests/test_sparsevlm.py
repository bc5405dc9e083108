"""SparseVLM (``tokenprune/methods/sparsevlm.py``) against the card (``shared/methods/sparsevlm.md`` §8): the pure
algorithm (arithmetic, raters, merge, order, position rules), then the method in the engine on every family
(identity logits, every stage against eager attention maps and the reference DPC-KNN, the layer inputs and their
positions, cache lengths, cached decoding = recomputing the frozen stages).

References: NumPy for the raters, ``reference_dpc_knn`` (Python loops, from test_dpc_knn) for the recycling,
the card's arithmetic for the counts, the stock model's eager attention probabilities for the scores.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import tokenprune as tp
from conftest import make_sample, sharp_tiny_vlm, stock_logits, tiny_vlm
from helpers import (Frozen, LayerSpy, assert_cached_decoding_equals_recompute, forced_generation,
                     logits_after_a_reduction_by_hand, rotary_tables, stock_decoder_call)
from test_dpc_knn import reference_dpc_knn
from tokenprune.engine.compat import output_cache
from tokenprune.methods.base import ModelInfo, resolve_positions
from tokenprune.methods.sparsevlm import (OFFICIAL_COUNTS, OFFICIAL_POSITIONS, SparseVLM, fixed_keep,
                                          geometric_targets, official_equal_tokens, rank_keep, raters_from_relevance,
                                          recycle_sizes, recycle_tokens, recycled_positions, scaled_counts,
                                          select_raters, solve_keep, sparsify_stage, text_relevance)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stage_table(counts, num_visual=576):
    """(in, k, |P|, m, c, out) per stage with the official counts and recycling."""
    rows = []
    for count in counts:
        k = fixed_keep(count, num_visual)
        m, c = recycle_sizes(num_visual - k)
        rows.append((num_visual, k, num_visual - k, m, c, k + c))
        num_visual = k + c
    return rows


def test_official_arithmetic():
    # card §8.1 (retain 192) and §5 (128, 64)
    assert stage_table(OFFICIAL_COUNTS[192]) == [(576, 300, 276, 83, 9, 309), (309, 200, 109, 33, 4, 204),
                                                 (204, 110, 94, 29, 3, 113)]
    assert [row[-1] for row in stage_table(OFFICIAL_COUNTS[128])] == [312, 117, 39]
    assert [row[-1] for row in stage_table(OFFICIAL_COUNTS[64])] == [82, 32, 18]
    # the official "equal tokens": mean over 32 layers of the count after each layer's pruning (layers 2, 6, 15)
    for retain, official in ((192, 192.0), (128, 128.6), (64, 64.8)):
        outs = [row[-1] for row in stage_table(OFFICIAL_COUNTS[retain])]
        per_layer = [576] * 2 + [outs[0]] * 4 + [outs[1]] * 9 + [outs[2]] * 17
        assert round(sum(per_layer) / 32, 1) == official
    assert SparseVLM().stage_counts(576) == [300, 200, 110]
    assert SparseVLM(retain=64).stage_counts(1152) == [132, 60, 34]  # round(c * N / 576)
    assert scaled_counts([300, 200, 110], 100) == [52, 35, 19]  # 52.08, 34.72, 19.10


def test_raters_match_numpy():
    generator = torch.Generator().manual_seed(0)
    visual, text = torch.randn(30, 8, generator=generator), torch.randn(12, 8, generator=generator)
    v, t = visual.double().numpy(), text.double().numpy()
    logits = v @ t.T
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    relevance = soft.mean(0)
    np.testing.assert_allclose(text_relevance(visual, text).double().numpy(), relevance, rtol=1e-5, atol=0)
    expected = np.nonzero(relevance > relevance.mean())[0].tolist()
    assert 0 < len(expected) < 12
    assert select_raters(visual, text).tolist() == expected


def test_raters_are_strictly_above_the_mean():
    # exact binary fractions: mean .25, the two rows at exactly .25 do not rate
    assert raters_from_relevance(torch.tensor([0.25, 0.25, 0.5, 0.0])).tolist() == [2]
    # constant relevance (one text row, or identical rows): tokenprune's fallback, every row rates
    assert raters_from_relevance(torch.tensor([1.0])).tolist() == [0]
    assert select_raters(torch.randn(4, 3), torch.ones(3, 3)).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no text after"):
        select_raters(torch.randn(4, 3), torch.zeros(0, 3))


def test_recycling_equals_the_reference_dpc_knn_with_k_equal_c():
    # |P| = 80: m = 25, c = 3. (With c = 2 every mutual-nearest pair has the same density up to the 1e-6 noise,
    # below float32's resolution for close noise draws: the float64 reference may break such ties differently.)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(120, 6, generator=generator)
    scores = torch.rand(120, generator=generator)
    dropped = torch.cat([torch.arange(0, 60, 2), torch.arange(60, 110)])
    recycled = recycle_tokens(hidden, scores, dropped, seed=7)
    m, c = recycle_sizes(80)
    assert (m, c) == (25, 3)
    expected_candidates = sorted(dropped.tolist(), key=lambda r: (-float(scores[r]), r))[:m]
    assert recycled.candidates.tolist() == expected_candidates
    noise = torch.rand(1, m, generator=torch.Generator().manual_seed(7))[0]  # dpc_knn's seeded noise
    labels, centres, *_ = reference_dpc_knn(hidden[expected_candidates], c, c, noise)
    assert recycled.labels.tolist() == labels and recycled.centers.tolist() == centres
    x = hidden[expected_candidates].double()
    for r in range(c):  # official: sum of members / (size + 1e-6), centre order
        members = [i for i, label in enumerate(labels) if label == r]
        expected = x[members].sum(0) / (len(members) + 1e-6)
        torch.testing.assert_close(recycled.values[r].double(), expected, rtol=1e-6, atol=1e-6)
        assert recycled.members[r].tolist() == members
    torch.testing.assert_close(recycled.weights.sum(-1).double(),
                               torch.tensor([n / (n + 1e-6) for n in recycled.weights.gt(0).sum(-1).tolist()],
                                            dtype=torch.float64))


def test_one_cluster_is_the_mean_and_separated_blobs_are_recovered():
    hidden = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    recycled = recycle_tokens(hidden, torch.zeros(9), torch.arange(9), frac=1.0, div=10)  # m = 9, c = 1
    assert recycled.values.shape == (1, 4)
    torch.testing.assert_close(recycled.values[0], hidden.sum(0) / (9 + 1e-6), rtol=1e-6, atol=1e-6)
    # three blobs of 10: m = 30 with frac = 1 → int(30 * 1) + 1 capped at 30; div = 12 → c = int(30/12) + 1 = 3
    generator = torch.Generator().manual_seed(3)
    centres = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    blobs = torch.cat([centre + 0.1 * torch.randn(10, 3, generator=generator) for centre in centres])
    order = torch.randperm(30, generator=generator)
    truth = torch.arange(3).repeat_interleave(10)[order]
    recycled = recycle_tokens(blobs[order], torch.rand(30, generator=generator), torch.arange(30), frac=1.0, div=12)
    assert recycled.centers.numel() == 3
    groups = [set(truth[recycled.candidates[members]].tolist()) for members in recycled.members]
    assert sorted(len(members) for members in recycled.members) == [10, 10, 10] and all(len(g) == 1 for g in groups)
    for r, members in enumerate(recycled.members):
        blob = truth[recycled.candidates[members[0]]]
        torch.testing.assert_close(recycled.values[r], blobs[order][truth == blob].sum(0) / (10 + 1e-6))


def test_stage_order_counts_and_the_forced_drop():
    generator = torch.Generator().manual_seed(4)
    scores = torch.rand(40, generator=generator)
    hidden = torch.randn(40, 5, generator=generator)
    stage = sparsify_stage(scores, hidden, keep=25)
    assert stage.kept.tolist() == sorted(torch.argsort(scores, descending=True)[:25].tolist())  # ascending
    assert stage.dropped.tolist() == sorted(set(range(40)) - set(stage.kept.tolist()))
    assert stage.num_out == 25 + recycle_sizes(15)[1] == 26
    # the n_v - 1 cap always drops one; its single-member cluster is that row / (1 + 1e-6)
    stage = sparsify_stage(scores, hidden, keep=fixed_keep(300, 40))
    assert stage.kept.numel() == 39 and stage.dropped.tolist() == [int(scores.argmin())]
    torch.testing.assert_close(stage.recycled.values[0], hidden[int(scores.argmin())] / (1 + 1e-6))
    # no recycling; no pruning
    assert sparsify_stage(scores, hidden, keep=10, recycle=False).num_out == 10
    unchanged = sparsify_stage(scores, hidden, keep=None)
    assert unchanged.kept.tolist() == list(range(40)) and unchanged.recycled is None
    # ties: the lower row first
    tied = sparsify_stage(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), torch.randn(5, 2), keep=2)
    assert tied.kept.tolist() == [1, 2]
    assert tied.recycled.candidates.tolist() == [3]  # m = int(.3 * 3) + 1 = 1: the best dropped, row 3 before 0, 4


def test_recycled_positions_center_and_mean():
    hidden = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    recycled = recycle_tokens(hidden, torch.arange(8.0), torch.arange(8), frac=1.0, div=4)  # m = 8, c = 3
    positions = torch.stack([torch.arange(100, 108), torch.arange(10, 18) * 3, torch.arange(8) * 7])  # [3, 8]
    centre_rows = recycled.candidates[recycled.centers]
    assert torch.equal(recycled_positions(positions, recycled, "center"), positions[:, centre_rows])
    mean = recycled_positions(positions, recycled, "mean")
    for r, members in enumerate(recycled.members):
        rows = recycled.candidates[members]
        expected = [round(float(positions[axis, rows].double().mean())) for axis in range(3)]  # Python round: half even
        assert mean[:, r].tolist() == expected


def test_budget_targets_and_exact_solutions():
    assert geometric_targets(576, 64, 3) == [277, 133, 64]  # 576 * (1/9)^(1/3), (1/9)^(2/3), exactly 64
    assert geometric_targets(576, 576, 3) == [576, 576, 576]
    for num_visual in (7, 40, 576):
        reachable = range(recycle_sizes(num_visual)[1], num_visual)
        for target in reachable:
            k = solve_keep(num_visual, target)
            assert k is not None and k + recycle_sizes(num_visual - k)[1] == target
        assert solve_keep(num_visual, num_visual) is None and solve_keep(num_visual, num_visual + 5) is None
    assert solve_keep(576, 17, recycle=False) == 17
    with pytest.raises(ValueError, match="sparsevlm.budget: 5 visual tokens cannot be reached from 576"):
        solve_keep(576, 5)  # recycling alone adds int((int(.3 * 576) + 1) / 10) + 1 = 18


@pytest.mark.parametrize("budget", [1, 18, 64, 128, 192, 575, 576, 1000, 0.25])
def test_budget_gives_exactly_that_many_rows_after_the_last_stage(budget):
    method = SparseVLM(budget=budget)
    generator = torch.Generator().manual_seed(6)
    num_visual, n = 576, 576
    for stage in range(3):
        k = method.stage_keep(stage, n, num_visual)
        result = sparsify_stage(torch.rand(n, generator=generator), torch.randn(n, 4, generator=generator), k)
        n = result.num_out
    expected = min(budget, 576) if isinstance(budget, int) else 144
    assert n == expected
    if expected == 576:
        assert all(method.stage_keep(s, 576, 576) is None for s in range(3))  # budget >= N: nothing pruned


def test_rank_schedule():
    relation = torch.tensor([[1.0, 2, 3, 4, 5], [2, 4, 6, 8, 10], [0, 1, 0, 1, 0]])  # rank 2, n_v = 5
    assert rank_keep(relation, 1.5, 0) == 3 and rank_keep(relation, 0.8, 0) == 1 and rank_keep(relation, 9, 6) == 4
    assert rank_keep(torch.eye(4), 1.0, 0) is None  # full rank: no pruning at that stage
    assert SparseVLM(schedule="rank", rank_scale=1.5).stage_keep(0, 5, 5, relation) == 3


def test_settings_defaults_and_validation():
    method = SparseVLM()
    llava = ModelInfo(num_layers=32, rope="1d", family="llava", reindex_positions=True)
    qwen = ModelInfo(num_layers=28, rope="mrope", family="qwen25vl", reindex_positions=False)
    rule = lambda m, info: resolve_positions("sparsevlm", m.positions, OFFICIAL_POSITIONS, info)  # noqa: E731
    assert method.layers == [3, 7, 16] and rule(method, llava) == "reindex" and rule(method, qwen) == "keep"
    assert rule(SparseVLM(positions="keep"), llava) == "keep"
    with pytest.raises(ValueError, match=r"sparsevlm\.positions='reindex' .* not defined"):
        SparseVLM(positions="reindex").validate(qwen)
    assert SparseVLM(counts=[10, 5], layers=[2, 4]).stage_counts(576) == [10, 5]
    assert SparseVLM(layers=[]).layers == []  # prunes nothing (the identity case of card §8.6)
    bad = [({"retain": 100}, r"sparsevlm\.retain must be one of \[64, 96, 128, 192\]"),
           ({"budget": 0}, r"sparsevlm\.budget must be"), ({"budget": 64, "retain": 64}, "set at most one of"),
           ({"counts": [1, 2]}, r"sparsevlm\.counts must be 3 non-negative integers"),
           ({"layers": [3, 3]}, "strictly increasing"),
           ({"layers": [0, 3]}, r"sparsevlm\.layers\[0\] must be >= 1"),
           ({"layers": [2, 3, 4, 5]}, "retain gives 3 per-stage counts"),
           ({"schedule": "rank"}, r"sparsevlm\.rank_scale must be a number"),
           ({"schedule": "rank", "rank_scale": 1.0, "retain": 64}, "derives its counts from the rank"),
           ({"schedule": "adaptive"}, r"sparsevlm\.schedule must be one of \['fixed', 'rank'\]"),
           ({"recycle": 1}, r"sparsevlm\.recycle must be true or false"),
           ({"recycle_frac": 1.5}, r"sparsevlm\.recycle_frac"), ({"cluster_div": 0}, r"sparsevlm\.cluster_div"),
           ({"positions": "grid"}, r"sparsevlm\.positions must be one of"),
           ({"merged_position": "first"}, r"sparsevlm\.merged_position must be one of \['center', 'mean'\]")]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            SparseVLM(**fields)
    assert math.isclose(SparseVLM(budget=0.5).stage_counts(576)[-1], 288)


def test_official_equal_tokens():
    # card §5: the official "equal tokens" average (layer K_s - 1 counted as pruned) over 32 layers
    for retain, expected in ((192, 192.0), (128, 128.6), (64, 64.8)):
        outs = [row[-1] for row in stage_table(OFFICIAL_COUNTS[retain])]
        assert round(official_equal_tokens(576, [3, 7, 16], outs, 32), 1) == expected


# ---------------------------------------------------------------------------------------------------------
# In the engine, on every family (tiny random models, fp32; 6 layers: stages at the input of 2, 3, 4)
# ---------------------------------------------------------------------------------------------------------
LAYERS = [2, 3, 4]
MERGING = dict(counts=[64, 48, 32], recycle_frac=0.7)  # 36 tokens: keep 4 then recycle 23 into 3 clusters, ...


@dataclass
class Probe(SparseVLM):
    """SparseVLM recording what each stage saw and returned."""

    seen: list = field(default_factory=list)

    def select(self, step):
        reduction = super().select(step)
        self.seen.append({"layer": step.layer, "layout": step.layout, "hidden": step.hidden[0].clone(),
                          "positions": step.positions[0].clone(), "reduction": reduction})
        return reduction


def numpy_raters(vlm, inputs) -> np.ndarray:
    """Offsets into the text after the image of the tokens that rate it, from the stock decoder input (NumPy)."""
    embeds = stock_decoder_call(vlm, inputs)["embeds"][0].double().numpy()
    layout = inputs.layout
    visual, text = embeds[layout.visual_rows().numpy()], embeds[layout.text_after_visual_rows().numpy()]
    logits = visual @ text.T
    relevance = (np.exp(logits - logits.max(1, keepdims=True))
                 / np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)).mean(0)
    return np.nonzero(relevance > relevance.mean())[0]


def test_layers_empty_or_keeping_everything_gives_the_stock_logits(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(51))
    for fields in ({"layers": []}, {"layers": LAYERS, "budget": 1.0, "positions": "keep"}):
        with torch.no_grad(), tp.apply(vlm.model, "sparsevlm", **fields):
            logits = vlm.model(**inputs).logits
        assert torch.equal(logits, stock_logits(vlm, inputs)), fields


RANK = dict(schedule="rank", rank_scale=2.0)  # v1: k = min(int(2 rank), n_v - 1) per stage


@pytest.mark.parametrize("positions", ["auto", "keep"])
@pytest.mark.parametrize("fields", [{}, MERGING, RANK], ids=["retain192", "merging", "rank"])
def test_stages_equal_eager_attention_references(family, positions, fields):
    """Per stage: kept rows = top-k of layer K-1's eager probabilities (head mean, rater rows, visual columns); the
    recycled rows = the top-m dropped rows clustered as the reference DPC-KNN, each the members' official mean; the
    layer-K input = [prefix][kept][recycled][text]; positions re-numbered (auto on 1-D RoPE) or original (centres)."""
    vlm = sharp_tiny_vlm(family, "eager")
    if positions == "keep" and not vlm.info().reindex_positions:
        pytest.skip("auto = keep on this family")
    inputs = vlm.prepare(make_sample(52))
    raters = numpy_raters(vlm, inputs)
    probe = Probe(layers=LAYERS, positions=positions, **fields)
    with torch.no_grad(), tp.apply(vlm.model, probe) as session:
        spies = [LayerSpy(vlm, layer) for layer in LAYERS]  # after apply's hooks: they see what the layer gets
        try:
            attentions = [a[0].double() for a in vlm.model(**inputs, output_attentions=True).attentions]
        finally:
            for spy in spies:
                spy.__exit__()
    n = inputs.layout.num_visual
    counts = scaled_counts(fields.get("counts", OFFICIAL_COUNTS[192]), n)
    reindex = positions == "auto" and vlm.info().reindex_positions
    assert [seen["layer"] for seen in probe.seen] == LAYERS
    for stage, (seen, spy) in enumerate(zip(probe.seen, spies)):
        layout, hidden, reduction = seen["layout"], seen["hidden"], seen["reduction"]
        visual, text = layout.visual_rows(), layout.text_after_visual_rows()
        probs = attentions[seen["layer"] - 1].mean(0)  # [L, L] head mean of layer K - 1
        relation = probs[text[raters]][:, visual]  # [|Q|, n_v]
        scores = relation.mean(0)  # [n_v]
        k = min(counts[stage], visual.numel() - 1) if "rank" not in fields.values() else \
            min(int(int(torch.linalg.matrix_rank(relation.float())) * 2.0), visual.numel() - 1)
        order = sorted(range(visual.numel()), key=lambda i: (-float(scores[i]), i))
        kept = sorted(visual[order[:k]].tolist())
        assert sorted(set(reduction.keep.tolist()) & set(visual.tolist())) == kept, f"stage {stage}"
        dropped = [i for i in order if int(visual[i]) not in kept]  # descending reference score
        m, c = recycle_sizes(len(dropped), probe.recycle_frac, probe.cluster_div)
        candidates = dropped[:m]
        noise = torch.rand(1, m, generator=torch.Generator().manual_seed(probe.seed))[0]
        labels, centres, *_ = reference_dpc_knn(hidden[visual[candidates]], c, c, noise)
        merged = reduction.merged
        members = [sorted(int(visual[candidates[i]]) for i, label in enumerate(labels) if label == r) for r in range(c)]
        assert [sorted(merged.sources[merged.into == r].tolist()) for r in range(c)] == members, f"stage {stage}"
        values = torch.stack([hidden[rows].double().sum(0) / (len(rows) + 1e-6) for rows in members])
        torch.testing.assert_close(merged.values.double(), values, rtol=1e-5, atol=1e-6)
        # the layer-K input: [rows before the image][kept][recycled, centre order][text], exactly
        prefix = torch.arange(int(visual[0]))
        expected = torch.cat([hidden[prefix], hidden[kept], merged.values, hidden[text]])
        call = spy.calls[0]
        assert torch.equal(call["hidden"][0], expected), f"stage {stage}"
        if reindex:
            want = torch.arange(expected.shape[0])[None].expand(seen["positions"].shape[0], -1)
        else:  # original positions; a recycled row at its centre's, on every axis
            centre_positions = seen["positions"][:, visual[[candidates[i] for i in centres]]]
            want = torch.cat([seen["positions"][:, prefix], seen["positions"][:, kept], centre_positions,
                              seen["positions"][:, text]], dim=1)
        for got, table in zip(call["tables"], rotary_tables(vlm, want[None])):
            assert torch.equal(got, table), f"stage {stage}"
    stats = session.last_report.stats
    assert stats["sparsevlm_stage_visual"] == session.last_report.layer_visual[2:5]
    assert stats["sparsevlm_official_tokens"] == pytest.approx(
        official_equal_tokens(n, LAYERS, stats["sparsevlm_stage_visual"], 6))


def test_a_stage_equals_the_stock_layers_run_by_hand_side_inputs_included(family):
    """One stage at layer 2 (4 kept rows; 23 dropped rows recycled into 3): the logits equal the stock decoder
    layers run by hand around the stage applied by hand — a recycled row is its members' sum with the official
    weights, and so are its later side inputs (Qwen3-VL: the DeepStack features of layer 3), positions by the rule."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(55))
    frozen = Frozen(inner=SparseVLM(layers=[2], counts=[64], recycle_frac=0.7))
    with torch.no_grad(), tp.apply(vlm.model, frozen):
        logits = vlm.model(**inputs).logits[0]
    record = frozen.recorded[2]
    assert record["keep"].numel() == inputs.layout.length - 36 + 4 and int(record["merged"]["into"].max()) == 2
    with torch.no_grad():
        reference = logits_after_a_reduction_by_hand(vlm, inputs, 2, record)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)  # fp32 merged values vs fp64 sums


def test_budget_gives_exactly_that_many_tokens_after_the_last_stage(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(54))
    for budget, expected in ((9, 9), (0.5, 18), (3, 3)):
        with torch.no_grad(), tp.apply(vlm.model, "sparsevlm", layers=LAYERS, budget=budget) as session:
            vlm.model(**inputs)
        visual = session.last_report.layer_visual
        assert visual[-1] == expected and visual[:2] == [36, 36], budget
        assert visual[2:] == [geometric_targets(36, expected, 3)[s] for s in (0, 1, 2)] + [expected], budget


def test_the_scores_are_not_positional(family):
    vlm = sharp_tiny_vlm(family)
    inputs = vlm.prepare(make_sample(52))
    with torch.no_grad(), tp.apply(vlm.model, "sparsevlm", layers=LAYERS, recycle=False) as session:
        vlm.model(**inputs)
    kept, visual = session.last_report.kept[2], inputs.layout.visual_rows().tolist()
    assert kept not in (visual[: len(kept)], visual[-len(kept):])


def test_cache_lengths_and_cached_decoding_equal_recomputing_the_frozen_stages(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(53))
    L, n = inputs.layout.length, inputs.layout.num_visual
    frozen = Frozen(inner=SparseVLM(layers=LAYERS, **MERGING))
    steps = 3
    with torch.no_grad(), tp.apply(vlm.model, frozen) as session:
        out = vlm.model.generate(**inputs, **forced_generation(vlm, steps))
    visual = session.last_report.layer_visual
    assert visual == [n, n, 7, 4, 3, 3]  # 36 → 4 + 3 recycled → 3 + 1 → 2 + 1
    with torch.no_grad(), tp.apply(vlm.model, frozen):
        cache = output_cache(vlm.model(**inputs, use_cache=True))
        lengths = [layer.get_seq_length() for layer in cache.layers]
    assert lengths == [L - n + v for v in visual]
    frozen.replay = True
    assert_cached_decoding_equals_recompute(vlm, inputs, out, frozen, steps)


def test_reindex_is_refused_where_undefined(family):
    vlm = tiny_vlm(family)
    if vlm.info().reindex_positions:
        return
    with pytest.raises(ValueError, match=r"sparsevlm\.positions='reindex'"):
        with tp.apply(vlm.model, "sparsevlm", layers=LAYERS, positions="reindex"):
            pass
