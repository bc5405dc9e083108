"""Layer skip (method + engine/sublayers.py): done-when 1 and 2, the real saving, decoding, policy files, errors.

References are computed in the tests from the stock modules of the same layer (and, for the attention, from a
float64 attention written here), never from tokenprune's sublayer code.
"""

import json
from dataclasses import dataclass

import pytest
import torch
import yaml

import tokenprune as tp
from conftest import make_sample, stock_logits, tiny_vlm
from helpers import forced_choice, forced_generation, prompt_so_far
from tokenprune.engine.compat import output_cache
from tokenprune.engine.flops import DecoderShape, layer_flops, planned_prefill_flops
from tokenprune.methods.layerskip import LayerSkip, SkipPolicy

FP32 = dict(rtol=1e-5, atol=1e-5)  # float32: a matmul over a gathered subset of rows vs over all rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


@dataclass
class LayerCall:
    hidden: torch.Tensor  # [1, L, d] entering the layer
    kwargs: dict  # what the stock loop passed (position_embeddings, attention_mask, ...)
    output: torch.Tensor  # [1, L, d] leaving the layer


def capture_layer(vlm, inputs, index: int, method=None, **forward) -> tuple[LayerCall, object]:
    """One forward (stock, or under ``method``); the inputs and output of decoder layer ``index``."""
    layer = vlm.adapter.text_model(vlm.model).layers[index]
    seen = {}

    def before(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).clone()
        seen["kwargs"] = dict(kwargs)

    def after(module, args, kwargs, output):
        seen["output"] = output.clone()

    with torch.no_grad():
        if method is None:
            handles = [layer.register_forward_pre_hook(before, with_kwargs=True),
                       layer.register_forward_hook(after, with_kwargs=True)]
            try:
                out = vlm.model(**inputs, **forward)
            finally:
                for handle in handles:
                    handle.remove()
        else:
            with tp.apply(vlm.model, method):  # the driver's hooks run first, ours see what the layer sees
                handles = [layer.register_forward_pre_hook(before, with_kwargs=True),
                           layer.register_forward_hook(after, with_kwargs=True)]
                try:
                    out = vlm.model(**inputs, **forward)
                finally:
                    for handle in handles:
                        handle.remove()
    return LayerCall(seen["hidden"], seen["kwargs"], seen["output"]), out


def stock_attention(layer, call: LayerCall) -> torch.Tensor:
    """The stock attention sublayer's output for every row, ``[1, L, d]``."""
    normed = layer.input_layernorm(call.hidden)
    output, _ = layer.self_attn(hidden_states=normed, attention_mask=call.kwargs["attention_mask"],
                                position_embeddings=call.kwargs["position_embeddings"])
    return output


