"""PruneVid stage 2 (inside the decoder, ``prune_cache_before``) and decoding; done-when 4 and 5.

``two_phase_reference`` recomputes, without any KV cache and without the driver, what a pruned prefill followed
by cached decoding must give: it runs the stock decoder layers one by one with explicit masks — layers
0..M on the stage-1 sequence, where generated tokens may only see the kept prompt tokens; then the kept
rows only — and computes stage 2's kept set itself from layer M's q/k projections.
"""

import numpy as np
import pytest
import torch

import tokenprune as tp
from conftest import make_sample, tiny_vlm
from helpers import eager_attentions, stock_decoder_call
from tokenprune.engine.contract import DecoderInput
from tokenprune.engine.compat import cache_kwargs, output_cache

NEW_TOKENS = 5


def video_inputs(vlm, frames=8, fps=4.0, seed=0, size=112):
    array = np.random.default_rng(seed).integers(0, 255, (frames, 3, size, size), dtype=np.uint8)
    array[frames // 2:] = array[0]  # half of the video repeats its first frame: static tokens there
    sample = tp.Sample(id="v", question="which direction does the red square move ?",
                       video=tp.VideoFrames(frames=array, fps=fps, frame_indices=list(range(frames)),
                                            total_frames=frames))
    return vlm.prepare(sample)


def stock_decoder_inputs(vlm, inputs):
    """What the stock outer model hands its text decoder: embeddings ``[1, L, d]`` and positions ``[1, P, L]``."""
    call = stock_decoder_call(vlm, inputs)
    return call["embeds"], call["positions"]


def rotary(vlm, hidden, positions):
    text_model = vlm.adapter.text_model(vlm.model)
    return text_model.rotary_emb(hidden, positions.permute(1, 0, 2) if positions.shape[1] == 3 else positions[:, 0])


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """``[q, k]`` bool (True: may attend) → ``[1, 1, q, k]`` additive float32 mask."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def reference_kept(vlm, method, hidden, positions, layout):
    """Stage 2's kept visual rows, from layer M's own projections on its input ``hidden`` ``[1, L1, d]``."""
    layer = vlm.adapter.text_model(vlm.model).layers[method.stage2_layer]
    attention = layer.self_attn
    heads, kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
    x = layer.input_layernorm(hidden)[0]  # [L1, d]
    q = attention.q_proj(x).view(x.shape[0], heads, -1).transpose(0, 1)  # [H, L1, hd]
    k = attention.k_proj(x).view(x.shape[0], kv_heads, -1).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    allowed = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool)
    if method.score_attn == "standard":  # RoPE'd, causal
        cos, sin = rotary(vlm, hidden, positions)

        def rope(t):
            half = t.shape[-1] // 2
            return t * cos[0] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[0]

        q, k = rope(q), rope(k)
        allowed = torch.tril(allowed)
    probs = torch.softmax((q @ k.transpose(-1, -2) * attention.scaling).masked_fill(~allowed, float("-inf")), -1)
    visual = layout.visual_rows()
    text_after = [row for row in range(layout.length) if row > int(visual[-1])]
    scores = probs[:, text_after][:, :, visual].amax(0).amax(0)  # max over heads, then over query rows
    parts = method.parts(layout, visual)
    kept = []
    for part in parts.unique().tolist():
        members = [i for i in range(visual.numel()) if int(parts[i]) == part]
        members.sort(key=lambda i: (-float(scores[i]), i))
        kept += members[: int(len(members) * method.stage2_keep)]
    return sorted(int(visual[i]) for i in kept)


def stage1_sequence(vlm, inputs, method):
    """The stock decoder inputs, and the sequence after ``method``'s stage 1 (unchanged without stage 1)."""
    embeds, positions = stock_decoder_inputs(vlm, inputs)
    seq = DecoderInput(embeds, positions, inputs.layout)
    return positions, (seq.reduced(method.before_llm(seq)) if method.stage1 else seq)


def two_phase_reference(vlm, method, positions, seq, generated):
    """Logits of the last row after the prompt + ``generated`` tokens, and the kept visual tokens (originals).

    positions: the unpruned prompt's ``[1, P, L0]``; seq: the prompt after stage 1.
    """
    text_model = vlm.adapter.text_model(vlm.model)
    L1, g, M = seq.embeds.shape[1], len(generated), method.stage2_layer
    new_embeds = text_model.embed_tokens(torch.tensor([generated], dtype=torch.long))
    # generated token i gets the unpruned prompt's last position + 1 + i on every axis (generate's rule)
    new_positions = positions[:, :, -1:] + 1 + torch.arange(g)
    hidden = torch.cat([seq.embeds, new_embeds], 1)
    all_positions = torch.cat([seq.positions, new_positions], 2)
    tables = rotary(vlm, hidden, all_positions)
    layers = text_model.layers

    # kept set: layer M's input on the prompt rows (which never see generated rows)
    prompt = seq.embeds
    prompt_tables = tuple(t[:, :L1] for t in tables)
    for layer in layers[:M]:
        prompt = layer(prompt, attention_mask=additive(torch.ones(L1, L1, dtype=torch.bool).tril()),
                       position_embeddings=prompt_tables)
    kept_visual = reference_kept(vlm, method, prompt, seq.positions, seq.layout) if method.stage2 else \
        seq.layout.visual_rows().tolist()
    kept = sorted(set(seq.layout.text_rows().tolist()) | set(kept_visual))

    # layers 0..M: the stage-1 sequence; generated rows see only the kept prompt rows and earlier generated rows
    total = L1 + g
    allowed = torch.ones(total, total, dtype=torch.bool).tril()
    visible_prompt = torch.zeros(L1, dtype=torch.bool)
    visible_prompt[kept] = True
    allowed[L1:, :L1] &= visible_prompt
    for layer in layers[: M + 1]:
        hidden = layer(hidden, attention_mask=additive(allowed), position_embeddings=tables)
    # layers M+1..: the kept rows and the generated rows only
    rows = torch.tensor(kept + list(range(L1, total)))
    hidden = hidden[:, rows]
    tables = tuple(t[:, rows] for t in tables)
    causal = torch.ones(rows.numel(), rows.numel(), dtype=torch.bool).tril()
    for layer in layers[M + 1:]:
        hidden = layer(hidden, attention_mask=additive(causal), position_embeddings=tables)
    logits = vlm.model.lm_head(text_model.norm(hidden))[0, -1]
    return logits, seq.layout.original[kept_visual].tolist()


@pytest.mark.parametrize("fields", [
    {"stage2_layer": 2},
    {"stage2_layer": 0, "stage2_keep": 0.25},
    {"stage2_layer": 3, "score_attn": "standard"},
    {"stage1": False, "stage2_layer": 1},
], ids=["both", "layer0", "standard", "stage2-only"])
def test_cached_generation_equals_the_two_phase_reference(fields):
    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = video_inputs(vlm)
    method = tp.methods.create("prunevid", **fields)
    with torch.no_grad(), tp.apply(vlm.model, method) as session:
        out = vlm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    report = session.last_report
    prompt_length = inputs["input_ids"].shape[1]
    positions, seq = stage1_sequence(vlm, inputs, method)
    with torch.no_grad():
        for step in range(NEW_TOKENS):
            generated = out.sequences[0, prompt_length: prompt_length + step].tolist()
            logits, kept = two_phase_reference(vlm, method, positions, seq, generated)
            if step == 0:
                assert report.kept[method.stage2_layer + 1] == kept  # the same stage-2 selection
            torch.testing.assert_close(out.logits[step][0], logits, rtol=1e-5, atol=1e-5)  # fp32 kernel order
            assert int(logits.argmax()) == int(out.sequences[0, prompt_length + step])


def test_llava_image_cached_generation_equals_the_two_phase_reference():
    vlm = tiny_vlm("tiny_llava")
    inputs = vlm.prepare(make_sample(31))
    method = tp.methods.create("prunevid", stage2_layer=1)
    with torch.no_grad(), tp.apply(vlm.model, method):
        out = vlm.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    prompt_length = inputs["input_ids"].shape[1]
    positions, seq = stage1_sequence(vlm, inputs, method)
    with torch.no_grad():
        for step in range(4):
            generated = out.sequences[0, prompt_length: prompt_length + step].tolist()
            logits, _ = two_phase_reference(vlm, method, positions, seq, generated)
            torch.testing.assert_close(out.logits[step][0], logits, rtol=1e-5, atol=1e-5)


def test_every_cache_holds_exactly_the_kept_tokens():
    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = video_inputs(vlm, seed=1)
    M = 2
    with torch.no_grad():
        with tp.apply(vlm.model, "prunevid", stage2=False) as stage1_session:
            stage1_cache = output_cache(vlm.model(**inputs, use_cache=True))
        with tp.apply(vlm.model, "prunevid", stage2_layer=M, stage2_keep=0.4) as session:
            cache = output_cache(vlm.model(**inputs, use_cache=True))
    report = session.last_report
    L1 = stage1_session.last_report.tokens_entering_decoder
    n_text = inputs.layout.length - inputs.layout.num_visual
    L2 = n_text + report.stats["prunevid_stage2_tokens"]
    assert report.layer_tokens == [L1] * (M + 1) + [L2] * (6 - M - 1)
    assert [layer.get_seq_length() for layer in cache.layers] == [L2] * 6
    # layers 0..M computed the whole stage-1 sequence: their caches are its keys / values at the kept rows
    layout1 = _stage1_layout(vlm, inputs)
    kept_originals = set(report.kept[M + 1])
    rows = [i for i in range(L1) if not bool(layout1.is_visual[i]) or int(layout1.original[i]) in kept_originals]
    assert len(rows) == L2
    for i in range(M + 1):
        assert torch.equal(cache.layers[i].keys, stage1_cache.layers[i].keys[:, :, rows])
        assert torch.equal(cache.layers[i].values, stage1_cache.layers[i].values[:, :, rows])


def test_caches_pruned_after_an_earlier_plain_selection_hold_the_right_rows():
    """Compose(uniform at layer 1, PruneVid stage 2 at 3): layer 0 cached the whole prompt, layers 1-2 the uniform
    survivors; pruning them all afterwards must keep, in each, the rows of the final survivors (driver fix)."""
    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = video_inputs(vlm, seed=7)
    uniform = {"layer": 1, "keep_ratio": 0.5}
    with torch.no_grad():
        with tp.apply(vlm.model, "uniform", **uniform) as plain_session:
            plain = output_cache(vlm.model(**inputs, use_cache=True))
        composed = tp.methods.Compose([tp.methods.create("uniform", **uniform),
                                       tp.methods.create("prunevid", stage1=False, stage2_layer=2)])
        with tp.apply(vlm.model, composed) as session:
            cache = output_cache(vlm.model(**inputs, use_cache=True))
    report, layout = session.last_report, inputs.layout
    survivors = sorted(set(layout.text_rows().tolist()) | set(report.kept[3]))  # original rows
    after_uniform = sorted(set(layout.text_rows().tolist()) | set(plain_session.last_report.kept[1]))
    assert set(survivors) < set(after_uniform)
    in_uniform = [after_uniform.index(row) for row in survivors]
    assert [layer.get_seq_length() for layer in cache.layers] == [len(survivors)] * 6
    assert torch.equal(cache.layers[0].keys, plain.layers[0].keys[:, :, survivors])
    for i in (1, 2):
        assert torch.equal(cache.layers[i].keys, plain.layers[i].keys[:, :, in_uniform])
        assert torch.equal(cache.layers[i].values, plain.layers[i].values[:, :, in_uniform])


def _stage1_layout(vlm, inputs):
    embeds, positions = stock_decoder_inputs(vlm, inputs)
    stage1 = tp.methods.create("prunevid", stage2=False)
    seq = DecoderInput(embeds, positions, inputs.layout)
    return seq.reduced(stage1.before_llm(seq)).layout


def test_stage2_keep_counts_and_text_survives():
    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = video_inputs(vlm, seed=2)
    layout1 = _stage1_layout(vlm, inputs)
    method = tp.methods.create("prunevid", stage2_layer=2, stage2_keep=0.4)
    visual1 = layout1.visual_rows()
    parts = method.parts(layout1, visual1)
    expected = sum(int(n * 0.4) for n in torch.bincount(parts)[torch.bincount(parts) > 0].tolist())
    with torch.no_grad(), tp.apply(vlm.model, method) as session:
        vlm.model(**inputs)
    report = session.last_report
    assert report.stats["prunevid_stage2_tokens"] == expected == len(report.kept[3])
    assert report.layer_visual[3] == expected
    assert report.layer_tokens[3] == inputs.layout.length - inputs.layout.num_visual + expected  # all text kept


def test_stage2_keep_one_reproduces_stage1_logits_exactly():
    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = video_inputs(vlm, seed=3)
    with torch.no_grad():
        with tp.apply(vlm.model, "prunevid", stage2=False):
            stage1 = vlm.model(**inputs).logits
        with tp.apply(vlm.model, "prunevid", stage2_keep=1.0, stage2_layer=2) as session:
            both = vlm.model(**inputs).logits
    assert torch.equal(both, stage1)
    assert session.last_report.stats["prunevid_stage2_tokens"] == session.last_report.stats["prunevid_stage1_tokens"]


def test_standard_scores_equal_eager_attention_maps():
    """score_attn=standard ranks by the attention layer M really applies: compare with eager output_attentions."""
    M = 2
    eager = tiny_vlm("tiny_qwen25vl", "eager")
    inputs = video_inputs(eager, seed=4)
    attentions, stage1_report = eager_attentions(eager, inputs, tp.methods.create("prunevid", stage2=False))
    layout1 = _stage1_layout(eager, inputs)
    probs = attentions[M].amax(0)  # [L1, L1], max over heads
    visual = layout1.visual_rows()
    text_after = torch.arange(int(visual[-1]) + 1, layout1.length)
    scores = probs[text_after][:, visual].amax(0)
    method = tp.methods.create("prunevid", stage2_layer=M, score_attn="standard")
    parts = method.parts(layout1, visual)
    expected = []
    for part in parts.unique().tolist():
        members = sorted((i for i in range(visual.numel()) if int(parts[i]) == part),
                         key=lambda i: (-float(scores[i]), i))
        expected += [int(layout1.original[visual[i]]) for i in members[: int(len(members) * 0.4)]]
    sdpa = tiny_vlm("tiny_qwen25vl", "sdpa")
    with torch.no_grad(), tp.apply(sdpa.model, method) as session:
        sdpa.model(**inputs)
    assert session.last_report.kept[M + 1] == sorted(expected)


def test_official_scores_ignore_positions():
    """prerope_nomask: permuting the visual tokens' position ids leaves the kept set unchanged (layer-0 scores)."""
    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = video_inputs(vlm, seed=5)
    _, positions = stock_decoder_inputs(vlm, inputs)
    visual = inputs.layout.visual_rows()
    shuffled = positions.clone()
    permutation = torch.randperm(visual.numel(), generator=torch.Generator().manual_seed(0))
    shuffled[:, :, visual] = positions[:, :, visual[permutation]]
    kept = {}
    for score_attn in ("prerope_nomask", "standard"):
        for name, position_ids in (("stock", positions), ("shuffled", shuffled)):
            with torch.no_grad(), tp.apply(vlm.model, "prunevid", stage1=False, stage2_layer=0,
                                           score_attn=score_attn) as session:
                vlm.model(**inputs, position_ids=position_ids.permute(1, 0, 2))
            kept[score_attn, name] = session.last_report.kept[1]
    assert kept["prerope_nomask", "stock"] == kept["prerope_nomask", "shuffled"]
    assert kept["standard", "stock"] != kept["standard", "shuffled"]  # RoPE'd scores do depend on positions


# ----------------------------------------------------------------------------------------------------------
# First decode position (done-when 5)
# ----------------------------------------------------------------------------------------------------------
def _first_decode_positions(vlm, inputs, method):
    """Position ids of the first decoded token: via generate, and via a manual forward without position_ids."""
    text_model = vlm.adapter.text_model(vlm.model)
    seen = []
    handle = text_model.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("position_ids")),
                                                  with_kwargs=True)
    try:
        with torch.no_grad(), tp.apply(vlm.model, method):
            seen.clear()
            vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
            from_generate = seen[1][-3:, 0, -1].tolist()  # rows t, h, w of the first decode call
            prefill = vlm.model(**inputs, use_cache=True)
            token = prefill.logits[:, -1:].argmax(-1)
            seen.clear()
            vlm.model(input_ids=token, use_cache=True, **cache_kwargs(type(vlm.model).forward, output_cache(prefill)))
            manual = seen[0][-3:, 0, -1].tolist()
    finally:
        handle.remove()
    return from_generate, manual


