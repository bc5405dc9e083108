"""The seed's layer-skip search (``objective=seed``, issue 15 item 4, done-when 4): its KL and scalar, its loop on a
hand-traced toy problem, a whole search against an independent re-implementation on the tiny Qwen2.5-VL, the CLI
and the seed config.json export.

The independent search below is written from the method card (§2.1 "Search") on the hand-written seed decoder of
``tests/seed_reference.py``; it shares no code with ``tokenprune.calibrate``. It runs on a float64 copy of a 4-layer
tiny Qwen2.5-VL, so that the candidates' KLs (~1e-3 to 1e-6) are ranked the same by both computations.
"""

import copy
import json
import math
from functools import lru_cache

import pytest
import torch

import tokenprune as tp
from conftest import tiny_vlm
from seed_reference import SeedDecoder
from tokenprune.calibrate.__main__ import main
from tokenprune.calibrate.layerskip_seed import SeedCalibration, SeedRun, seed_kl, seed_scalar, seed_search
from tokenprune.data import create_dataset
from tokenprune.methods.layerskip import LayerSkip, SkipPolicy

QWEN = "tiny_qwen25vl"
ROWS, LAYERS, MIN_LAYER = 3, 4, 1

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def samples(n=2):
    dataset = create_dataset("synthetic_image", split="train", n_samples=n)
    return [dataset[i] for i in range(n)]


@lru_cache(maxsize=None)
def float64_qwen():
    vlm = copy.copy(tiny_vlm(QWEN, layers=LAYERS))
    vlm.model = copy.deepcopy(vlm.model).double()
    return vlm


# ---------------------------------------------------------------------------------------------------------
# The two formulas, by hand
# ---------------------------------------------------------------------------------------------------------
def test_kl_is_the_row_mean_of_kl_parent_to_candidate():
    parent = torch.tensor([[0.0, 0.0], [1.0, 2.0]])  # row 0: (1/2, 1/2)
    candidate = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]])  # row 0: (1/4, 3/4); row 1 = the parent's
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2  # = ln(4/3) / 4
    assert seed_kl(parent, candidate) == pytest.approx(expected, rel=1e-6)
    assert seed_kl(candidate, parent) != pytest.approx(expected, rel=1e-3)  # the direction matters


def test_scalar_is_the_least_squares_fit_of_the_parent_on_the_candidate():
    parent = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    candidate = torch.ones(2, 2)
    assert seed_scalar(parent, candidate) == 2.5  # (1 + 2 + 3 + 4) / 4
    third = seed_scalar(torch.ones(3), torch.full((3,), 3.0))
    assert third == float(torch.tensor(1 / 3, dtype=torch.float32))  # rounded to float32, as the seed's .float()
    assert seed_scalar(parent, torch.zeros(2, 2)) == 1.0  # zero denominator


# ---------------------------------------------------------------------------------------------------------
# The loop on a toy problem traced by hand: every candidate scores 0, so the stable order decides
# ---------------------------------------------------------------------------------------------------------
class FlatCalibration:
    """Every policy gives the same logits and hidden states: every score is 0, every scalar 1."""

    num_layers, forwards = 4, 0

    def run(self, policy, hidden_layers=()):
        return SeedRun(torch.zeros(2, 5), {layer: torch.ones(3, 2) for layer in hidden_layers})

    def describe(self):
        return {}


def picks(round_):
    return [(candidate.op, candidate.layer) for candidate in round_]


def test_the_loop_pools_beams_sorts_stably_and_stops_at_the_budget():
    result = seed_search(FlatCalibration(), budget=1.5, beam_width=3, min_layer=1)
    # round 1, one beam (empty): MLP candidates by layer, then attention candidates; ties keep that order
    assert picks(result.rounds[0]) == [("mlp", 1), ("mlp", 2), ("mlp", 3), ("attn", 1), ("attn", 2), ("attn", 3)]
    # round 2: beams {mlp 1}, {mlp 2}, {mlp 3} (cost 1) pooled in that order, no de-duplication
    assert [(c.policy.mlp, c.policy.attn) for c in result.rounds[1][:6]] == [
        ((1, 2), ()), ((1, 3), ()), ((1,), (1,)), ((1,), (2,)), ((1,), (3,)), ((2, 1), ())]
    assert len(result.rounds[1]) == 3 * 5 and len(result.rounds) == 2  # the best 3 all reach cost >= 1.5
    assert (result.policy.mlp, result.policy.attn, result.cost, result.score) == ((1, 2), (), 2.0, 0.0)
    assert result.semantics == "seed" and result.to_dict()["semantics"] == "seed"


