"""Layer-skip policy search (tokenprune.calibrate): done-when 3 and 4, card §8 tests 3-6 and 9, the CLI.

Independent references are written here: greedy answers and teacher-forced log-probabilities from plain
forwards, scalars from torch.linalg.lstsq on rows recomputed with the stock modules, KL from those log-probs.
The search tests run float64 copies of the tiny random models: their KLs are ~1e-5, where float32 rounding of
two different computation paths (e.g. logits of all rows vs of the answer rows only) would blur comparisons.
"""

import copy
import json
from functools import lru_cache

import pytest
import torch

import tokenprune as tp
from conftest import tiny_vlm
from tokenprune.calibrate.__main__ import main
from tokenprune.calibrate.layerskip import Calibration, ScalarFit, fit_policy, random_policies, search
from tokenprune.data import create_dataset
from tokenprune.methods.layerskip import LayerSkip, SkipPolicy
from tokenprune.models.zoo.checkpoints import packaged_checkpoint

N_SAMPLES, ANSWER_TOKENS = 4, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def samples(n=N_SAMPLES, split="train"):
    dataset = create_dataset("synthetic_image", split=split, limit=n)
    return [dataset[i] for i in range(n)]


@lru_cache(maxsize=None)
def float64_vlm(family: str, layers: int = 4):
    vlm = copy.copy(tiny_vlm(family, layers=layers))
    vlm.model = copy.deepcopy(vlm.model).double()
    return vlm


@lru_cache(maxsize=None)
def calibration(family: str, layers: int = 4) -> Calibration:
    """Cached: tests only read it (the search never modifies a Calibration's data)."""
    return Calibration(float64_vlm(family, layers), samples(), answer_tokens=ANSWER_TOKENS)


# ---------------------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------------------
def greedy_answer(vlm, inputs, k):
    """Greedy tokens by re-running the whole sequence each step (no KV cache, no generate)."""
    ids = inputs["input_ids"]
    extra = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask",
                                                                       "mm_token_type_ids")}
    answer = []
    eos = vlm.model.generation_config.eos_token_id
    for _ in range(k):
        step = dict(extra, input_ids=ids, attention_mask=torch.ones_like(ids))
        if "mm_token_type_ids" in inputs:
            step["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"],
                                                                (0, ids.shape[1] - inputs["input_ids"].shape[1]))
        with torch.no_grad():
            logits = vlm.model(**step, use_cache=False).logits[0, -1]
            config = vlm.model.config
            placeholders = [i for i in (config.image_token_id, getattr(config, "video_token_id", None)) if i is not None]
            logits[placeholders] = float("-inf")  # placeholders (image and video) are never answers
            token = logits.argmax()
        answer.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        if int(token) == eos:
            break
    return answer


