"""Layer skip ``semantics: seed`` (issue 15 item 4, done-when 4): the seed's modified Qwen2.5-VL decoder, its
config.json keys (import / export), and the engine's robustness to a layer without KV-cache entries.

The reference decoder (``tests/seed_reference.py``) is written from the method card (§2.1, "Layer"), running the
stock modules of the tiny Qwen2.5-VL by hand — never tokenprune's code.
"""

import json
import logging

import pytest
import torch

import tokenprune as tp
from conftest import make_sample, tiny_vlm
from seed_reference import DECODE_STEPS, SeedDecoder, reference_run, text_model_inputs  # noqa: F401
from tokenprune.engine.cache import SkippedAttentionLayer
from tokenprune.engine.compat import output_cache
from tokenprune.engine.flops import DecoderShape, layer_flops
from tokenprune.methods.layerskip import LayerSkip, SkipPolicy, export_seed_config

QWEN = "tiny_qwen25vl"
# float32: the seed's masked MLP over all rows vs tokenprune's MLP over the gathered text rows, and SDPA over
# different query/key shapes, round differently in the last bits; logits of these models are O(1).
LOGITS = dict(rtol=1.3e-6, atol=1e-5)  # torch.testing's float32 defaults

POLICIES = {
    "mlp": dict(mlp=[4, 1], scalars={4: 0.5, 1: 1.25}),
    "attn": dict(attn=[0, 3]),  # layer 0's attention: layer 0 holds no KV entry at all
    "mixed": dict(mlp=[0, 2, 5], attn=[0, 2, 4], scalars={0: 0.75, 2: 1.5, 5: 0.9}),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def tokenprune_run(vlm, inputs, method, tokens):
    """The same under tokenprune: one prefill forward, then manual cached steps fed ``tokens``."""
    with torch.no_grad(), tp.apply(vlm.model, method):
        out = vlm.model(**inputs, use_cache=True)
        cache, logits = output_cache(out), []
        for token in tokens[:-1]:
            step = vlm.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            logits.append(step.logits[0, -1])
            cache = output_cache(step)
    return out.logits[0], torch.stack(logits) if logits else None, cache


# ---------------------------------------------------------------------------------------------------------
# Done-when 4: semantics=seed equals the seed's decoder, prefill and cached decode
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_seed_semantics_equal_the_seeds_decoder(name):
    vlm = tiny_vlm(QWEN)
    inputs = vlm.prepare(make_sample(40))
    policy = POLICIES[name]
    prefill, tokens, decode = reference_run(vlm, inputs, policy)
    method = LayerSkip(**policy, semantics="seed")
    got_prefill, got_decode, cache = tokenprune_run(vlm, inputs, method, tokens)
    torch.testing.assert_close(got_prefill, prefill, **LOGITS)  # every prompt row, not only the last
    torch.testing.assert_close(got_decode, decode, **LOGITS)
    stock = vlm.model(**inputs).logits[0]
    assert not torch.allclose(got_prefill, stock, **LOGITS)  # the policy really acts
    for layer in range(len(cache.layers)):  # skipped attention: no keys or values, only the row count
        entry = cache.layers[layer]
        assert isinstance(entry, SkippedAttentionLayer) == (layer in policy.get("attn", []))
        assert entry.get_seq_length() == inputs["input_ids"].shape[1] + DECODE_STEPS
        assert (entry.keys is None) == (layer in policy.get("attn", []))


def test_generate_under_seed_semantics_follows_the_seeds_greedy_tokens():
    """``generate`` reads the cache length from layer 0 (input slicing, masks, 3-D positions): with layer 0's
    attention skipped it must still continue from the prompt."""
    vlm = tiny_vlm(QWEN)
    inputs = vlm.prepare(make_sample(41))
    for name in ("attn", "mixed"):
        policy = POLICIES[name]
        prefill, tokens, decode = reference_run(vlm, inputs, policy)
        with torch.no_grad(), tp.apply(vlm.model, LayerSkip(**policy, semantics="seed")):
            out = vlm.model.generate(**inputs, max_new_tokens=DECODE_STEPS + 1, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        assert out.sequences[0, inputs["input_ids"].shape[1]:].tolist() == tokens, name
        logits = torch.cat(out.logits)  # [steps + 1, V]: the prompt's last row, then each decoding step
        torch.testing.assert_close(logits, torch.cat([prefill[-1:], decode]), **LOGITS)


def test_the_seeds_text_rows_are_scaled_and_video_pads_are_text():
    """Card §2.1: under an MLP skip every prefill row is scaled by s, and only image pads skip the MLP (video pads
    run it, scaled); tokenprune's semantics: video rows are visual, text rows exact."""
    vlm = tiny_vlm(QWEN)
    sample = tp.data.create_dataset("synthetic_video", n_samples=1, frames=4, frame_size=56)[0]
    inputs = vlm.prepare(sample)
    layout = inputs.layout
    video = layout.kind == 2
    assert video.any() and not (layout.kind == 1).any()
    index, scale = 2, 0.5
    layer = vlm.model.model.language_model.layers[index]
    seen = {}

    def grab(module, args, kwargs, output):
        seen["in"], seen["out"] = (args[0] if args else kwargs["hidden_states"]).clone(), output.clone()

    def run(semantics):
        with torch.no_grad(), tp.apply(vlm.model, LayerSkip(mlp=[index], scalars={index: scale}, semantics=semantics)):
            handle = layer.register_forward_hook(grab, with_kwargs=True)
            try:
                vlm.model(**inputs, use_cache=False)
            finally:
                handle.remove()
        return seen["in"], seen["out"]

    h, seed_out = run("seed")
    with torch.no_grad():
        u = h + layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=None,
                                position_embeddings=vlm.model.model.language_model.rotary_emb(
                                    h, text_model_inputs(vlm, inputs)[1]))[0]
        full = scale * u + layer.mlp(layer.post_attention_layernorm(u))
    torch.testing.assert_close(seed_out, full, **LOGITS)  # video pads included: nothing skips without image pads
    h, visual_out = run("visual")
    assert torch.equal(visual_out[0, video], scale * u[0, video])
    torch.testing.assert_close(visual_out[0, ~video], (u + layer.mlp(layer.post_attention_layernorm(u)))[0, ~video],
                               **LOGITS)


def test_seed_prefill_flops_drop_the_whole_attention_and_the_image_rows_mlp():
    vlm = tiny_vlm(QWEN)
    inputs = vlm.prepare(make_sample(42))
    layout = inputs.layout
    config = vlm.adapter.text_config(vlm.model)
    shape = DecoderShape.from_config(config)
    d, d_ff, n, length = config.hidden_size, config.intermediate_size, layout.num_visual, layout.length
    with torch.no_grad(), tp.apply(vlm.model, LayerSkip(mlp=[1, 2], attn=[2], semantics="seed")) as session:
        vlm.model(**inputs)
    full = shape.layers * layer_flops(shape, length)
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = 2 * length * d * 2 * (q_width + kv_width) + 4 * q_width * length * (length + 1) // 2
    assert session.last_report.flops(shape) == full - 2 * n * 6 * d * d_ff - attention


# ---------------------------------------------------------------------------------------------------------
# The seed's config.json: import (semantics seed, logged) and export
# ---------------------------------------------------------------------------------------------------------
SEED_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 64,
    "vision_config": {"depth": 2}, "skip_layer_mlp": [5, 0, 2], "skip_layer_attn": [0, 4],
    "mlp_scalars": {"5": 0.9066757559776306, "0": 1.0371835231781006, "2": 0.988783597946167},
}