def float64_text_attention(layer, call: LayerCall, text: torch.Tensor) -> torch.Tensor:
    """Attention output of the ``text`` query rows only, in float64: every row's keys/values, causal, GQA."""
    attention = layer.self_attn
    x = layer.input_layernorm(call.hidden)[0].double()  # [L, d]
    cos, sin = (t[0].double() for t in call.kwargs["position_embeddings"])  # [L, hd]
    hd = attention.head_dim

    def project(linear, rows):
        weight, bias = linear.weight.double(), None if linear.bias is None else linear.bias.double()
        return torch.nn.functional.linear(rows, weight, bias)

    def rope(t, c, s):  # t: [heads, n, hd]
        half = hd // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], -1)
        return t * c + rotated * s

    def head_norm(t, norm):  # t: [n, heads, hd]; a per-head RMSNorm before RoPE where the layer has one (Qwen3)
        if norm is None:
            return t
        return norm.weight.double() * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

    q = project(attention.q_proj, x[text]).view(len(text), -1, hd)
    k = project(attention.k_proj, x).view(x.shape[0], -1, hd)
    q = rope(head_norm(q, getattr(attention, "q_norm", None)).transpose(0, 1), cos[text], sin[text])
    k = rope(head_norm(k, getattr(attention, "k_norm", None)).transpose(0, 1), cos, sin)
    v = project(attention.v_proj, x).view(x.shape[0], -1, hd).transpose(0, 1)
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    scores = q @ k.transpose(1, 2) * hd**-0.5  # [H, n_text, L]
    hidden_keys = torch.arange(x.shape[0])[None, :] > text[:, None]
    probs = scores.masked_fill(hidden_keys, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(0, 1).reshape(len(text), -1)
    return project(attention.o_proj, out)[None].float()  # [1, n_text, d]


# ---------------------------------------------------------------------------------------------------------
# Done-when 1: the empty policy is the stock model
# ---------------------------------------------------------------------------------------------------------
def test_empty_policy_gives_the_stock_logits_and_generation(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(20))
    expected = stock_logits(vlm, inputs)
    with torch.no_grad(), tp.apply(vlm.model, "layerskip") as session:
        logits = vlm.model(**inputs).logits
        generated = vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    stock_generated = vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(logits, expected)  # bitwise
    assert torch.equal(generated, stock_generated)
    assert not session.installed  # nothing to do: the stock forward ran


def test_layers_outside_the_policy_run_the_stock_layer(family):
    """With a policy installed, the layers it does not list are bitwise the stock layers."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(21))
    stock = vlm.model(**inputs, output_hidden_states=True).hidden_states
    with torch.no_grad(), tp.apply(vlm.model, "layerskip", mlp=[4], attn=[4]):
        skipped = vlm.model(**inputs, output_hidden_states=True).hidden_states
    for index in range(5):  # hidden states entering layers 0..4
        assert torch.equal(skipped[index], stock[index]), index
    assert not torch.equal(skipped[5], stock[5])


# ---------------------------------------------------------------------------------------------------------
# Done-when 2: one layer against manual computations
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.75])
def test_mlp_skip_sets_visual_rows_to_scaled_residual_and_keeps_text_rows(family, scale):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(22))
    layout = inputs.layout
    visual, text = layout.visual_rows(), layout.text_rows()
    index = 2
    layer = vlm.adapter.text_model(vlm.model).layers[index]
    stock, _ = capture_layer(vlm, inputs, index)
    skipped, _ = capture_layer(vlm, inputs, index, LayerSkip(mlp=[index], scalars={index: scale}))
    with torch.no_grad():
        u = stock.hidden + stock_attention(layer, stock)  # post-attention residual, every row
        full = u + layer.mlp(layer.post_attention_layernorm(u))  # the stock layer, computed by hand
    assert torch.equal(skipped.hidden, stock.hidden)  # layers below are untouched
    torch.testing.assert_close(full, stock.output, rtol=0, atol=0)  # the manual layer is the stock layer
    assert torch.equal(skipped.output[:, visual], scale * u[:, visual])  # exactly s * u
    torch.testing.assert_close(skipped.output[:, text], full[:, text], **FP32)
    assert not torch.allclose(skipped.output[:, visual], full[:, visual], **FP32)  # the skip changed something


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_attention_skip_removes_visual_queries_and_keeps_their_keys(family, scale):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(23))
    layout = inputs.layout
    visual, text = layout.visual_rows(), layout.text_rows()
    index = 3
    layer = vlm.adapter.text_model(vlm.model).layers[index]
    stock, stock_out = capture_layer(vlm, inputs, index, use_cache=True)
    skipped, skipped_out = capture_layer(vlm, inputs, index, LayerSkip(attn=[index], attn_scalars={index: scale}),
                                         use_cache=True)
    with torch.no_grad():
        text_attention = float64_text_attention(layer, stock, text)  # visual queries removed, all keys/values
        torch.testing.assert_close(stock_attention(layer, stock)[:, text], text_attention, **FP32)
        u = stock.hidden.clone()
        u[:, text] = stock.hidden[:, text] + text_attention
        u[:, visual] = scale * stock.hidden[:, visual]
        expected = u + layer.mlp(layer.post_attention_layernorm(u))
    torch.testing.assert_close(skipped.output[:, text], expected[:, text], **FP32)
    # visual rows: a * h, then the stock MLP on them (row-wise, so bitwise equal to the manual computation)
    assert torch.equal(skipped.output[:, visual], expected[:, visual])
    # keys and values of every row (visual included) are cached, bitwise those of the stock layer
    stock_cache, cache = output_cache(stock_out).layers[index], output_cache(skipped_out).layers[index]
    assert cache.keys.shape[-2] == layout.length
    assert torch.equal(cache.keys, stock_cache.keys) and torch.equal(cache.values, stock_cache.values)


def test_attention_and_mlp_skip_in_one_layer(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(24))
    visual, text = inputs.layout.visual_rows(), inputs.layout.text_rows()
    index = 1
    layer = vlm.adapter.text_model(vlm.model).layers[index]
    stock, _ = capture_layer(vlm, inputs, index)
    both, _ = capture_layer(vlm, inputs, index, LayerSkip(mlp=[index], attn=[index], scalars={index: 1.25},
                                                          attn_scalars={index: 0.5}))
    with torch.no_grad():
        u_text = stock.hidden[:, text] + float64_text_attention(layer, stock, text)
        y_text = u_text + layer.mlp(layer.post_attention_layernorm(u_text))
    assert torch.equal(both.output[:, visual], 1.25 * (0.5 * stock.hidden[:, visual]))
    torch.testing.assert_close(both.output[:, text], y_text, **FP32)


# ---------------------------------------------------------------------------------------------------------
# The saving is real: skipped visual rows never enter the skipped sublayer's matrices
# ---------------------------------------------------------------------------------------------------------
def _row_counter(modules: dict):
    counts, handles = {}, []
    for name, module in modules.items():
        def hook(mod, args, name=name):
            counts.setdefault(name, []).append(args[0].shape[-2])
        handles.append(module.register_forward_pre_hook(hook))
    return counts, handles


def test_skipped_visual_rows_are_not_computed(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(25))
    L, n_text = inputs.layout.length, inputs.layout.length - inputs.layout.num_visual
    layers = vlm.adapter.text_model(vlm.model).layers
    modules = {f"{op}{i}": getattr(layers[i].self_attn, op) if op.endswith("proj") else getattr(layers[i], op)
               for i in (2, 3) for op in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")}
    counts, handles = _row_counter(modules)
    try:
        with torch.no_grad(), tp.apply(vlm.model, "layerskip", mlp=[2], attn=[3]) as session:
            vlm.model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert counts == {"q_proj2": [L], "k_proj2": [L], "v_proj2": [L], "o_proj2": [L], "mlp2": [n_text],
                      "q_proj3": [n_text], "k_proj3": [L], "v_proj3": [L], "o_proj3": [n_text], "mlp3": [L]}
    assert sorted(session.last_report.layer_plans) == [2, 3]


def test_planned_flops_by_hand():
    """Card §5: per visual token, an MLP skip saves 6 d d_ff; an attention skip 4 d^2 + 4 d k_i (Qwen2.5-VL-7B)."""
    shape = DecoderShape(hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, layers=28)
    kind = torch.zeros(1088, dtype=torch.long)
    kind[20:1044] = 1  # 1024 visual rows at rows 20..1043
    layout = tp.TokenLayout(kind, torch.where(kind > 0, 0, -1), torch.full((1088,), -1), torch.arange(1088), (),
                            1088, 1024)
    full = planned_prefill_flops(shape, layout, {})
    assert full == 28 * layer_flops(shape, 1088)
    nine_mlps = planned_prefill_flops(shape, layout, SkipPolicy(mlp=tuple(range(10, 19))).plans())
    assert full - nine_mlps == 9 * 1024 * 407_371_776  # 6 * 3584 * 18944 = 407.37 MFLOPs per token
    assert abs((full - nine_mlps) / 1e12 - 3.755) < 1e-3  # card worked example: 3.75 TFLOPs
    one_attn = planned_prefill_flops(shape, layout, SkipPolicy(attn=(5,)).plans())
    key_sum = sum(range(21, 1045))  # visual query at row p sees p + 1 keys
    assert full - one_attn == 1024 * 51_380_224 + 14_336 * key_sum  # 4 d^2 = 51.38 M, 4 d = 14 336


# ---------------------------------------------------------------------------------------------------------
# Decoding, batches, composition
# ---------------------------------------------------------------------------------------------------------
POLICY = dict(mlp=[1, 4, 5], attn=[2, 4], scalars={1: 0.9, 4: 1.1}, attn_scalars={2: 0.8})


def test_cached_generation_equals_teacher_forced_forwards(family):
    """Decode runs full layers: generating with the KV cache equals no-cache forwards of prompt + answer so far."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(26))
    steps = 5
    with torch.no_grad(), tp.apply(vlm.model, "layerskip", **POLICY):
        out = vlm.model.generate(**inputs, **forced_generation(vlm, steps))
        prompt = inputs["input_ids"].shape[1]
        for step in range(steps):
            recomputed = vlm.model(**prompt_so_far(inputs, out.sequences, step), use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], recomputed, **FP32)
            assert forced_choice(vlm, recomputed) == int(out.sequences[0, prompt + step])
    stock = stock_logits(vlm, inputs)[:, -1]
    assert not torch.allclose(out.logits[0], stock, **FP32)  # the policy really acted