def forced_log_probs(vlm, inputs, answer, method=None):
    """float64 log-probabilities at the answer positions from one forward of prompt + answer (all logits)."""
    prompt = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    forced = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in inputs:
        forced["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, len(answer)))
    with torch.no_grad(), tp.apply(vlm.model, method or "baseline"):
        logits = vlm.model(**forced, use_cache=False).logits[0, prompt - 1: prompt - 1 + len(answer)]
    return torch.log_softmax(logits.double(), -1)


def independent_score(vlm, data, policy):
    """Mean KL(p_orig || p_policy) over all answer positions, from scratch."""
    total, count = 0.0, 0
    for inputs, answer in data:
        p = forced_log_probs(vlm, inputs, answer)
        q = forced_log_probs(vlm, inputs, answer, LayerSkip.from_policy(policy))
        total += float((p.exp() * (p - q)).sum())
        count += len(answer)
    return total / count


def reference_data(vlm, sample_list):
    data = []
    for sample in sample_list:
        inputs = vlm.prepare(sample)
        data.append((inputs, greedy_answer(vlm, inputs, ANSWER_TOKENS)))
    return data


def lstsq_scalar(vlm, sample_list, op, index, parent=SkipPolicy()):
    """Least-squares s in (u + delta) ≈ s * u over every visual row, u/delta recomputed with the stock modules
    of layer ``index`` from the hidden states entering it under ``parent``."""
    layer = vlm.adapter.text_model(vlm.model).layers[index]
    xs, ys = [], []
    for sample in sample_list:
        inputs = vlm.prepare(sample)
        seen = {}

        def grab(module, args, kwargs):
            seen["h"], seen["kwargs"] = (args[0] if args else kwargs["hidden_states"]), dict(kwargs)

        with torch.no_grad(), tp.apply(vlm.model, LayerSkip.from_policy(parent)):
            handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                vlm.model(**inputs)
            finally:
                handle.remove()
            h, kwargs = seen["h"], seen["kwargs"]
            attention = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=kwargs["attention_mask"],
                                        position_embeddings=kwargs["position_embeddings"])[0]
            if index in parent.attn:  # the parent already skips this attention for visual rows
                visual = inputs.layout.visual_rows()
                attention[:, visual] = (parent.attn_scalars.get(index, 1.0) - 1.0) * h[:, visual]
            u = h + attention
            x, y = (h, u) if op == "attn" else (u, u + layer.mlp(layer.post_attention_layernorm(u)))
        visual = inputs.layout.visual_rows()
        xs.append(x[0, visual].reshape(-1).double())
        ys.append(y[0, visual].reshape(-1).double())
    x, y = torch.cat(xs)[:, None], torch.cat(ys)[:, None]
    return float(torch.linalg.lstsq(x, y).solution)


# ---------------------------------------------------------------------------------------------------------
# Done-when 3: the closed-form scalar
# ---------------------------------------------------------------------------------------------------------
def test_scalar_fit_equals_least_squares_on_a_toy_layer():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 8, generator=generator, dtype=torch.float64) * 0.3
    mlp = lambda u: torch.tanh(u @ weight)  # noqa: E731  a toy sublayer
    chunks = [torch.randn(n, 8, generator=generator, dtype=torch.float64) for n in (5, 17, 3)]
    fit = ScalarFit()
    for u in chunks:
        fit.add(u, mlp(u))
    u = torch.cat(chunks)
    y = u + mlp(u)
    expected = float(torch.linalg.lstsq(u.reshape(-1, 1), y.reshape(-1, 1)).solution)
    assert fit.value == pytest.approx(expected, rel=1e-12)
    assert fit.value == pytest.approx(float((y * u).sum() / (u * u).sum()), rel=1e-12)  # card §2.2 item 4
    assert fit.rows == 25
    zero = ScalarFit()
    zero.add(u, torch.zeros_like(u))
    assert zero.value == 1.0  # MLP ≡ 0: s = 1 exactly
    empty = ScalarFit()
    assert empty.value == 1.0
    empty.add(torch.zeros(3, 8), torch.ones(3, 8))
    assert empty.value == 1.0  # zero denominator


@pytest.mark.parametrize("parent", [SkipPolicy(), SkipPolicy(mlp=(1,), attn=(2,), mlp_scalars={1: 0.9},
                                                             attn_scalars={2: 1.2})], ids=["empty", "parent"])
def test_fitted_scalars_equal_least_squares_under_the_parent_policy(family, parent):
    cal = calibration(family)
    vlm = cal.vlm
    mlp_layers = [layer for layer in (1, 2, 3) if layer not in parent.mlp]
    attn_layers = [layer for layer in (1, 3) if layer not in parent.attn]
    mlp, attn = cal.fit(parent, mlp_layers, attn_layers)
    for index in mlp_layers:
        assert mlp[index] == pytest.approx(lstsq_scalar(vlm, samples(), "mlp", index, parent), rel=1e-9, abs=1e-12)
    for index in attn_layers:
        assert attn[index] == pytest.approx(lstsq_scalar(vlm, samples(), "attn", index, parent), rel=1e-9, abs=1e-12)
    assert len({round(v, 12) for v in list(mlp.values()) + list(attn.values())}) > 1  # not all 1.0


