"""HiMAP (issue 5): brute force against eager attention, identity, scoring shapes, cache schedule, positions,
cached decoding, batches, memory regression over 300 alternating samples, FLOPs, validation.

References are independent of the method's code: eager attention probabilities from the stock model
(``output_attentions=True``, built only here), visual rows found from ``input_ids`` in the test, frozen
selections re-applied with ``helpers.Replay``, and numbers written by hand.
"""

from __future__ import annotations

import gc
import importlib.util
import io
import re
from contextlib import redirect_stdout
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenprune as tp
import tokenprune.engine.driver as driver_module
import tokenprune.engine.scores as scores_module
from conftest import (FAMILIES, hook_snapshot, make_image, make_sample, sharpen_queries_and_keys, stock_logits,
                      takes_video, tiny_vlm)
from helpers import (Replay, assert_cached_decoding_equals_recompute, current_rows, eager_attentions, forced_choice,
                     forced_generation, topk_original)
from tokenprune.engine.compat import output_cache
from tokenprune.engine.flops import DecoderShape, paper_flops
from tokenprune.models.llava import llava15_config
from tokenprune.models.zoo.tiny import tiny_llava_config, tiny_llava_processor

ROOT = Path(__file__).parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def video_sample(seed: int) -> tp.Sample:
    """4 random frames of 112 x 112: on tiny Qwen2.5-VL, 2 temporal steps of 4 x 4 tokens (32 video tokens)."""
    frames = (np.random.default_rng(seed).random((4, 3, 112, 112)) * 255).astype("uint8")
    return tp.Sample(id=f"v{seed}", question="which direction does the red square move ?",
                     video=tp.VideoFrames(frames=frames, fps=2.0, frame_indices=[0, 1, 2, 3], total_frames=4))


def two_image_sample(seed: int) -> tp.Sample:
    return tp.Sample(id=f"two{seed}", question="what colour is the square at the top left ?",
                     images=[make_image(seed), make_image(seed + 100)])


INPUTS = {
    "image": lambda seed: make_sample(seed),
    "two_images": two_image_sample,
    "video": video_sample,
}
CASES = [(family, kind) for family in FAMILIES for kind in INPUTS if kind != "video" or takes_video(family)]


def visual_and_query_rows(vlm, input_ids: torch.Tensor) -> tuple[list[int], list[int]]:
    """From ``input_ids`` ``[L]`` alone: visual rows (image or video placeholders) and the non-visual rows after
    the last visual one (HiMAP's Q_T)."""
    config = vlm.model.config
    placeholder_ids = [config.image_token_id] + [i for i in [getattr(config, "video_token_id", None)] if i is not None]
    is_visual = torch.isin(input_ids, torch.tensor(placeholder_ids))
    visual = is_visual.nonzero().flatten().tolist()
    query = [row for row in range(visual[-1] + 1, input_ids.numel()) if not is_visual[row]]
    return visual, query


SHARPEN = 16.0


@lru_cache(maxsize=None)
def sharp_vlm(name: str, attn: str):
    """The named tiny model's architecture (random weights) with every decoder layer's queries and keys scaled by
    SHARPEN (the q/k projections, or the q/k norms where the layer has them).

    Random initialisation gives near-uniform attention, whose column sums over image rows only count causally
    visible rows: stage 2 would keep the earliest k2 survivors whatever the implementation ranks. Sharper
    attention makes both rankings depend on content, so the brute-force comparison can tell query sets apart.
    """
    vlm = tp.load_model(name, weights="random", device="cpu", attn_implementation=attn)
    with torch.no_grad():
        for layer in vlm.adapter.text_model(vlm.model).layers:
            sharpen_queries_and_keys(layer.self_attn, SHARPEN)
        vlm.model(**vlm.prepare(make_sample(0)))
    return vlm


def run_himap(vlm, inputs, **fields):
    with torch.no_grad(), tp.apply(vlm.model, "himap", **fields) as session:
        vlm.model(**inputs)
    return session.last_report


