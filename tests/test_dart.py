"""DART (``tokenprune/methods/dart.py``) against the card (``shared/methods/dart.md`` §8): the pure algorithm, then
the method in the engine on every family.

``reference_dart`` transcribes the official ``get_retained_image_token`` with Python sets, lists and float64
cosines, independent of the tensor implementation. In the engine: a budget that keeps everything gives the stock
logits; the kept sets equal that reference fed from the stock model's own prefill (its layer-K input through the
final norm, its KV cache's keys); keys from the cache equal recomputed keys; the final norm (not layer K's) is used;
cache lengths, positions (original, or re-numbered where defined) and decode positions; cached decoding equals
recomputing the frozen selection; the scopes.
"""

import math

import pytest
import torch

import tokenprune as tp
from conftest import make_image, make_sample, stock_logits, tiny_vlm
from helpers import (Frozen, LayerSpy, Replay, assert_cached_decoding_equals_recompute, forced_generation,
                     logits_after_a_reduction_by_hand, rotary_tables, stock_prefill)
from tokenprune.engine.compat import output_cache
from tokenprune.methods.base import ModelInfo, resolve_positions
from tokenprune.methods.dart import (DART, OFFICIAL_POSITIONS, budget_per_pivot, dart_keep, duplication_keep,
                                     key_l1_norms, official_per_pivot, scope_sets, top_rows, visit_order)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LLAVA_INFO = ModelInfo(num_layers=32, rope="1d", family="llava", reindex_positions=True)
QWEN_INFO = ModelInfo(num_layers=28, rope="mrope", family="qwen25vl", reindex_positions=False)