# ---------------------------------------------------------------------------------------------------------
# Scores (card §8 test 9) and the teacher-forced reference
# ---------------------------------------------------------------------------------------------------------
def test_calibration_answers_and_reference_are_the_original_models(family):
    cal = calibration(family)
    for item, (inputs, answer) in zip(cal.items, reference_data(cal.vlm, samples())):
        assert item.answer.tolist() == answer  # greedy answer of the original model (EOS included)
        assert item.reference.dtype == torch.float64
        torch.testing.assert_close(item.reference, forced_log_probs(cal.vlm, inputs, answer), rtol=1e-10, atol=1e-10)


def test_scores_equal_an_independent_kl_and_the_empty_policy_scores_zero(family):
    cal = calibration(family)
    forwards = cal.forwards
    assert cal.score(SkipPolicy()) == 0.0 and cal.forwards == forwards  # no forward needed
    data = reference_data(cal.vlm, samples())
    for policy in (SkipPolicy(mlp=(2,), mlp_scalars={2: 1.1}), SkipPolicy(mlp=(1, 3), attn=(2,)),
                   SkipPolicy(attn=(0, 1), attn_scalars={0: 0.8})):
        score = cal.score(policy)
        assert score > 0
        assert score == pytest.approx(independent_score(cal.vlm, data, policy), rel=1e-7, abs=1e-14)


# ---------------------------------------------------------------------------------------------------------
# The search (card §8 tests 4-6)
# ---------------------------------------------------------------------------------------------------------
def test_budget_zero_returns_the_empty_policy_without_evaluating_anything():
    cal = calibration("tiny_llava")
    calls = []
    handle = cal.vlm.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        result = search(cal, budget=0)
    finally:
        handle.remove()
    assert calls == [] and result.rounds == []
    assert result.policy == SkipPolicy() and result.score == 0.0 and result.cost == 0.0


def test_first_greedy_pick_has_the_lowest_single_skip_kl(family):
    """Tiny 4-layer random model, min_layer 0, budget 1: the pick is the argmin of independently computed
    single-skip scores (scalars from lstsq, KL from plain forwards)."""
    cal = calibration(family)
    vlm = cal.vlm
    result = search(cal, budget=1, beam_width=1, min_layer=0)
    first = result.rounds[0]
    assert {(c.op, c.layer) for c in first} == {(op, layer) for op in ("mlp", "attn") for layer in range(4)}
    data = reference_data(vlm, samples())
    independent = {}
    for candidate in first:
        scalar = lstsq_scalar(vlm, samples(), candidate.op, candidate.layer)
        assert candidate.scalar == pytest.approx(scalar, rel=1e-9)
        independent[(candidate.op, candidate.layer)] = independent_score(vlm, data,
                                                                         SkipPolicy().plus(candidate.op, candidate.layer, scalar))
        assert candidate.score == pytest.approx(independent[(candidate.op, candidate.layer)], rel=1e-7, abs=1e-14)
    pick = first[0]
    assert independent[(pick.op, pick.layer)] <= min(independent.values()) + 1e-14
    assert [c.score for c in first] == sorted(c.score for c in first)
    # the search goes on until the budget: an attention pick (0.5) needs a second round
    assert result.cost >= 1.0 and (result.policy.mlp or len(result.policy.attn) == 2 or result.cost == 1.5)


def test_a_free_mlp_is_found():
    """Layer 1's MLP zeroed: skipping it changes nothing; the pick scores <= 1e-6 (layer 1, or the last layer,
    which is free for visual rows since no later layer reads them), with s = 1 exactly for layer 1."""
    cal0 = calibration("tiny_llava")
    vlm = copy.copy(cal0.vlm)
    vlm.model = copy.deepcopy(cal0.vlm.model)
    with torch.no_grad():
        vlm.adapter.text_model(vlm.model).layers[1].mlp.down_proj.weight.zero_()
    cal = Calibration(vlm, samples(), answer_tokens=ANSWER_TOKENS)
    result = search(cal, budget=1, min_layer=0, ops=["mlp"])
    assert result.policy.mlp in ((1,), (3,)) and result.score <= 1e-6
    layer_one = next(c for c in result.rounds[0] if c.layer == 1)
    assert layer_one.scalar == 1.0 and layer_one.score <= 1e-6
    assert min(c.score for c in result.rounds[0] if c.layer in (0, 2)) > 1e-6  # the others do cost something