# ---------------------------------------------------------------------------------------------------------
# Done-when 1: kept indices of both stages equal a brute-force reference from eager probabilities
# ---------------------------------------------------------------------------------------------------------
SETTINGS = [(2, 4, 0.5, 0.125), (1, 2, 0.5, 0.25), (1, 5, 0.75, 0.25), (3, 5, 0.25, 0.125)]


@pytest.mark.parametrize("text_layer,image_layer,text_keep,image_keep", SETTINGS)
@pytest.mark.parametrize("family,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_both_stages_match_the_eager_reference(family, kind, text_layer, image_layer, text_keep, image_keep):
    eager = sharp_vlm(family, "eager")
    inputs = eager.prepare(INPUTS[kind](31))
    layout = inputs.layout
    visual, query = visual_and_query_rows(eager, inputs["input_ids"][0])
    n = len(visual)
    k1, k2 = int(n * text_keep), int(n * image_keep)  # floor of the original N
    assert len(query) >= 2 and 0 < k2 < k1 < n

    sdpa = sharp_vlm(family, "sdpa")
    report = run_himap(sdpa, inputs, text_layer=text_layer, image_layer=image_layer, text_keep=text_keep,
                       image_keep=image_keep)

    # stage 1: eager maps of layer K1-1 on the full prompt, head mean, column sums over Q_T, image columns
    attentions, _ = eager_attentions(eager, inputs)
    probabilities = attentions[text_layer - 1].mean(0)  # [L, L]
    scores = probabilities[query][:, visual].sum(0)  # [N]
    expected_first = topk_original(scores, visual, k1)
    assert set(report.kept[text_layer]) == expected_first

    # stage 2: stage 1 frozen (Replay), stage 2 off; eager maps of layer K2-1 on the shortened sequence,
    # head mean, column sums of the kept-image x kept-image block (diagonal included)
    kept_first = sorted(expected_first)
    attentions, replayed = eager_attentions(eager, inputs, Replay(kept={text_layer: kept_first}))
    assert replayed.layer_visual[image_layer - 1] == k1
    rows = current_rows(layout, kept_first)  # original row of each current row
    image = [i for i, original in enumerate(rows) if original in set(kept_first)]
    probabilities = attentions[image_layer - 1].mean(0)  # [L - N + k1, L - N + k1]
    assert probabilities.shape[0] == layout.length - n + k1
    scores = probabilities[image][:, image].sum(0)  # [k1]
    expected_second = topk_original(scores, [rows[i] for i in image], k2)
    assert set(report.kept[image_layer]) == expected_second
    assert expected_second <= expected_first
    # a content ranking, not "the earliest tokens", in at least one stage (random weights may rank one by position)
    assert expected_first != set(visual[:k1]) or expected_second != set(kept_first[:k2])


def test_stage_two_ranking_is_not_stage_one_ranking():
    """The two stages rank by different flows, so a single-stage method would not pass the test above."""
    eager = sharp_vlm("tiny_llava", "eager")
    inputs = eager.prepare(make_sample(31))
    visual, query = visual_and_query_rows(eager, inputs["input_ids"][0])
    attentions, _ = eager_attentions(eager, inputs)
    probabilities = attentions[3].mean(0)
    by_text = topk_original(probabilities[query][:, visual].sum(0), visual, 9)
    by_image = topk_original(probabilities[visual][:, visual].sum(0), visual, 9)
    assert by_text != by_image


# ---------------------------------------------------------------------------------------------------------
# Done-when 2: keeping everything gives the stock logits exactly
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_keep_everything_gives_stock_logits_exactly(family, attn, kind):
    if kind == "video" and not takes_video(family):
        pytest.skip("this family takes no video")
    vlm = tiny_vlm(family, attn)
    inputs = vlm.prepare(INPUTS[kind](1))
    reference = stock_logits(vlm, inputs)
    with torch.no_grad():
        stock = vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        with tp.apply(vlm.model, "himap", text_layer=1, image_layer=4, text_keep=1.0, image_keep=1.0) as session:
            logits = vlm.model(**inputs).logits
            pruned = vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True)
    assert session.installed
    assert torch.equal(logits, reference)  # every row, bitwise (same dtype, same backend)
    assert torch.equal(pruned.sequences, stock.sequences)
    for step_pruned, step_stock in zip(pruned.logits, stock.logits):
        assert torch.equal(step_pruned, step_stock)