def test_a_seed_config_runs_with_seed_semantics_and_says_so(tmp_path, caplog):
    vlm = tiny_vlm(QWEN)
    inputs = vlm.prepare(make_sample(43))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(SEED_CONFIG))
    with caplog.at_level(logging.INFO, logger="tokenprune"):
        method = LayerSkip(policy=str(tmp_path / "ckpt"))
    assert method.resolved_semantics == "seed" and method.describe()["resolved_semantics"] == "seed"
    assert "running it with semantics 'seed'" in caplog.text and "method.semantics=visual" in caplog.text
    policy = dict(mlp=SEED_CONFIG["skip_layer_mlp"], attn=SEED_CONFIG["skip_layer_attn"],
                  scalars={int(k): v for k, v in SEED_CONFIG["mlp_scalars"].items()})
    prefill, tokens, _ = reference_run(vlm, inputs, policy, steps=1)
    got, _, _ = tokenprune_run(vlm, inputs, method, tokens)
    torch.testing.assert_close(got, prefill, **LOGITS)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tokenprune"):
        visual = LayerSkip(policy=str(tmp_path / "ckpt"), semantics="visual")  # the user says otherwise
    assert visual.resolved_semantics == "visual" and "semantics 'seed'" not in caplog.text
    with torch.no_grad(), tp.apply(vlm.model, visual):
        assert not torch.allclose(vlm.model(**inputs).logits[0], got, **LOGITS)


def test_policy_files_record_their_semantics(tmp_path):
    policy = SkipPolicy.from_mapping(SEED_CONFIG, "test")
    for semantics in ("seed", "visual"):
        (tmp_path / f"{semantics}.json").write_text(json.dumps({**policy.to_dict(), "semantics": semantics}))
        assert LayerSkip(policy=str(tmp_path / f"{semantics}.json")).resolved_semantics == semantics
    (tmp_path / "plain.json").write_text(json.dumps(policy.to_dict()))  # no semantics, not a model config
    assert LayerSkip(policy=str(tmp_path / "plain.json")).resolved_semantics == "visual"
    (tmp_path / "bad.json").write_text(json.dumps({**policy.to_dict(), "semantics": "both"}))
    with pytest.raises(ValueError, match=r"bad.json\).semantics must be one of \['visual', 'seed'\]"):
        LayerSkip(policy=str(tmp_path / "bad.json"))