def reference_dart(z, norms, visual, text, pivot_visual, pivot_text, per_visit):
    """The official loop (card §2) with per-pivot counts ``per_visit(visual_pivots, visit) -> list[int]``."""
    z, norms = z.double().tolist(), norms.double().tolist()
    visual, text = list(visual), list(text)
    image_indices = sorted(visual, key=lambda r: (-norms[r], r))[:pivot_visual]  # topk order, ties lower row
    query_indices = sorted(text, key=lambda r: (-norms[r], r))[:pivot_text]
    indices_set = set(image_indices + query_indices)
    valid = set(visual) - set(image_indices)

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-8)

    visit = list(indices_set)
    counts = per_visit(image_indices, visit)
    for item, count in zip(visit, counts):
        valid_list = list(valid)
        sims = [cos(z[item], z[j]) for j in valid_list]
        chosen = sorted(range(len(valid_list)), key=lambda i: (sims[i], valid_list[i]))[: min(count, len(valid_list))]
        rows = [valid_list[i] for i in chosen]
        indices_set.update(rows)
        valid.difference_update(rows)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def random_case(seed, length=60, num_visual=40, start=10, dim=16):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(length, dim, generator=generator)
    norms = torch.rand(length, generator=generator)
    visual = torch.arange(start, start + num_visual)
    text = torch.arange(start + num_visual, length)
    return z, norms, visual, text


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("keep", [0, 8, 16, 40, 1000])
def test_equals_the_official_loop_with_keep(seed, keep):
    z, norms, visual, text = random_case(seed)
    expected = reference_dart(z, norms, visual.tolist(), text.tolist(), 4, 4,
                              lambda pivots, visit: [keep // 8] * len(visit))
    got = dart_keep(z, norms, visual, text, 4, 4, keep=keep)
    assert got.tolist() == expected
    assert got.numel() == min(40, 4 + 8 * (keep // 8))  # the pool clamp: keep=1000 keeps every visual row


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [1, 3, 4, 5, 13, 27, 39, 40, 41, 0.5])
def test_equals_the_official_loop_with_budget_counts(seed, budget):
    z, norms, visual, text = random_case(seed)
    count = min(40, budget) if isinstance(budget, int) else round(40 * budget)

    def per_visit(image_indices, visit):  # the visual pivots: the top min(4, count); the rest spread over visits
        extra = max(0, count - 4)
        return [extra // len(visit) + (i < extra % len(visit)) for i in range(len(visit))]

    pivot_visual = min(4, count)
    expected = reference_dart(z, norms, visual.tolist(), text.tolist(), pivot_visual, 4, per_visit)
    got = dart_keep(z, norms, visual, text, 4, 4, budget=budget)
    assert got.tolist() == expected
    assert got.numel() == count  # budget: exactly that many survive


def test_counts_at_576_tokens():
    # card §8.3: keep=128 keeps 132, 1 - 0.778 keeps 4 + 8*15 = 124, keep=64 keeps 68; budget is exact
    z, norms, visual, text = random_case(0, length=640, num_visual=576, start=35, dim=8)
    counts = {name: dart_keep(z, norms, visual, text, **{name.split("=")[0]: value}).numel()
              for name, value in [("keep=128", 128), ("keep=64", 64), ("keep=192", 192),
                                  ("reduction_ratio=.778", 0.778), ("budget=128", 128), ("budget=64", 64),
                                  ("budget=.25", 0.25)]}
    assert counts == {"keep=128": 132, "keep=64": 68, "keep=192": 196, "reduction_ratio=.778": 124,
                      "budget=128": 128, "budget=64": 64, "budget=.25": 144}


def test_official_per_pivot_uses_one_minus_ratio_as_written():
    assert official_per_pivot(576, 8, keep=128) == 16 and official_per_pivot(576, 8, keep=130) == 16
    assert official_per_pivot(576, 8, reduction_ratio=0.778) == 15
    # 1 - 0.778 = 0.22199999999999998: at N = 4000 the official count is 110, not int(4000 * .222 / 8) = 111
    assert official_per_pivot(4000, 8, reduction_ratio=0.778) == 110
    assert official_per_pivot(576, 0, keep=128) == 0


def test_budget_per_pivot_spreads_the_remainder_over_the_first_visits():
    assert budget_per_pivot(128, 4, 8) == [16, 16, 16, 16, 15, 15, 15, 15]  # 124 = 8*15 + 4
    assert budget_per_pivot(132, 4, 8) == [16] * 8  # = the official keep=128
    assert budget_per_pivot(3, 3, 7) == [0] * 7 and budget_per_pivot(5, 4, 0) == []


def test_hand_case_least_duplicated_rows():
    # card §8.4: visual vectors at 0, 5, 90, 180, 185 degrees; one visual pivot (0 degrees), no text pivot, c = 2
    angles = [0, 5, 90, 180, 185]
    z = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles] + [[0.3, 0.4]])
    norms = torch.tensor([9.0, 1, 1, 1, 1, 5])  # row 0 is the visual pivot
    kept = dart_keep(z, norms, torch.arange(5), torch.tensor([5]), pivot_visual=1, pivot_text=0, keep=2)
    assert kept.tolist() == [0, 3, 4]  # 0, 180 and 185 degrees


def test_pivot_visit_order_follows_cpython_sets_and_changes_the_result():
    assert visit_order([72], [40]) == [72, 40] and visit_order([40], [72]) == [40, 72]  # insertion order matters
    assert visit_order([2], [9]) == [9, 2] and visit_order([2], [9], "sorted") == [2, 9]
    # rows: 0 system, 1..8 visual, 9..11 text; visual pivot 2 (direction x), text pivot 9 (direction y), c = 1.
    # Both pivots find row 1 the least similar; then x prefers row 3 and y row 4. Official order visits 9 first.
    z = torch.zeros(12, 3)
    z[2], z[9] = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    z[1], z[3], z[4] = torch.tensor([-1.0, -1, 0]), torch.tensor([-1.0, 1, 0.5]), torch.tensor([1.0, -1, 0.5])
    z[5:9] = torch.tensor([[1.0, 1, 0], [1, 1, 1], [2, 1, 0], [1, 2, 0]])
    z[0], z[10], z[11] = 1.0, 1.0, 1.0
    norms = torch.zeros(12)
    norms[2], norms[9] = 5.0, 5.0
    visual, text = torch.arange(1, 9), torch.arange(9, 12)
    official = dart_keep(z, norms, visual, text, 1, 1, keep=2)
    ordered = dart_keep(z, norms, visual, text, 1, 1, keep=2, pivot_order="sorted")
    assert official.tolist() == [1, 2, 3] and ordered.tolist() == [1, 2, 4]


def test_ties_take_the_lower_row_first():
    rows = torch.tensor([3, 5, 7, 9])
    assert top_rows(torch.tensor([1.0, 2.0, 2.0, 0.5]), rows, 2) == [5, 7]
    z = torch.tensor([[1.0, 0]] + [[-1.0, 0]] * 4)  # four identical candidates, all least similar to row 0
    kept = duplication_keep(z, torch.arange(5), [0], [0], [2])
    assert kept.tolist() == [0, 1, 2]
    # duplicate features everywhere: pivots still claim distinct rows, lowest first
    z = torch.ones(8, 4)
    assert dart_keep(z, torch.zeros(8), torch.arange(6), torch.tensor([6, 7]), 2, 2, keep=4).tolist() == [0, 1, 2, 3, 4, 5]


def test_key_norms_over_concatenated_heads_and_gqa_repetition():
    keys = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(4))  # [H_kv, L, d_h]
    concatenated = keys.permute(1, 0, 2).reshape(30, -1)  # the official [L, H * d_h]
    torch.testing.assert_close(key_l1_norms(keys), torch.norm(concatenated, p=1, dim=-1), rtol=1e-6, atol=0)
    repeated = keys.repeat_interleave(3, dim=0)  # GQA heads repeated (SDPA path): every norm times 3
    rows = torch.arange(30)
    assert top_rows(key_l1_norms(repeated), rows, 4) == top_rows(key_l1_norms(keys), rows, 4)
    with pytest.raises(ValueError, match=r"\[H_kv, L, d_h\]"):
        key_l1_norms(concatenated)


def test_fewer_rows_than_pivots_and_an_empty_pool():
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    assert dart_keep(z, torch.rand(5), torch.arange(2), torch.arange(2, 5), 4, 4, keep=128).tolist() == [0, 1]
    assert dart_keep(z, torch.rand(5), torch.arange(5), torch.tensor([], dtype=torch.long), 2, 4,
                     budget=3).numel() == 3


def test_scope_sets():
    groups = [torch.arange(2, 6), torch.arange(8, 12)]
    after = torch.tensor([12, 13])
    (visual, text), = scope_sets("sample", groups, after, 14)
    assert visual.tolist() == [2, 3, 4, 5, 8, 9, 10, 11] and text.tolist() == [12, 13]
    (visual, text), = scope_sets("first", groups, after, 14)
    assert visual.tolist() == [2, 3, 4, 5] and text.tolist() == [6, 7, 8, 9, 10, 11, 12, 13]  # later image = text
    runs = scope_sets("group", groups, after, 14)
    assert [(v.tolist(), t.tolist()) for v, t in runs] == [([2, 3, 4, 5], [12, 13]), ([8, 9, 10, 11], [12, 13])]


def test_group_scope_keeps_pv_plus_p_c_per_group():
    z, norms, _, _ = random_case(2, length=100)
    groups = [torch.arange(10, 50), torch.arange(50, 90)]
    after = torch.arange(90, 100)
    kept = [dart_keep(z, norms, v, t, 4, 4, keep=16) for v, t in scope_sets("group", groups, after, 100)]
    assert [k.numel() for k in kept] == [4 + 8 * 2] * 2  # p_v + (p_v + p_t) * c_g per group


def test_settings_defaults_and_validation():
    dart = DART()
    rule = lambda m, info: resolve_positions("dart", m.positions, OFFICIAL_POSITIONS, info)  # noqa: E731
    assert dart.count_fields() == {"reduction_ratio": 0.778} and rule(dart, LLAVA_INFO) == rule(dart, QWEN_INFO) == "keep"
    assert DART(keep=128).count_fields() == {"keep": 128} and DART(budget=0.25).count_fields() == {"budget": 0.25}
    assert rule(DART(positions="reindex"), LLAVA_INFO) == "reindex"
    with pytest.raises(ValueError, match=r"dart\.positions='reindex' .* not defined for the qwen25vl family"):
        DART(positions="reindex").validate(QWEN_INFO)
    with pytest.raises(ValueError, match=r"dart\.layer=32 is out of range"):
        DART(layer=32).validate(LLAVA_INFO)
    bad = [({"budget": 0}, r"dart\.budget must be"), ({"budget": 1.5}, r"dart\.budget must be"),
           ({"keep": -1}, r"dart\.keep must be"), ({"keep": True}, r"dart\.keep must be"),
           ({"reduction_ratio": 1.0}, r"dart\.reduction_ratio must be a number in \[0, 1\)"),
           ({"budget": 64, "keep": 64}, "set at most one of budget, keep, reduction_ratio"),
           ({"layer": 0}, r"dart\.layer must be >= 1"), ({"pivot_visual": -1}, r"dart\.pivot_visual"),
           ({"pivot_visual": 0, "pivot_text": 0}, "pivot_visual \\+ pivot_text must be >= 1"),
           ({"pivot_order": "random"}, r"dart\.pivot_order must be one of \['official', 'sorted'\]"),
           ({"sim_dtype": "float16"}, r"dart\.sim_dtype must be one of"),
           ({"scope": "image"}, r"dart\.scope must be one of \['sample', 'first', 'group'\]"),
           ({"positions": "grid"}, r"dart\.positions must be one of")]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            DART(**fields)


# ---------------------------------------------------------------------------------------------------------
# In the engine, on every family (tiny random models, fp32)
# ---------------------------------------------------------------------------------------------------------
def run(vlm, inputs, **fields):
    with torch.no_grad(), tp.apply(vlm.model, "dart", **fields) as session:
        logits = vlm.model(**inputs).logits
    return logits, session.last_report


def test_keeping_everything_gives_the_stock_logits(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(31))
    n = inputs.layout.num_visual
    for fields in ({"keep": 10**6}, {"budget": 1.0}, {"budget": n, "scope": "group"}):  # the pool clamp: no error
        logits, report = run(vlm, inputs, **fields)
        assert report.layer_visual == [n] * len(report.layer_visual), fields
        assert torch.equal(logits, stock_logits(vlm, inputs)), fields  # bitwise: nothing changed


def reference_kept(vlm, inputs, layer: int, norm, counts) -> list[int]:
    """The official loop on the stock model's own prefill: z = ``norm`` of layer ``layer``'s input, pivots by the L1
    norms of layer ``layer - 1``'s cached (post-RoPE) keys."""
    stock = stock_prefill(vlm, inputs, layer)
    with torch.no_grad():
        z = norm(stock["hidden"])[0]
    keys = stock["cache"].layers[layer - 1].keys[0]  # [KVH, L, hd]
    norms = keys.double().abs().sum(dim=(0, 2))
    layout = inputs.layout
    return reference_dart(z, norms, layout.visual_rows().tolist(), layout.text_after_visual_rows().tolist(), 4, 4,
                          counts)


@pytest.mark.parametrize("fields", [{"keep": 16}, {"budget": 13}], ids=["keep", "budget"])
def test_kept_rows_equal_the_official_loop_on_the_stock_prefill(family, fields):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(32))
    n = inputs.layout.num_visual
    if "keep" in fields:
        counts = lambda pivots, visit: [2] * len(visit)  # noqa: E731  keep // 8
    else:
        counts = lambda pivots, visit: budget_per_pivot(13, len(pivots), len(visit))  # noqa: E731
    norm = vlm.adapter.final_norm(vlm.model)
    expected = reference_kept(vlm, inputs, 2, norm, counts)
    for use_cache in (True, False):  # keys read from layer 1's cache, or recomputed from its input
        with torch.no_grad(), tp.apply(vlm.model, "dart", **fields) as session:
            vlm.model(**inputs, use_cache=use_cache)
        assert session.last_report.kept[2] == expected, use_cache
    assert len(expected) == (4 + 8 * 2 if "keep" in fields else 13)
    visual = inputs.layout.visual_rows().tolist()
    assert expected not in (visual[: len(expected)], visual[-len(expected):])  # content-dependent, not positional
    assert session.last_report.layer_visual == [n, n] + [len(expected)] * 4