def test_left_padded_batch_equals_single_samples(family):
    """Skipping is row-wise: samples whose visual tokens sit at different rows get their own exact result."""
    vlm = tiny_vlm(family)
    samples = [make_sample(27), make_sample(28, question="how many red objects ?")]
    processor = vlm.processor
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": s.question}]}],
                                           add_generation_prompt=True, tokenize=False) for s in samples]
    side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"
    try:
        batch = processor(images=[s.images[0] for s in samples], text=texts, padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = side
    assert batch["attention_mask"].sum(1).tolist()[0] > batch["attention_mask"].sum(1).tolist()[1]  # padded
    with torch.no_grad(), tp.apply(vlm.model, "layerskip", **POLICY):
        batched = vlm.model(**batch).logits[:, -1]
        single = [vlm.model(**vlm.prepare(s)).logits[0, -1] for s in samples]
    for b in range(2):
        torch.testing.assert_close(batched[b], single[b], **FP32)


def test_composes_with_token_pruning():
    """After a FastV drop the plan acts on the surviving layout: the MLP of layer 4 sees the text rows only."""
    vlm = tiny_vlm("tiny_llava")
    inputs = vlm.prepare(make_sample(29))
    n_text = inputs.layout.length - inputs.layout.num_visual
    counts, handles = _row_counter({"mlp4": vlm.adapter.text_model(vlm.model).layers[4].mlp})
    method = tp.methods.Compose([tp.methods.create("fastv", layer=2, keep_ratio=0.5), LayerSkip(mlp=[4])])
    try:
        with torch.no_grad(), tp.apply(vlm.model, method) as session:
            logits = vlm.model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    assert counts == {"mlp4": [n_text]}
    assert session.last_report.layer_tokens[4] == n_text + 18 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------
# Policy files
# ---------------------------------------------------------------------------------------------------------
def test_policy_files_give_identical_logits(tmp_path, family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(30))
    policy = SkipPolicy.from_mapping({"skip_layer_mlp": [5, 1, 4], "skip_layer_attn": [2, 4],
                                      "mlp_scalars": {"1": 0.9, "4": 1.1}, "attn_scalars": {"2": 0.8}}, "test")
    (tmp_path / "policy.json").write_text(json.dumps({**policy.to_dict(), "score": 0.1, "cost": 4.0}))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy.to_dict()))
    seed_config = {"architectures": ["X"], "text_config": {"hidden_size": 64}, "skip_layer_mlp": [5, 1, 4],
                   "skip_layer_attn": [2, 4], "mlp_scalars": {"1": 0.9, "4": 1.1}}  # the seed's keys, no attn_scalars
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(seed_config))
    nested = {"text_config": {"skip_layer_mlp": [5, 1, 4], "skip_layer_attn": [2, 4],
                              "mlp_scalars": {"1": 0.9, "4": 1.1}, "attn_scalars": {"2": 0.8}}}
    (tmp_path / "nested.json").write_text(json.dumps(nested))

    def logits(method):
        with torch.no_grad(), tp.apply(vlm.model, method):
            return vlm.model(**inputs).logits

    inline = logits(LayerSkip(**POLICY))
    for name in ("policy.json", "policy.yaml", "nested.json"):
        loaded = LayerSkip(policy=str(tmp_path / name))
        assert loaded.skip_policy.mlp == (5, 1, 4)  # selection order kept
        assert torch.equal(logits(loaded), inline), name
    # a checkpoint directory with the seed's config.json, read with tokenprune's semantics (it would run with the
    # seed's by default: tests/test_layerskip_seed.py)
    seed = logits(LayerSkip(policy=str(tmp_path / "model"), semantics="visual"))
    assert torch.equal(seed, logits(LayerSkip(mlp=[5, 1, 4], attn=[2, 4], scalars={1: 0.9, 4: 1.1})))
    assert not torch.equal(seed, inline)  # attn_scalars absent there: 1.0