def test_a_seed_config_round_trips_through_import_and_export(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SEED_CONFIG, indent=2))
    imported = LayerSkip(policy=str(path)).skip_policy
    copy = tmp_path / "copy.json"  # the same checkpoint config without the seed's keys: they are written back
    copy.write_text(json.dumps({key: value for key, value in SEED_CONFIG.items() if key not in
                                ("skip_layer_mlp", "skip_layer_attn", "mlp_scalars")}))
    written, updated = export_seed_config(imported, copy)
    assert updated and json.loads(written.read_text()) == SEED_CONFIG  # every key and value, scalars to the bit
    fresh, updated = export_seed_config(imported, tmp_path / "new" / "seed.json")
    assert not updated and json.loads(fresh.read_text()) == {key: SEED_CONFIG[key] for key in
                                                             ("skip_layer_mlp", "skip_layer_attn", "mlp_scalars")}
    assert LayerSkip(policy=str(fresh), semantics="seed").skip_policy == imported


def test_attention_scalars_have_no_seed_form():
    with pytest.raises(ValueError, match=r"attention scalars \{3: 0.9\} cannot be written as the seed's config"):
        SkipPolicy.from_mapping({"skip_layer_attn": [3], "attn_scalars": {"3": 0.9}}, "test").to_seed_config()
    with pytest.raises(ValueError, match=r"layerskip.attn_scalars \{3: 0.9\}: semantics 'seed' skips a listed "
                                         r"attention for every token, without a scalar"):
        LayerSkip(attn=[3], attn_scalars={3: 0.9}, semantics="seed")


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------
def test_bad_semantics_is_refused():
    with pytest.raises(ValueError, match=r"layerskip.semantics must be one of \['visual', 'seed'\]"):
        LayerSkip(mlp=[1], semantics="all")


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_qwen2vl"])
def test_seed_semantics_are_refused_outside_qwen25vl(family):
    vlm = tiny_vlm(family)
    with pytest.raises(ValueError, match=r"semantics='seed' is the seed's modified Qwen2.5-VL decoder, defined "
                                         r"for the model families \['qwen25vl'\]"):
        with tp.apply(vlm.model, LayerSkip(mlp=[1], semantics="seed")):
            pass


def test_an_attention_skip_for_every_row_is_refused_with_token_pruning():
    vlm = tiny_vlm(QWEN)
    method = tp.methods.Compose([tp.methods.create("fastv", layer=2, keep_ratio=0.5),
                                 LayerSkip(attn=[3], semantics="seed")])
    with torch.no_grad(), tp.apply(vlm.model, method):
        with pytest.raises(tp.engine.contract.PruningInputError, match="cannot be combined with token pruning"):
            vlm.model(**vlm.prepare(make_sample(44)))


def test_a_text_only_prompt_still_runs_the_seeds_decoder():
    """The seed's mask is all text then: every row is scaled and runs the MLP, the attention is skipped."""
    vlm = tiny_vlm(QWEN)
    inputs = vlm.prepare(tp.Sample(id="t", question="what colour is the square ?"))
    assert inputs.layout.num_visual == 0
    policy = POLICIES["mixed"]
    prefill, tokens, decode = reference_run(vlm, inputs, policy)
    with pytest.warns(UserWarning, match="no visual tokens; nothing is pruned"):
        got_prefill, _, _ = tokenprune_run(vlm, inputs, LayerSkip(**policy, semantics="seed"), tokens[:1])
        with torch.no_grad(), tp.apply(vlm.model, LayerSkip(**policy, semantics="seed")):
            out = vlm.model.generate(**inputs, max_new_tokens=DECODE_STEPS + 1, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(got_prefill, prefill, **LOGITS)
    assert out.sequences[0, inputs["input_ids"].shape[1]:].tolist() == tokens
    torch.testing.assert_close(torch.cat(out.logits), torch.cat([prefill[-1:], decode]), **LOGITS)
    shape = DecoderShape.from_config(vlm.adapter.text_config(vlm.model))
    with torch.no_grad(), tp.apply(vlm.model, LayerSkip(**policy, semantics="seed")) as session:
        vlm.model(**inputs)
    report = session.last_report
    assert sorted(report.layer_plans) == [0, 2, 4, 5] and report.layer_tokens == [inputs.layout.length] * 6
    assert report.flops(shape) < shape.layers * layer_flops(shape, inputs.layout.length)  # the skipped attentions