@pytest.mark.parametrize("positions", ["auto", "reindex"])
def test_logits_equal_the_stock_layers_run_by_hand(family, positions):
    """DART at layer 2 (13 visual rows survive): the logits equal the stock decoder layers run by hand on the kept
    rows, with their own later side inputs (Qwen3-VL's DeepStack features) and positions by the rule."""
    vlm = tiny_vlm(family)
    if positions == "reindex" and not vlm.info().reindex_positions:
        return  # refused there (test_cache_lengths_and_positions)
    inputs = vlm.prepare(make_sample(36))
    frozen = Frozen(inner=DART(budget=13, positions=positions))
    with torch.no_grad(), tp.apply(vlm.model, frozen):
        logits = vlm.model(**inputs).logits[0]
    record = frozen.recorded[2]
    assert record["keep"].numel() == inputs.layout.length - inputs.layout.num_visual + 13
    with torch.no_grad():
        reference = logits_after_a_reduction_by_hand(vlm, inputs, 2, record)
    assert torch.equal(logits, reference)  # bitwise: the same kernels on the same rows


def test_keys_from_the_cache_equal_recomputed_keys(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(33))
    seen = {}

    class Probe(DART):  # records the keys DART reads (cache at prefill, recomputed without a cache)
        def select(self, step):
            seen.setdefault("keys", []).append(step.keys(self.layer - 1))
            return super().select(step)

    for use_cache in (True, False):
        with torch.no_grad(), tp.apply(vlm.model, Probe(keep=16)):
            vlm.model(**inputs, use_cache=use_cache)
    cached, recomputed = seen["keys"]
    stock = stock_prefill(vlm, inputs, 2)["cache"].layers[1].keys[0]
    assert torch.equal(cached, stock)  # the cache itself
    torch.testing.assert_close(recomputed, cached, rtol=1e-5, atol=1e-5)  # fp32 projection + RoPE, recomputed