def test_policy_round_trips_through_its_dict():
    policy = SkipPolicy().plus("mlp", 27, 0.9067).plus("attn", 3, 1.0).plus("mlp", 5, 1.0372)
    data = json.loads(json.dumps(policy.to_dict()))
    assert data == {"skip_layer_mlp": [27, 5], "skip_layer_attn": [3], "mlp_scalars": {"27": 0.9067, "5": 1.0372},
                    "attn_scalars": {"3": 1.0}}
    assert SkipPolicy.from_mapping(data, "test") == policy
    assert policy.format().splitlines()[:3] == ["Skipped MLPs: [27, 5]", "Skipped Attns: [3]",
                                                "Scalars: {27: 0.9067, 5: 1.0372}"]


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any model work
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,pattern", [
    (dict(mlp=[3, 3]), r"layerskip.mlp lists layer\(s\) \[3\] more than once"),
    (dict(mlp=[-1]), r"layerskip.mlp\[0\] must be >= 0"),
    (dict(attn=["2"]), r"layerskip.attn\[0\] must be an integer layer index"),
    (dict(mlp=5), r"layerskip.mlp must be a list of layer indices"),
    (dict(mlp=[2], scalars={3: 0.9}), r"layerskip.scalars has a scalar for layer 3, which layerskip.mlp does not"),
    (dict(mlp=[2], scalars={"two": 0.9}), r"layerskip.scalars keys must be layer indices"),
    (dict(mlp=[2], scalars={2: "x"}), r"layerskip.scalars\[2\] must be a finite number"),
    (dict(attn=[2], attn_scalars={2: float("nan")}), r"layerskip.attn_scalars\[2\] must be a finite number"),
    (dict(mlp=[2], policy="p.json"), r"either as policy=<file> or inline"),
])
def test_bad_fields_are_refused(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        LayerSkip(**fields)


def test_bad_policy_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"layerskip.policy \(.*missing.json\): cannot read the policy file"):
        LayerSkip(policy=str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken.json\): not valid JSON"):
        LayerSkip(policy=str(tmp_path / "broken.json"))
    (tmp_path / "other.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ValueError, match=r"has none of the policy keys \['skip_layer_mlp'"):
        LayerSkip(policy=str(tmp_path / "other.json"))
    (tmp_path / "bad.yaml").write_text("skip_layer_mlp: [1]\nmlp_scalars: {1: inf}\n")
    with pytest.raises(ValueError, match=r"bad.yaml\).mlp_scalars\[1\] must be a finite number"):
        LayerSkip(policy=str(tmp_path / "bad.yaml"))


def test_out_of_range_layers_are_refused_before_the_model_runs(family, tmp_path):
    vlm = tiny_vlm(family)
    calls = []
    handle = vlm.model.register_forward_pre_hook(lambda *args: calls.append(1))
    (tmp_path / "p.json").write_text(json.dumps({"skip_layer_mlp": [2, 6]}))
    try:
        with pytest.raises(ValueError, match=r"layerskip.attn\[1\]=9 is out of range: the model has 6 decoder "
                                             r"layers \(valid indices 0..5\)"):
            with tp.apply(vlm.model, "layerskip", attn=[1, 9]):
                vlm.model(**vlm.prepare(make_sample(0)))
        with pytest.raises(ValueError, match=r"layerskip.policy \(.*p.json\) skip_layer_mlp\[1\]=6 is out of range"):
            with tp.apply(vlm.model, "layerskip", policy=str(tmp_path / "p.json")):
                vlm.model(**vlm.prepare(make_sample(0)))
    finally:
        handle.remove()
    assert calls == []


def test_attention_maps_cannot_be_asked_for_with_an_attention_skip():
    vlm = tiny_vlm("tiny_llava", "eager")
    inputs = vlm.prepare(make_sample(31))
    with torch.no_grad(), tp.apply(vlm.model, "layerskip", attn=[2]):
        with pytest.raises(ValueError, match="output_attentions=True cannot be combined with an attention skip"):
            vlm.model(**inputs, output_attentions=True)
        assert vlm.model(**inputs).logits.shape[1] == inputs.layout.length  # the model still works after
    with torch.no_grad(), tp.apply(vlm.model, "layerskip", mlp=[2]):  # an MLP skip keeps every attention map
        assert len(vlm.model(**inputs, output_attentions=True).attentions) == 6


def test_method_describes_its_resolved_policy(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"skip_layer_mlp": [3], "mlp_scalars": {"3": 0.5}}))
    described = LayerSkip(policy=str(tmp_path / "p.json")).describe()
    assert described["policy"] == str(tmp_path / "p.json") and described["mlp"] == []
    assert described["resolved_policy"]["skip_layer_mlp"] == [3]
    assert described["resolved_policy"]["mlp_scalars"] == {"3": 0.5}