@pytest.mark.parametrize("fields", [{"stage2": False}, {"stage1": False, "stage2_layer": 2}, {"stage2_layer": 2}],
                         ids=["stage1", "stage2", "both"])
def test_first_decoded_position_equals_the_unpruned_models(fields):
    vlm = tiny_vlm("tiny_qwen25vl")
    # 16 frames at 1 fps: t advances 4 per temporal group, so the video's largest t (s + 28) lies beyond the last
    # prompt token's position (the text after a video restarts at s + 4): generate and a manual forward differ
    inputs = video_inputs(vlm, frames=16, fps=1.0, seed=6)
    assert float(inputs["second_per_grid_ts"][0]) == 2.0
    full, deltas = vlm.adapter.outer_model(vlm.model).get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"])
    last, largest = full[:, 0, -1], int(full.max())
    assert int(last.max()) < largest
    # manual computation: generate continues from the last prompt position; a plain forward from max + 1
    expected_generate = (last + 1).tolist()
    expected_manual = [largest + 1] * 3
    assert largest + 1 == inputs["input_ids"].shape[1] + int(deltas[0, 0])
    assert _first_decode_positions(vlm, inputs, tp.methods.create("baseline")) == (expected_generate, expected_manual)
    method = tp.methods.create("prunevid", **fields)
    assert _first_decode_positions(vlm, inputs, method) == (expected_generate, expected_manual)


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_qwen25vl"])
def test_manual_decode_after_shortened_caches_matches_generate(family):
    """Every cache is shortened (stage 1 and stage 2): a plain forward with the cache and no position_ids continues
    exactly like generate (here the last prompt position is the largest one, so both rules agree)."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(32)) if family == "tiny_llava" else video_inputs(vlm, seed=8)
    if family == "tiny_qwen25vl":
        full, _ = vlm.adapter.outer_model(vlm.model).get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            video_grid_thw=inputs["video_grid_thw"], second_per_grid_ts=inputs["second_per_grid_ts"])
        assert int(full[:, 0, -1].max()) == int(full.max())
    with torch.no_grad(), tp.apply(vlm.model, "prunevid", stage2_layer=1):
        out = vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        prefill = vlm.model(**inputs, use_cache=True)
        assert output_cache(prefill).get_seq_length() < inputs["input_ids"].shape[1]
        token = prefill.logits[:, -1:].argmax(-1)
        manual = vlm.model(input_ids=token, use_cache=True, **cache_kwargs(type(vlm.model).forward, output_cache(prefill))).logits[:, -1]
    torch.testing.assert_close(manual, out.logits[1], rtol=1e-5, atol=1e-5)  # fp32: prefill vs decode kernels