def test_the_final_norm_is_used_not_layer_k_input_norm(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(34))
    final = vlm.adapter.final_norm(vlm.model)
    layer_norm = vlm.adapter.layers(vlm.model)[2].input_layernorm
    saved = final.weight.detach().clone()
    counts = lambda pivots, visit: [2] * len(visit)  # noqa: E731
    try:
        with torch.no_grad():  # a non-unit final-norm weight (random init has ones, like every input norm)
            final.weight.copy_(torch.rand(saved.shape, generator=torch.Generator().manual_seed(0)) * 3 + 0.05)
        with_final = reference_kept(vlm, inputs, 2, final, counts)
        with_layer_norm = reference_kept(vlm, inputs, 2, layer_norm, counts)
        _, report = run(vlm, inputs, keep=16)
    finally:
        with torch.no_grad():
            final.weight.copy_(saved)
    assert with_final != with_layer_norm  # the two norms select differently here
    assert report.kept[2] == with_final


@pytest.mark.parametrize("positions", ["auto", "reindex"])
def test_cache_lengths_and_positions(family, positions):
    vlm = tiny_vlm(family)
    if positions == "reindex" and not vlm.info().reindex_positions:
        with pytest.raises(ValueError, match=r"dart\.positions='reindex'"):
            run(vlm, vlm.prepare(make_sample(35)), keep=16, positions=positions)
        return
    inputs = vlm.prepare(make_sample(35))
    layout = inputs.layout
    L, n = layout.length, layout.num_visual
    stock_positions = stock_prefill_positions(vlm, inputs)  # [1, P, L]
    with torch.no_grad(), tp.apply(vlm.model, "dart", keep=16, positions=positions) as session, \
            LayerSpy(vlm, 2) as spy:
        out = vlm.model(**inputs, use_cache=True)
        cache = output_cache(out)
        lengths = [layer.get_seq_length() for layer in cache.layers]
        vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    kept = session.last_report.kept[2]
    L_kept = L - n + len(kept)
    assert lengths == [L, L] + [L_kept] * 4  # layers < K hold the prompt, layers >= K the survivors
    rows = torch.tensor(sorted(set(layout.text_rows().tolist()) | set(kept)))
    prefill, generated_first, decode = spy.calls[0], spy.calls[1], spy.calls[2]
    if positions == "reindex":  # re-numbered 0..L'-1, decoding continues at L'
        expected, first_decode = torch.arange(L_kept)[None, None], torch.tensor([[[L_kept]]])
    else:  # original positions on every rotary axis, decoding continues after the unpruned prompt
        expected, first_decode = stock_positions[:, :, rows], stock_positions[:, :, -1:] + 1
    assert prefill["length"] == generated_first["length"] == L_kept
    for got, want in zip(prefill["tables"], rotary_tables(vlm, expected)):
        assert torch.equal(got, want)
    assert decode["length"] == 1
    for got, want in zip(decode["tables"], rotary_tables(vlm, first_decode)):
        assert torch.equal(got, want)


