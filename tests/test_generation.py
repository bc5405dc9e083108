"""Done-when 3, 4, 5 and 7: cached decoding, per-layer cache lengths, 3-D positions, batches."""

import pytest
import torch

import tokenprune as tp
from conftest import make_sample, stock_logits, tiny_vlm
from helpers import Replay, batched_inputs, forced_choice, forced_generation, prompt_so_far
from tokenprune.engine.compat import cache_kwargs, output_cache
from tokenprune.engine.driver import PruningInputError
from tokenprune.methods.base import resolve_positions
from tokenprune.methods.pdrop import OFFICIAL_POSITIONS, PDrop

METHODS = [
    ("fastv", {"layer": 2, "keep_ratio": 0.25}),
    ("pdrop", {"layers": [1, 3, 5], "ratios": [0.5, 0.25, 0.125]}),
    ("uniform", {"keep_ratio": 0.25, "layer": 1}),
]
NEW_TOKENS = 8


def _generate(vlm, inputs, method, fields):
    with torch.no_grad(), tp.apply(vlm.model, method, **fields) as session:
        out = vlm.model.generate(**inputs, **forced_generation(vlm, NEW_TOKENS))
    return out, session.last_report


@pytest.mark.parametrize("name,fields", METHODS, ids=[m for m, _ in METHODS])
def test_cached_generation_equals_recomputing_the_pruned_prefill(family, name, fields):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(11))
    out, report = _generate(vlm, inputs, name, fields)
    prompt_length = inputs["input_ids"].shape[1]
    method = tp.methods.create(name, **fields)
    # PDrop (scored base, issue 18) re-numbers positions where its positions rule resolves to reindex: LLaVA by default
    reindex = isinstance(method, PDrop) and \
        resolve_positions(name, method.positions, OFFICIAL_POSITIONS, vlm.info()) == "reindex"
    replay = Replay(kept=report.kept, reindex=reindex)
    for step in range(NEW_TOKENS):
        extended = prompt_so_far(inputs, out.sequences, step)
        with torch.no_grad(), tp.apply(vlm.model, replay):
            recomputed = vlm.model(**extended, use_cache=False).logits[:, -1]  # the whole pruned prefill again
        torch.testing.assert_close(out.logits[step], recomputed, rtol=1e-5, atol=1e-5)  # fp32 kernel differences
        assert forced_choice(vlm, recomputed) == int(out.sequences[0, prompt_length + step])


@pytest.mark.parametrize("name,fields", METHODS, ids=[m for m, _ in METHODS])
def test_kv_cache_lengths_follow_the_schedule(family, name, fields):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(12))
    layout = inputs.layout
    with torch.no_grad(), tp.apply(vlm.model, name, **fields) as session:
        out = vlm.model(**inputs, use_cache=True)
        cache = output_cache(out)
        lengths = [cache.layers[i].get_seq_length() for i in range(len(cache.layers))]
        # one decode step: every layer grows by exactly one
        next_token = out.logits[:, -1:].argmax(-1)
        vlm.model(input_ids=next_token, use_cache=True, **cache_kwargs(type(vlm.model).forward, cache))
        grown = [cache.layers[i].get_seq_length() for i in range(len(cache.layers))]
    report = session.last_report
    expected = [layout.length - layout.num_visual + visual for visual in report.layer_visual]
    assert lengths == expected
    assert grown == [n + 1 for n in lengths]


def test_pdrop_cache_schedule_by_hand():
    vlm = tiny_vlm("tiny_llava", layers=8)
    inputs = vlm.prepare(make_sample(13))
    L, N = inputs.layout.length, inputs.layout.num_visual  # N = 36 visual tokens
    with torch.no_grad(), tp.apply(vlm.model, "pdrop", layers=[2, 4, 6], ratios=[0.5, 0.25, 0.125]):
        cache = output_cache(vlm.model(**inputs, use_cache=True))
    lengths = [layer.get_seq_length() for layer in cache.layers]
    assert lengths == [L] * 2 + [L - 18] * 2 + [L - 27] * 2 + [L - 32] * 2  # floor(36 r): 18, 9, 4


def _spy_tables(layer_module, store):
    def hook(module, args, kwargs):
        store.append(tuple(t.clone() for t in kwargs["position_embeddings"]))
    return layer_module.register_forward_pre_hook(hook, with_kwargs=True)


def test_qwen_survivors_keep_their_3d_positions_and_decode_continues():
    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = vlm.prepare(make_sample(14))
    text_model = vlm.adapter.text_model(vlm.model)
    outer = vlm.adapter.outer_model(vlm.model)
    full_positions, deltas = outer.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                  image_grid_thw=inputs["image_grid_thw"])  # [3, 1, L]
    # the image really has 2-D positions (h and w differ from t), so gathering them is non-trivial
    visual = inputs.layout.visual_rows()
    assert not torch.equal(full_positions[1, 0, visual], full_positions[2, 0, visual])
    tables = []
    with torch.no_grad(), tp.apply(vlm.model, "fastv", layer=2, keep_ratio=0.25) as session:
        handle = _spy_tables(text_model.layers[3], tables)
        try:
            vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        finally:
            handle.remove()
    kept_rows = torch.tensor(sorted(set(inputs.layout.text_rows().tolist()) | set(session.last_report.kept[2])))
    hidden = torch.zeros(1, 1, text_model.config.hidden_size)
    expected_prefill = text_model.rotary_emb(hidden, full_positions[:, :, kept_rows])
    torch.testing.assert_close(tables[0][0], expected_prefill[0], rtol=0, atol=0)
    torch.testing.assert_close(tables[0][1], expected_prefill[1], rtol=0, atol=0)
    # first decode step: position = last prompt position + 1 on every axis (= the unpruned model's)
    L = inputs["input_ids"].shape[1]
    first_decode = full_positions[:, :, -1:] + 1
    assert int(first_decode[0, 0, 0]) == L + int(deltas[0, 0])
    expected_decode = text_model.rotary_emb(hidden, first_decode)
    torch.testing.assert_close(tables[1][0], expected_decode[0], rtol=0, atol=0)