def test_half_cost_attention_skips_stop_at_exactly_the_budget():
    cal = calibration("tiny_qwen25vl")
    result = search(cal, budget=1.0, cost_attn=0.5, ops=["attn"], min_layer=1)
    assert result.cost == 1.0 and len(result.policy.attn) == 2 and len(result.rounds) == 2
    mixed = search(cal, budget=1.0, cost_attn=0.5, min_layer=1)
    assert mixed.cost in (1.0, 1.5) and mixed.policy.cost(1.0, 0.5) == mixed.cost


def test_beam_search_deduplicates_and_keeps_the_best_done_policy():
    cal = calibration("tiny_llava")
    result = search(cal, budget=2, beam_width=3, min_layer=0, ops=["mlp"])
    assert len(result.rounds[0]) == 4
    second = result.rounds[1]
    keys = [c.policy.key for c in second]
    assert len(keys) == len(set(keys))
    parents = {c.policy.key[0] for c in result.rounds[0][:3]}
    expected = {frozenset(p | {layer}) for p in parents for layer in range(4) if layer not in p}
    assert {k[0] for k in keys} == expected  # every pair reachable from the 3 beams, once
    assert result.score == min(c.score for c in second) and result.cost == 2.0


def test_no_candidates_left_warns_and_returns_the_best():
    cal = calibration("tiny_llava")
    with pytest.warns(UserWarning, match="no candidate sublayer left"):
        result = search(cal, budget=5, min_layer=2, ops=["mlp"])
    assert sorted(result.policy.mlp) == [2, 3] and result.cost == 2.0


def test_flops_cost_mode_uses_the_attention_to_mlp_flops_ratio():
    """Card §2.2 item 6: cost_attn = (2d + 2T)/(3 d_ff), T the mean number of keys per visual query (q width = d)."""
    cal = calibration("tiny_qwen25vl")
    config = cal.vlm.adapter.text_config(cal.vlm.model)
    d, d_ff = config.hidden_size, config.intermediate_size
    keys = torch.cat([item.layout.visual_rows() + 1 for item in cal.items]).double()
    assert cal.flops_costs() == (1.0, pytest.approx((2 * d + 2 * float(keys.mean())) / (3 * d_ff), rel=1e-12))
    result = search(cal, budget=1, cost="flops", min_layer=2)
    assert result.calibration["cost_attn"] == cal.flops_costs()[1] and result.calibration["cost"] == "flops"