def test_budget_zero_still_runs_one_round_as_the_seed_does():
    result = seed_search(FlatCalibration(), budget=0, min_layer=3)
    assert picks(result.rounds[0]) == [("mlp", 3), ("attn", 3)] and result.policy.mlp == (3,)


def test_running_out_of_candidates_warns_and_returns_the_active_beams():
    with pytest.warns(UserWarning, match="no candidate sublayer left"):
        result = seed_search(FlatCalibration(), budget=9, min_layer=3, ops=["mlp"])
    assert result.policy.mlp == (3,) and result.cost == 1.0


# ---------------------------------------------------------------------------------------------------------
# A whole search against an independent re-implementation (the seed's decoder by hand, the loop from the card)
# ---------------------------------------------------------------------------------------------------------
def reference_runs(vlm, prompts, mlp, attn, scalars):
    """Per sample: the prefill's last logits row and ROWS - 1 greedy cached steps; and the image rows of every
    hidden_states[l + 1], concatenated over samples."""
    logits, hidden = [], {}
    for inputs in prompts:
        decoder = SeedDecoder(vlm, mlp=mlp, attn=attn, scalars=scalars)
        rows = [decoder.prefill(vlm, inputs)[-1]]
        for _ in range(ROWS - 1):
            rows.append(decoder.step(int(rows[-1].argmax())))
        logits += rows
        image = inputs["input_ids"][0] == vlm.model.config.image_token_id
        for layer in range(LAYERS):
            hidden.setdefault(layer, []).append(decoder.hidden_states[layer + 1][0, image])
    return torch.stack(logits), {layer: torch.cat(rows) for layer, rows in hidden.items()}


def reference_search(vlm, prompts, budget, beam_width):
    """The card's §2.1 loop, written out: returns every round's pooled (op, layer, score, scalar), sorted."""
    rounds, done = [], []
    active = [dict(mlp=[], attn=[], scalars={}, cost=0.0, score=0.0)]
    while active:
        pool = []
        for beam in active:
            gold_logits, gold_hidden = reference_runs(vlm, prompts, beam["mlp"], beam["attn"], beam["scalars"])
            p = torch.log_softmax(gold_logits.double(), -1)
            for op in ("mlp", "attn"):
                for layer in range(MIN_LAYER, LAYERS):
                    if layer in beam[op]:
                        continue
                    child = dict(beam, **{op: beam[op] + [layer]})
                    logits, hidden = reference_runs(vlm, prompts, child["mlp"], child["attn"], beam["scalars"])
                    q = torch.log_softmax(logits.double(), -1)
                    score = float((p.exp() * (p - q)).sum(-1).mean())
                    scalar = 1.0
                    if op == "mlp":
                        h_ref, h_cand = gold_hidden[layer].double(), hidden[layer].double()
                        scalar = float((h_ref * h_cand).sum() / (h_cand * h_cand).sum())
                        child["scalars"] = {**beam["scalars"], layer: scalar}
                    child.update(cost=beam["cost"] + (1.0 if op == "mlp" else 0.5), score=score)
                    pool.append((op, layer, score, scalar, child))
        pool.sort(key=lambda entry: entry[2])
        rounds.append(pool)
        best = [entry[4] for entry in pool[:beam_width]]
        done += [beam for beam in best if beam["cost"] >= budget]
        active = [beam for beam in best if beam["cost"] < budget]
    return rounds, min(done, key=lambda beam: beam["score"])