def test_manual_decode_without_positions_matches_generate(family):
    """Both decode paths (generate's position_ids, and a plain forward that derives them) agree."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(15))
    with torch.no_grad(), tp.apply(vlm.model, "pdrop", layers=[1, 3], ratios=[0.5, 0.25]):
        out = vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        prefill = vlm.model(**inputs, use_cache=True)
        token = prefill.logits[:, -1:].argmax(-1)
        manual = vlm.model(input_ids=token, use_cache=True, **cache_kwargs(type(vlm.model).forward, output_cache(prefill))).logits[:, -1]
    torch.testing.assert_close(manual, out.logits[1], rtol=1e-5, atol=1e-5)


def test_padded_batch_is_refused_with_a_clear_error(family):
    vlm = tiny_vlm(family)
    processor = vlm.processor
    processor.tokenizer.padding_side = "left"
    samples = [make_sample(16, "what colour is the square ?"), make_sample(17, "how many red objects are in the image ?")]
    first, second = vlm.prepare(samples[0]), vlm.prepare(samples[1])
    assert first["input_ids"].shape[1] != second["input_ids"].shape[1]
    batch = batched_inputs(vlm, samples)
    assert not bool(batch["attention_mask"].all())
    with torch.no_grad(), tp.apply(vlm.model, "fastv"):
        with pytest.raises(PruningInputError, match="padded batches are not supported"):
            vlm.model.generate(**batch, max_new_tokens=2)


def test_unpadded_batch_equals_each_sample_alone(family):
    vlm = tiny_vlm(family)
    samples = [make_sample(18), make_sample(19)]  # same question: equal lengths, no padding
    batch = batched_inputs(vlm, samples)
    assert bool(batch["attention_mask"].all())
    with torch.no_grad(), tp.apply(vlm.model, "fastv", keep_ratio=0.25):
        together = vlm.model(**batch).logits[:, -1]
        alone = torch.cat([vlm.model(**vlm.prepare(s)).logits[:, -1] for s in samples])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_text_only_input_passes_through_with_a_warning(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(tp.Sample(id="t", question="what colour is the square ?"))
    assert inputs.layout.num_visual == 0
    reference = stock_logits(vlm, inputs)
    with torch.no_grad(), tp.apply(vlm.model, "fastv"):
        with pytest.warns(UserWarning, match="no visual tokens"):
            logits = vlm.model(**inputs).logits
    assert torch.equal(logits, reference)


def test_generate_prunes_once_at_prefill_and_decodes_on_the_pruned_cache(family):
    """Every supported transformers passes the cache to the decoder under its own keyword (``past_key_values``
    up to 5.23, ``cache`` from 5.24): decode steps must be recognised as decoding, not as fresh prefills of one
    text token (which would warn about missing visual tokens and overwrite the prefill's report)."""
    import warnings

    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(13))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, report = _generate(vlm, inputs, "fastv", {"layer": 2, "keep_ratio": 0.25})
    assert not [w for w in caught if "no visual tokens" in str(w.message)]
    n = inputs.layout.num_visual
    assert report.prompt_tokens == inputs["input_ids"].shape[1]
    assert report.layer_visual == [n, n] + [round(n * 0.25)] * 4
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS


def test_cache_helpers_match_the_installed_transformers_without_deprecation_warnings():
    """``output_cache`` returns the very cache object of a forward (None without ``use_cache``) and ``cache_kwargs``
    feeds it back under the installed keyword: decoding with it equals decoding the full sequence, and neither
    trips transformers' deprecated-alias warnings (``past_key_values`` is removed from the forwards in 5.40).
    LLaVA: a text-only Qwen2.5-VL call decodes with the mRoPE offset of the model's previous multimodal prefill."""
    import warnings

    vlm = tiny_vlm("tiny_llava")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        prefill = vlm.model(input_ids=ids[:, :3], use_cache=True)
        cache = output_cache(prefill)
        assert cache is not None and cache.get_seq_length() == 3
        assert output_cache(vlm.model(input_ids=ids[:, :3], use_cache=False)) is None
        step = vlm.model(input_ids=ids[:, 3:], use_cache=True, **cache_kwargs(type(vlm.model).forward, cache))
        full = vlm.model(input_ids=ids, use_cache=False)
    assert output_cache(step) is cache and cache.get_seq_length() == 4
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)  # fp32, cached vs not