def test_video_tokens_count_as_visual():
    """Card §4: tokenprune includes video pads in V (the seed left them untouched)."""
    vlm = tiny_vlm("tiny_qwen25vl")
    sample = tp.data.create_dataset("synthetic_video", limit=1, frames=4, frame_size=56)[0]
    inputs = vlm.prepare(sample)
    layout = inputs.layout
    video = (layout.kind == 2).nonzero().flatten()  # VIDEO rows
    assert video.numel() > 0 and torch.equal(video, layout.visual_rows())
    index = 2
    layer = vlm.adapter.text_model(vlm.model).layers[index]
    stock, _ = capture_layer(vlm, inputs, index)
    skipped, _ = capture_layer(vlm, inputs, index, LayerSkip(mlp=[index], scalars={index: 0.5}))
    with torch.no_grad():
        u = stock.hidden + stock_attention(layer, stock)
    assert torch.equal(skipped.output[:, video], 0.5 * u[:, video])
    torch.testing.assert_close(skipped.output[:, layout.text_rows()], stock.output[:, layout.text_rows()], **FP32)


def test_the_prefill_report_counts_only_the_computed_rows(family):
    """``PrefillReport.flops`` (what the runner records) removes the skipped visual rows' work."""
    from tokenprune.run.measure import token_metrics

    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(32))
    layout = inputs.layout
    config = vlm.adapter.text_config(vlm.model)
    d, d_ff, n = config.hidden_size, config.intermediate_size, layout.num_visual
    shape = DecoderShape.from_config(config)
    assert shape.heads * shape.head_dim == d  # so the attention saving is 4 d^2 + 4 d k per visual query
    with torch.no_grad(), tp.apply(vlm.model, "layerskip", mlp=[2, 4], attn=[3]) as session:
        vlm.model(**inputs)
    report = session.last_report
    full = shape.layers * layer_flops(shape, layout.length)
    keys = int((layout.visual_rows() + 1).sum())
    assert report.flops(shape) == full - 2 * n * 6 * d * d_ff - (n * 4 * d * d + 4 * d * keys)
    assert token_metrics(vlm, layout, report)["flops"]["tokenprune"] == report.flops(shape)
    with torch.no_grad(), tp.apply(vlm.model, "fastv", layer=2, keep_ratio=0.5) as session:
        vlm.model(**inputs)
    report = session.last_report  # no layer plan: the per-layer token counts alone
    assert not report.layer_plans and report.flops(shape) == sum(layer_flops(shape, n) for n in report.layer_tokens)