# ---------------------------------------------------------------------------------------------------------
# Done-when 3: scores only for the needed rows (never L x L); the main pass stays on SDPA
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["image", "video"])
def test_scores_are_computed_for_the_needed_rows_only(family, kind, monkeypatch):
    if kind == "video" and not takes_video(family):
        pytest.skip("this family takes no video")
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(INPUTS[kind](32))
    visual, query = visual_and_query_rows(vlm, inputs["input_ids"][0])
    L, N = inputs["input_ids"].shape[1], len(visual)
    k1, k2 = N // 2, N // 8
    config = vlm.adapter.text_config(vlm.model)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads

    calls, sdpa_calls = [], []
    original = scores_module.attention_probabilities

    def spy(queries, keys, query_rows, key_columns, *args, **kwargs):
        calls.append({"queries": tuple(queries.shape), "keys": tuple(keys.shape), "rows": query_rows.clone(),
                      "columns": None if key_columns is None else key_columns.numel()})
        return original(queries, keys, query_rows, key_columns, *args, **kwargs)

    stock_sdpa = torch.nn.functional.scaled_dot_product_attention
    text_model = vlm.adapter.text_model(vlm.model)
    in_decoder = []

    def sdpa_spy(query, *args, **kwargs):
        if in_decoder:  # the vision tower uses SDPA too: count the text decoder's calls only
            sdpa_calls.append(tuple(query.shape))
        return stock_sdpa(query, *args, **kwargs)

    # the driver binds the function at import: patch the name it calls, and the module's for any other caller
    monkeypatch.setattr(driver_module, "attention_probabilities", spy)
    monkeypatch.setattr(scores_module, "attention_probabilities", spy)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa_spy)
    handles = [text_model.register_forward_pre_hook(lambda *a: in_decoder.append(1)),
               text_model.register_forward_hook(lambda *a: in_decoder.clear())]
    try:
        with torch.no_grad(), tp.apply(vlm.model, "himap", text_layer=2, image_layer=4) as session:
            out = vlm.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    assert out.shape[1] == L + 3

    # exactly two score computations in the whole generation (decode never re-scores)
    assert len(calls) == 2
    first, second = calls
    assert first["queries"] == (1, heads, len(query), head_dim)  # |Q_T| rows
    assert first["keys"] == (1, kv_heads, L, head_dim)
    assert first["rows"].tolist() == query and first["columns"] == N
    assert second["queries"] == (1, heads, k1, head_dim)  # k1 rows: the surviving visual tokens
    assert second["keys"] == (1, kv_heads, L - N + k1, head_dim)
    kept_first = set(session.last_report.kept[2])
    current = current_rows(inputs.layout, kept_first)
    assert [current[r] for r in second["rows"].tolist()] == sorted(kept_first)
    assert second["columns"] == k1
    for call in calls:  # never a full L x L map
        assert call["queries"][2] < call["keys"][2]
    assert session.last_report.layer_visual[4] == k2
    # the main pass ran SDPA in every layer: prefill with L, L, L-N+k1 (x2), L-N+k2 (x2) query rows, then decode
    layers = config.num_hidden_layers
    prefill = [shape[2] for shape in sdpa_calls[:layers]]
    assert prefill == [L, L, L - N + k1, L - N + k1, L - N + k2, L - N + k2]
    assert [shape[2] for shape in sdpa_calls[layers:]] == [1] * (2 * layers)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("himap_memory", ROOT / "benchmarks" / "himap_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_benchmark_smoke_mode_prints_a_table():
    benchmark = _load_benchmark()
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        rows = benchmark.main(["--smoke"])
    table = buffer.getvalue()
    assert "| decoder tokens |" in table and "extra peak" in table
    assert len(rows) == 2
    for row in rows:
        n = row["visual"]
        assert row["tokens"] > n > 0
        assert row["himap_layer_visual"] == [n, n, n // 2, n // 2, n // 8, n // 8]
        for key in ("sdpa_ms", "himap_ms", "sdpa_peak_mib", "himap_peak_mib"):
            assert row[key] > 0
        assert re.search(rf"\| {row['tokens']} \|", table)


# ---------------------------------------------------------------------------------------------------------
# Card tests 2, 5, 6: schedule, nesting, text rows kept, original positions on all axes, KV cache lengths
# ---------------------------------------------------------------------------------------------------------
def test_schedule_nesting_and_original_positions(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(33))
    layout = inputs.layout
    text_model = vlm.adapter.text_model(vlm.model)
    L, N = layout.length, layout.num_visual
    tables = {}

    def spy(index):
        def hook(module, args, kwargs):
            tables.setdefault(index, tuple(t.clone() for t in kwargs["position_embeddings"]))
        return hook

    with torch.no_grad(), tp.apply(vlm.model, "himap", text_layer=2, image_layer=4, text_keep=0.5,
                                   image_keep=0.25) as session:
        # registered after the driver's hooks, so they see what the layers receive
        handles = [text_model.layers[i].register_forward_pre_hook(spy(i), with_kwargs=True) for i in (1, 2, 4, 5)]
        try:
            vlm.model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    report = session.last_report
    k1, k2 = N // 2, N // 4
    assert report.layer_visual == [N, N, k1, k1, k2, k2]
    assert report.layer_tokens == [L, L, L - N + k1, L - N + k1, L - N + k2, L - N + k2]
    first, second = report.kept[2], report.kept[4]
    assert first == sorted(first) and second == sorted(second)
    assert set(second) <= set(first)

    # positions: every text row and the kept visual rows, at their original (3-D for Qwen) positions
    if vlm.adapter.positions(None, 1, 1, 0, "cpu").shape[1] == 3:  # 3-D positions
        outer = vlm.adapter.outer_model(vlm.model)
        full_positions, _ = outer.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"])  # [3, 1, L]
        visual = layout.visual_rows()
        assert not torch.equal(full_positions[1, 0, visual], full_positions[2, 0, visual])
    else:
        full_positions = torch.arange(L)[None]  # [1, L]
    hidden = torch.zeros(1, 1, text_model.config.hidden_size)
    text = layout.text_rows().tolist()
    for layer, kept in ((1, list(range(L))), (2, sorted(set(text) | set(first))), (4, sorted(set(text) | set(second))),
                        (5, sorted(set(text) | set(second)))):
        expected = text_model.rotary_emb(hidden, full_positions[..., kept])
        assert torch.equal(tables[layer][0], expected[0]) and torch.equal(tables[layer][1], expected[1]), layer


def test_kv_cache_lengths_by_hand():
    vlm = tiny_vlm("tiny_llava")
    inputs = vlm.prepare(make_sample(34))
    L, N = inputs.layout.length, inputs.layout.num_visual
    assert N == 36
    with torch.no_grad(), tp.apply(vlm.model, "himap", text_layer=2, image_layer=4, text_keep=0.5, image_keep=0.125):
        cache = output_cache(vlm.model(**inputs, use_cache=True))
    lengths = [layer.get_seq_length() for layer in cache.layers]
    assert lengths == [L] * 2 + [L - 36 + 18] * 2 + [L - 36 + 4] * 2  # floor(36 * 0.5) = 18, floor(36 * 0.125) = 4


# ---------------------------------------------------------------------------------------------------------
# Card test 7: cached decoding equals recomputing the frozen pruned prefill; first token = an uncached step
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["image", "video"])
def test_cached_generation_equals_recomputing_the_pruned_prefill(family, kind):
    if kind == "video" and not takes_video(family):
        pytest.skip("this family takes no video")
    new_tokens = 6
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(INPUTS[kind](35))
    fields = dict(text_layer=1, image_layer=3, text_keep=0.5, image_keep=0.125)
    with torch.no_grad(), tp.apply(vlm.model, "himap", **fields) as session:
        out = vlm.model.generate(**inputs, **forced_generation(vlm, new_tokens))
        cached_report = session.last_report
        uncached = vlm.model(**inputs, use_cache=False).logits[:, -1]  # official style: no cache, pruned prefill
        uncached_report = session.last_report
    assert uncached_report.kept == cached_report.kept
    torch.testing.assert_close(out.logits[0], uncached, rtol=1e-5, atol=1e-5)  # fp32 kernel differences only
    assert forced_choice(vlm, uncached) == int(out.sequences[0, inputs["input_ids"].shape[1]])

    assert_cached_decoding_equals_recompute(vlm, inputs, out, Replay(kept=cached_report.kept), new_tokens)


# ---------------------------------------------------------------------------------------------------------
# Card test 8: a batch matches per-sample runs
# ---------------------------------------------------------------------------------------------------------
def test_unpadded_batch_equals_each_sample_alone(family):
    from tokenprune.models.images import load_images

    vlm = tiny_vlm(family)
    samples = [make_sample(36), make_sample(37)]  # same question: equal lengths, no padding
    texts = [vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}], tokenize=False,
        add_generation_prompt=True) for s in samples]
    batch = dict(vlm.processor(text=texts, images=[load_images(s.images)[0] for s in samples], return_tensors="pt",
                               padding=True))
    assert bool(batch["attention_mask"].all())
    fields = dict(text_layer=1, image_layer=3, text_keep=0.5, image_keep=0.25)
    with torch.no_grad(), tp.apply(vlm.model, "himap", **fields):
        together = vlm.model(**batch).logits[:, -1]
        alone = []
        for sample in samples:
            alone.append(vlm.model(**vlm.prepare(sample)).logits[:, -1])
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Done-when 4: 300 samples alternating baseline and HiMAP on one model keep memory flat; baseline is stock
# ---------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the process RSS from /proc (Linux)")
def test_alternating_baseline_and_himap_keeps_memory_flat(monkeypatch):
    vlm = tiny_vlm("tiny_llava")
    himap = tp.methods.create("himap", text_layer=2, image_layer=4)
    stock_logits(vlm, vlm.prepare(make_sample(0)))
    before = hook_snapshot(vlm.model)
    scored = []
    original = driver_module.attention_probabilities
    monkeypatch.setattr(driver_module, "attention_probabilities",
                        lambda *args, **kwargs: scored.append(1) or original(*args, **kwargs))
    questions = ["what colour is the square at the top left ?", "how many red objects are in the image ?",
                 "is the blue circle left of the green cross ?"]
    measured = {}
    for i in range(300):
        inputs = vlm.prepare(make_sample(1000 + i, question=questions[i % 3]))
        baseline = i % 2 == 0
        scored_before = len(scored)
        with torch.no_grad(), tp.apply(vlm.model, "baseline" if baseline else himap) as session:
            if baseline:  # the stock forward: no driver, not one hook or wrapped forward added
                assert not session.installed and session.last_report is None
                assert getattr(vlm.model, "_tokenprune_driver", None) is None
                assert hook_snapshot(vlm.model) == before
            out = vlm.model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
        if baseline:
            assert len(scored) == scored_before  # no scoring, no attention map of any kind
        else:
            assert len(scored) == scored_before + 2 and session.last_report.layer_visual == [36, 36, 18, 18, 4, 4]
        assert hook_snapshot(vlm.model) == before
        del out, inputs, session
        if i + 1 in (20, 300):
            measured[i + 1] = (_live_tensors(), _rss_bytes())
    (tensors_20, rss_20), (tensors_300, rss_300) = measured[20], measured[300]
    assert tensors_300 == tensors_20  # nothing per sample survives
    assert abs(rss_300 - rss_20) <= 0.02 * rss_20, (rss_20, rss_300)