def stock_prefill_positions(vlm, inputs) -> torch.Tensor:
    from helpers import stock_decoder_call

    return stock_decoder_call(vlm, inputs)["positions"]


def test_cached_generation_equals_recomputing_the_frozen_selection(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(36))
    steps = 4
    with torch.no_grad(), tp.apply(vlm.model, "dart", keep=16) as session:
        out = vlm.model.generate(**inputs, **forced_generation(vlm, steps))
    assert_cached_decoding_equals_recompute(vlm, inputs, out, Replay(kept=session.last_report.kept), steps)


def test_scopes_on_two_images(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(tp.Sample(id="two", question="which image is brighter ?",
                                   images=[make_image(37), make_image(38)]))
    layout = inputs.layout
    first, second = (layout.group_rows(g).tolist() for g in range(2))
    per_group = 4 + 8 * 2  # p_v + (p_v + p_t) * c with keep=16
    _, report = run(vlm, inputs, keep=16, scope="first")
    kept = report.kept[2]
    assert set(second) <= set(kept) and len(set(kept) & set(first)) == per_group  # only image 0 is pruned
    _, report = run(vlm, inputs, keep=16, scope="group")
    kept = set(report.kept[2])
    assert len(kept & set(first)) == len(kept & set(second)) == per_group
    _, report = run(vlm, inputs, budget=15, scope="group")  # the budget split over the groups: 8 + 7
    assert sorted([len(set(report.kept[2]) & set(first)), len(set(report.kept[2]) & set(second))]) == [7, 8]
    _, report = run(vlm, inputs, keep=16)  # scope=sample: one run over both images
    assert len(report.kept[2]) == per_group