def test_seed_search_equals_an_independent_search_on_the_tiny_qwen25vl():
    vlm = float64_qwen()
    sample_list = samples()
    calibration = SeedCalibration(vlm, sample_list, rows=ROWS)
    result = seed_search(calibration, budget=1.5, beam_width=2, min_layer=MIN_LAYER)
    rounds, best = reference_search(vlm, [vlm.prepare(sample) for sample in sample_list], 1.5, 2)
    assert len(result.rounds) == len(rounds) >= 2
    for got, expected in zip(result.rounds, rounds):
        assert picks(got) == [(op, layer) for op, layer, *_ in expected]  # the same candidates, in the same order
        for candidate, (_, _, score, scalar, _) in zip(got, expected):
            assert candidate.score == pytest.approx(score, rel=1e-6, abs=1e-12)
            assert candidate.scalar == pytest.approx(scalar, rel=1e-6)  # float32-rounded vs float64
    assert (list(result.policy.mlp), list(result.policy.attn)) == (best["mlp"], best["attn"])
    assert result.score == pytest.approx(best["score"], rel=1e-6) and result.cost == best["cost"]
    assert len({round(c.score, 12) for c in result.rounds[0]}) == len(result.rounds[0])  # no ties decided it
    assert any(abs(c.scalar - 1.0) > 1e-3 for c in result.rounds[0] if c.op == "mlp")  # scalars really fitted


def test_seed_objective_is_refused_outside_qwen25vl():
    with pytest.raises(ValueError, match=r"objective=seed runs the seed's modified Qwen2.5-VL decoder .* got 'llava'"):
        SeedCalibration(tiny_vlm("tiny_llava"), samples(1), rows=2)


# ---------------------------------------------------------------------------------------------------------
# The CLI: objective=seed, the policy file, --export-seed-config
# ---------------------------------------------------------------------------------------------------------
def test_cli_seed_objective_writes_a_seed_policy_and_config(tmp_path, capsys):
    output, config = tmp_path / "policy.json", tmp_path / "ckpt" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"model_type": "qwen2_5_vl", "hidden_size": 64}))
    code = main(["layerskip", "model=tiny_qwen25vl", "model.weights=random", "model.device=cpu", "objective=seed",
                 "n_samples=1", "answer_tokens=2", "budget=1", "min_layer=4", "beam_width=1", f"output={output}",
                 "progress=false", "--export-seed-config", str(config)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Final Score: " in printed and "Skipped MLPs: [" in printed and "semantics: seed" in printed
    data = json.loads(output.read_text())
    assert data["semantics"] == "seed" and data["calibration"]["objective"] == "seed" and data["cost"] >= 1
    written = json.loads(config.read_text())
    assert written["model_type"] == "qwen2_5_vl" and written["hidden_size"] == 64  # the checkpoint config's keys kept
    policy = LayerSkip(policy=str(output))
    assert policy.resolved_semantics == "seed"
    assert {key: written[key] for key in ("skip_layer_mlp", "skip_layer_attn", "mlp_scalars")} == \
        policy.skip_policy.to_seed_config()
    assert LayerSkip(policy=str(config.parent)).skip_policy == SkipPolicy.from_mapping(data, "test")


def test_cli_converts_a_policy_file_to_the_seed_config(tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps({"skip_layer_mlp": [3], "mlp_scalars": {"3": 0.5}}))
    assert main(["layerskip", "--policy", str(tmp_path / "p.json"), f"--export-seed-config={tmp_path / 'c.json'}"]) == 0
    printed = capsys.readouterr().out
    assert "written to" in printed and "searched with semantics 'visual'" in printed  # the file had no semantics
    assert json.loads((tmp_path / "c.json").read_text()) == {"skip_layer_mlp": [3], "skip_layer_attn": [],
                                                             "mlp_scalars": {"3": 0.5}}


@pytest.mark.parametrize("argv,pattern", [
    (["layerskip", "budget=1", "objective=best"], "objective must be one of ['reference', 'seed']"),
    (["layerskip", "budget=1", "objective=seed", "cost=flops"], "objective=seed uses the seed's fixed costs"),
    (["layerskip", "--policy", "p.json"], "--policy FILE converts a policy file"),
    (["layerskip", "budget=1", "--export-seed-config"], "--export-seed-config needs a path"),
])
def test_cli_seed_errors_are_one_clear_message(argv, pattern, capsys):
    assert main(argv) == 2
    assert pattern in capsys.readouterr().err