# ---------------------------------------------------------------------------------------------------------
# Done-when 5: FLOPs with the HiMAP convention at the README setting (K1=2, K2=8, 288 -> 72 of 576)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,layers,reconstructed,readme", [("7b", 32, 24.6, 24), ("13b", 40, 22.2, 23)])
def test_flops_ratio_of_the_readme_setting(size, layers, reconstructed, readme):
    # a tiny-width LLaVA with the real depth and 576 visual tokens (336 px, 14 px patches): the counts per layer
    # come from a real HiMAP run with the default fields
    config = tiny_llava_config(image_size=336, layers=layers)
    adapter = tp.models.adapter_named("llava")
    model = adapter.build_random(config, torch.float32, "sdpa", seed=0).eval()
    vlm = tp.models.VLM(f"tiny_llava_{layers}", model, tiny_llava_processor(image_size=336), adapter)
    inputs = vlm.prepare(make_sample(38, size=(336, 336)))
    assert inputs.layout.num_visual == 576
    report = run_himap(vlm, inputs)  # defaults: text_layer 2, image_layer 8, 0.5, 0.125
    assert report.layer_visual == [576] * 2 + [288] * 6 + [72] * (layers - 8)

    shape = DecoderShape.from_config(llava15_config(size).text_config)
    assert shape.layers == layers
    full = paper_flops(shape, "himap", [0] * layers, [576] * layers)
    ratio = 100 * paper_flops(shape, "himap", [0] * layers, report.layer_visual) / full
    # by hand: C(n) = 4nd^2 + 2n^2 d + 2ndm, image tokens only; [2 C(576) + 6 C(288) + (T-8) C(72)] / [T C(576)]
    d, m = shape.hidden, shape.intermediate

    def cost(n):
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m

    by_hand = 100 * (2 * cost(576) + 6 * cost(288) + (layers - 8) * cost(72)) / (layers * cost(576))
    assert ratio == pytest.approx(by_hand, rel=1e-12)
    assert round(ratio, 1) == reconstructed  # the card's reconstruction
    assert abs(ratio - readme) < 1.0  # the official README's rounded figure