@pytest.mark.parametrize("fields,pattern", [
    (dict(budget=-1), "budget must be a finite number >= 0"),
    (dict(budget=1, beam_width=0), "beam_width must be an integer >= 1"),
    (dict(budget=1, cost="time"), r"cost must be one of \['fixed', 'flops'\]"),
    (dict(budget=1, cost_attn=0), "cost_attn must be a finite number > 0"),
    (dict(budget=1, ops=["ffn"]), r"ops must be a non-empty subset of \['mlp', 'attn'\]"),
    (dict(budget=1, min_layer=4), "min_layer=4 is out of range: the model has 4 decoder layers"),
])
def test_bad_search_settings_are_refused(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        search(calibration("tiny_llava"), **fields)


# ---------------------------------------------------------------------------------------------------------
# Done-when 4: the searched policy beats random policies of equal cost
# ---------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def trained_tiny(name: str):
    """The packaged trained checkpoint (the comparison means little on random weights)."""
    assert packaged_checkpoint(name), f"{name}: trained checkpoint not packaged"
    return tp.load_model(name, weights="pretrained", device="cpu")


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen25vl"])
def test_searched_policy_has_lower_calibration_kl_than_ten_random_policies_of_equal_cost(name):
    vlm = trained_tiny(name)
    cal = Calibration(vlm, samples(5), answer_tokens=4)
    result = search(cal, budget=3, min_layer=0, ops=["mlp"])
    assert result.cost == 3.0
    randoms = random_policies(cal, result.policy, count=10, min_layer=0, seed=0)
    assert len({p.key for p in randoms} | {result.policy.key}) == 11
    assert all(p.cost(1.0, 0.5) == result.cost for p in randoms)
    scores = [cal.score(p) for p in randoms]
    assert result.score < min(scores), (result.policy, result.score, sorted(scores))


def test_random_policies_fit_each_scalar_under_the_policy_so_far():
    cal = calibration("tiny_llava")
    policy = fit_policy(cal, [("mlp", 2), ("attn", 1), ("mlp", 3)])
    mlp, _ = cal.fit(SkipPolicy(mlp=(2,), attn=(1,), mlp_scalars={2: policy.mlp_scalars[2]},
                                attn_scalars={1: policy.attn_scalars[1]}), [3])
    assert policy.mlp == (2, 3) and policy.attn == (1,) and policy.mlp_scalars[3] == mlp[3]
    with pytest.raises(ValueError, match="only 3 other policies"):
        random_policies(cal, SkipPolicy(mlp=(0,)), count=4, min_layer=0)


# ---------------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------------
def test_cli_prints_the_policy_and_writes_a_loadable_file(tmp_path, capsys):
    output = tmp_path / "policy.json"
    code = main(["layerskip", "model=tiny_qwen25vl", "model.weights=random", "model.device=cpu",
                 "dataset=synthetic_image", "n_samples=2", "answer_tokens=3", "budget=1.5", "min_layer=4",
                 f"output={output}", "progress=false"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Skipped MLPs: [" in printed and "Skipped Attns: [" in printed and "Final Score" in printed
    data = json.loads(output.read_text())
    assert set(data) == {"skip_layer_mlp", "skip_layer_attn", "mlp_scalars", "attn_scalars", "semantics", "score",
                         "cost", "calibration"}
    assert data["semantics"] == "visual" and data["calibration"]["objective"] == "reference"
    meta = data["calibration"]
    assert meta["split"] == "train" and all(i.startswith("train-") for i in meta["sample_ids"])  # disjoint from test
    assert meta["n_samples"] == 2 and meta["answer_tokens"] == 3 and meta["budget"] == 1.5 and meta["beam_width"] == 1
    assert meta["cost_mlp"] == 1.0 and meta["cost_attn"] == 0.5 and meta["min_layer"] == 4 and meta["seed"] == 0
    assert meta["dtype"] == "float32" and meta["version"] == tp.__version__ and meta["model"]["name"] == "tiny_qwen25vl"
    assert data["cost"] >= 1.5
    method = LayerSkip(policy=str(output))
    assert sorted(method.skip_policy.mlp + method.skip_policy.attn) and method.describe()["resolved_policy"] == {
        key: data[key] for key in ("skip_layer_mlp", "skip_layer_attn", "mlp_scalars", "attn_scalars")}


@pytest.mark.parametrize("argv,pattern", [
    (["layerskip"], "budget is required"),
    (["layerskip", "budget=1", "beam_width=0", "model.weights=random"], "beam_width must be an integer >= 1"),
    (["layerskip", "budget=1", "n_samples=0"], "n_samples must be an integer >= 1"),
    (["layerskip", "budget=1", "model=nope"], "Could not find 'model/nope'"),
    (["kvpress"], "unknown search 'kvpress'; available: layerskip"),
])
def test_cli_errors_are_one_clear_message(argv, pattern, capsys):
    assert main(argv) == 2
    assert pattern in capsys.readouterr().err