# ---------------------------------------------------------------------------------------------------------
# Validation: clear errors before any model work
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,pattern", [
    ({"text_layer": 0}, r"himap.text_layer must be >= 1, got 0"),
    ({"text_layer": 1.5}, r"himap.text_layer must be an integer layer index"),
    ({"text_layer": 4, "image_layer": 4}, r"himap.image_layer must be greater than himap.text_layer, got image_layer=4, text_layer=4"),
    ({"text_layer": 8, "image_layer": 2}, r"himap.image_layer must be greater than himap.text_layer"),
    ({"text_keep": 0.25, "image_keep": 0.5}, r"himap.image_keep must be <= himap.text_keep"),
    ({"text_keep": 0}, r"himap.text_keep must be a number in \(0, 1\]"),
    ({"text_keep": 1.5}, r"himap.text_keep must be a number in \(0, 1\]"),
    ({"image_keep": float("nan")}, r"himap.image_keep must be a number in \(0, 1\]"),
    ({"image_keep": True}, r"himap.image_keep must be a number in \(0, 1\]"),
    ({"image_keep": -0.1}, r"himap.image_keep must be a number in \(0, 1\]"),
])
def test_invalid_fields_are_refused(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        tp.methods.create("himap", **fields)


@pytest.mark.parametrize("fields,pattern", [
    ({"text_layer": 2, "image_layer": 6}, r"himap.image_layer=6 is out of range: the model has 6 decoder layers"),
    ({}, r"himap.image_layer=8 is out of range: the model has 6 decoder layers"),  # the defaults need >= 9 layers
])
def test_layers_beyond_the_model_are_refused_before_model_work(family, fields, pattern):
    vlm = tiny_vlm(family)
    calls = []
    handle = vlm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=pattern):
            with tp.apply(vlm.model, "himap", **fields):
                vlm.model(**vlm.prepare(make_sample(0)))
    finally:
        handle.remove()
    assert calls == []


def test_a_prompt_ending_with_the_image_is_refused_before_the_decoder(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(39))
    visual, _ = visual_and_query_rows(vlm, inputs["input_ids"][0])
    truncated = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in truncated:
            truncated[key] = inputs[key][:, : visual[-1] + 1]
    layer_calls = []
    first_layer = vlm.adapter.text_model(vlm.model).layers[0]
    handle = first_layer.register_forward_pre_hook(lambda *a: layer_calls.append(1))
    try:
        with torch.no_grad(), tp.apply(vlm.model, "himap", text_layer=1, image_layer=3):
            with pytest.raises(ValueError, match="himap: the prompt ends with a visual token"):
                vlm.model(**truncated)
    finally:
        handle.remove()
    assert layer_calls == []
