"""VisionZip's pure algorithm (issue 18, phase 1): the card's hand cases, a plain-Python reference, edge cases.

``reference_visionzip`` is written from the card's §2.2 pseudocode with Python lists and float64 arithmetic,
independent of the batched tensor code.
"""

import math

import pytest
import torch

from tokenprune.methods._budget import budget_count
from tokenprune.methods.visionzip import VisionZip, visionzip_merge, visionzip_plan, visionzip_weights


def reference_visionzip(scores, keys, values, dominant, contextual, merge="official"):
    """One group: (dominant indices, target indices, members per target, contextual rows) as Python lists."""
    n_tokens = len(scores)
    order = sorted(range(n_tokens), key=lambda i: (-scores[i], i))
    chosen = sorted(order[:min(dominant, n_tokens)])
    remaining = [i for i in range(n_tokens) if i not in chosen]
    c = min(contextual, len(remaining))
    if c == 0:
        return chosen, [], [], []
    step = max(1, len(remaining) // c)
    targets = remaining[::step][:c]

    def unit(row):
        norm = math.sqrt(sum(x * x for x in row))
        return [x / norm for x in row]

    members = [[] for _ in targets]
    for r in remaining:
        if r in targets:
            continue
        sims = [sum(a * b for a, b in zip(unit(keys[r]), unit(keys[t]))) for t in targets]
        members[sims.index(max(sims))].append(r)  # first target on ties
    merged = []
    for t, group in zip(targets, members):
        if merge == "official":
            mean = [sum(values[r][d] for r in group) / max(1, len(group)) for d in range(len(values[t]))]
            merged.append([values[t][d] + mean[d] for d in range(len(values[t]))])
        else:
            merged.append([(values[t][d] + sum(values[r][d] for r in group)) / (1 + len(group))
                           for d in range(len(values[t]))])
    return chosen, targets, members, merged


def members_of(plan, batch=0):
    if plan.num_contextual == 0:
        return []
    slots = plan.slot[batch].tolist()
    remaining = plan.remaining[batch].tolist()
    members = [[] for _ in range(plan.num_contextual)]
    for row, slot, target in zip(remaining, slots, plan.is_target[batch].tolist()):
        if not target:
            members[slot].append(row)
    return members


# ---------------------------------------------------------------------------------------------------------
# hand cases (card §8 test 2)
# ---------------------------------------------------------------------------------------------------------
SCORES = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.05, 0.4, 0.15]])  # top 2: tokens 1 and 3
VALUES = torch.tensor([[[float(r), 1.0] for r in range(8)]])  # V_r = (r, 1)


def test_hand_case_two_targets_with_a_similarity_tie():
    # N = 8, D = 3 (CLS + 2 patches), C = 2: R = [0, 2, 4, 5, 6, 7], n = 6, step = 3, targets R[0] = 0, R[3] = 5
    keys = torch.zeros(1, 8, 2)
    keys[0, 0] = torch.tensor([1.0, 0.0])  # target 0
    keys[0, 5] = torch.tensor([0.0, 1.0])  # target 1
    keys[0, 2] = torch.tensor([2.0, 0.5])  # closer to target 0
    keys[0, 4] = torch.tensor([0.1, 3.0])  # closer to target 1
    keys[0, 6] = torch.tensor([1.0, 1.0])  # equally close: the first target
    keys[0, 7] = torch.tensor([-1.0, 5.0])  # target 1
    keys[0, 1] = keys[0, 3] = torch.tensor([1.0, 0.0])  # dominant: never assigned
    emit_cls, dominant, contextual = VisionZip(dominant=3, contextual=2).counts(8, has_cls=True)
    assert (emit_cls, dominant, contextual) == (True, 2, 2)
    plan = visionzip_plan(SCORES, keys, dominant, contextual)
    assert plan.dominant.tolist() == [[1, 3]]
    assert plan.remaining.tolist() == [[0, 2, 4, 5, 6, 7]]
    assert plan.targets.tolist() == [[0, 5]]
    assert members_of(plan) == [[2, 6], [4, 7]]
    merged = visionzip_merge(VALUES, plan)
    # ctx_0 = V0 + mean(V2, V6) = (0, 1) + (4, 1); ctx_1 = V5 + mean(V4, V7) = (5, 1) + (5.5, 1)
    assert merged.tolist() == [[[4.0, 2.0], [10.5, 2.0]]]
    # mean: (V0 + V2 + V6) / 3, (V5 + V4 + V7) / 3 (float32 division)
    torch.testing.assert_close(visionzip_merge(VALUES, plan, "mean"), torch.tensor([[[8.0, 3.0], [16.0, 3.0]]]) / 3,
                               rtol=0, atol=0)


def test_hand_case_three_targets_one_memberless():
    # C = 3: step = 6 // 3 = 2, targets R[0], R[2], R[4] = 0, 4, 6; member 7 ties between targets 4 and 6
    keys = torch.zeros(1, 8, 3)
    keys[0, 0], keys[0, 4], keys[0, 6] = torch.eye(3)
    keys[0, 2] = torch.tensor([3.0, 1.0, 0.0])  # target 0
    keys[0, 5] = torch.tensor([1.0, 0.0, 0.5])  # target 0 (0.894 vs 0.447)
    keys[0, 7] = torch.tensor([0.0, 1.0, 1.0])  # tie: target 4 (the first)
    plan = visionzip_plan(SCORES, keys, 2, 3)
    assert plan.targets.tolist() == [[0, 4, 6]]
    assert members_of(plan) == [[2, 5], [7], []]
    merged = visionzip_merge(VALUES, plan)
    assert merged.tolist() == [[[3.5, 2.0], [11.0, 2.0], [6.0, 1.0]]]  # the memberless target is V_6 itself
    torch.testing.assert_close(visionzip_merge(VALUES, plan, "mean"),
                               torch.tensor([[[7.0, 3.0], [11.0, 2.0], [6.0, 1.0]]])
                               / torch.tensor([[[3.0], [2.0], [1.0]]]),
                               rtol=0, atol=0)


def test_merge_weights_by_hand_and_as_a_matrix_product():
    keys = torch.zeros(1, 8, 3)
    keys[0, 0], keys[0, 4], keys[0, 6] = torch.eye(3)
    keys[0, 2], keys[0, 5], keys[0, 7] = torch.tensor([[3.0, 1.0, 0.0], [1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
    plan = visionzip_plan(SCORES, keys, 2, 3)  # the three-target hand case: members [[2, 5], [7], []]
    official = torch.zeros(3, 8)
    official[0, [0, 2, 5]] = torch.tensor([1.0, 0.5, 0.5])
    official[1, [4, 7]] = torch.tensor([1.0, 1.0])
    official[2, 6] = 1.0
    assert torch.equal(visionzip_weights(plan, 8)[0], official)
    mean = torch.zeros(3, 8)
    mean[0, [0, 2, 5]] = 1 / 3
    mean[1, [4, 7]] = 0.5
    mean[2, 6] = 1.0
    assert torch.equal(visionzip_weights(plan, 8, "mean")[0], mean)
    generator = torch.Generator().manual_seed(9)
    for merge in ("official", "mean"):
        scores, keys = torch.rand(4, 30, generator=generator), torch.randn(4, 30, 5, generator=generator)
        values = torch.randn(4, 30, 6, generator=generator, dtype=torch.float64)
        plan = visionzip_plan(scores, keys, 9, 5)
        # float32 weights (1/3 is rounded) against the float64 merge
        torch.testing.assert_close(visionzip_weights(plan, 30, merge).double() @ values,
                                   visionzip_merge(values, plan, merge), rtol=1e-7, atol=1e-7)
    assert visionzip_weights(visionzip_plan(SCORES, keys[:1, :8], 8, 2), 8).shape == (1, 0, 8)


def test_members_identical_to_their_target():
    # card §8 test 8: official -> 2 V_target, mean -> V_target
    keys = torch.ones(1, 8, 4)
    values = torch.tensor([[3.0, -7.0, 0.5, 12.0, 1.25]]).expand(1, 8, 5).contiguous()  # sums and /6 are exact
    plan = visionzip_plan(SCORES, keys, 2, 1)
    assert members_of(plan) == [[2, 4, 5, 6, 7]]
    assert torch.equal(visionzip_merge(values, plan), 2 * values[:, :1])
    assert torch.equal(visionzip_merge(values, plan, "mean"), values[:, :1])


# ---------------------------------------------------------------------------------------------------------
# plain reference, batches, edge cases
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens,dominant,contextual", [(16, 5, 3), (30, 7, 4), (12, 0, 5), (9, 3, 9), (20, 2, 1),
                                                           (25, 10, 0), (8, 8, 2), (8, 20, 2)])
@pytest.mark.parametrize("merge", ["official", "mean"])
def test_equals_the_plain_reference(n_tokens, dominant, contextual, merge):
    generator = torch.Generator().manual_seed(n_tokens * 31 + dominant)
    batch = 3
    scores = torch.randint(0, 6, (batch, n_tokens), generator=generator).float()  # many score ties
    keys = torch.randint(-2, 3, (batch, n_tokens, 3), generator=generator).float()  # duplicate keys: similarity ties
    keys[keys.norm(dim=-1) == 0] = 1.0
    values = torch.randn(batch, n_tokens, 4, generator=generator, dtype=torch.float64)
    plan = visionzip_plan(scores, keys, dominant, contextual)
    merged = visionzip_merge(values, plan, merge)
    for b in range(batch):
        chosen, targets, members, reference = reference_visionzip(scores[b].tolist(), keys[b].tolist(),
                                                                  values[b].tolist(), dominant, contextual, merge)
        assert plan.dominant[b].tolist() == chosen
        assert plan.targets[b].tolist() == targets
        assert members_of(plan, b) == members
        torch.testing.assert_close(merged[b], torch.tensor(reference, dtype=torch.float64).view(-1, 4), rtol=1e-12,
                                   atol=1e-12)
        assert len(chosen) + len(targets) == min(n_tokens, dominant) + min(contextual, n_tokens - len(chosen))


def test_contextual_beyond_the_remaining_tokens_makes_every_remaining_token_a_target():
    # official n < C crashes; tokenprune uses C_eff = min(C, n): each remaining token is its own contextual token
    values = torch.randn(1, 8, 3)
    plan = visionzip_plan(SCORES, torch.randn(1, 8, 2), 6, 5)
    assert plan.remaining.tolist() == plan.targets.tolist() == [[0, 5]]
    assert torch.equal(visionzip_merge(values, plan), values[:, [0, 5]])


def test_a_single_token_and_keeping_everything():
    plan = visionzip_plan(torch.tensor([[3.0]]), torch.ones(1, 1, 2), 1, 4)
    assert plan.dominant.tolist() == [[0]] and plan.num_contextual == 0
    plan = visionzip_plan(SCORES, torch.ones(1, 8, 2), 8, 10)
    assert plan.dominant.tolist() == [list(range(8))] and plan.remaining.shape == (1, 0)
    assert visionzip_merge(VALUES, plan).shape == (1, 0, 2)


def test_float16_values_merge_in_float32():
    values = torch.full((1, 8, 2), 60000.0, dtype=torch.float16)  # the sum of members overflows float16
    plan = visionzip_plan(SCORES, torch.ones(1, 8, 2), 2, 1)
    merged = visionzip_merge(values, plan, "mean")
    assert merged.dtype == torch.float16 and torch.equal(merged, values[:, :1])


# ---------------------------------------------------------------------------------------------------------
# counts and validation
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,expected", [(64, (True, 53, 10)), (128, (True, 107, 20)), (192, (True, 161, 30)),
                                             (1, (True, 0, 0)), (4, (True, 2, 1)), (576, (False, 576, 0)),
                                             (1000, (False, 576, 0)), (1.0, (False, 576, 0))])
def test_budget_counts_on_llava(budget, expected):
    """One image: the group's share is the sample's count."""
    assert VisionZip(budget=budget).counts(576, has_cls=True, share=budget_count(576, budget)) == expected


def test_official_counts():
    assert VisionZip().counts(576, has_cls=True) == (True, 53, 10)  # "54 + 10": CLS + 53 patches + 10
    assert VisionZip(dominant=108, contextual=20).counts(576, True) == (True, 107, 20)
    assert VisionZip(include_cls=False).counts(576, True) == (False, 54, 10)
    qwen = VisionZip(dominant_ratio=0.65, contextual_ratio=0.05)  # the official Qwen2.5-VL port
    assert qwen.counts(1296, has_cls=False) == (False, 842, 64)  # int(842.4), int(64.8)
    assert VisionZip().counts(1296, has_cls=False) == (False, 842, 64)  # the default without a CLS token
    assert qwen.counts(10, has_cls=False) == (False, 6, 1)  # C = max(int(0.5), 1)
    assert VisionZip(include_cls=False, dominant=576, contextual=10).counts(576, True) == (False, 576, 0)  # identity
    assert VisionZip(dominant=577, contextual=10).counts(576, True) == (False, 576, 0)  # no CLS beyond all tokens
    assert VisionZip().counts(36, True) == (False, 36, 0)  # 54 + 10 keep every token of a 36-token image
    assert VisionZip(dominant_ratio=1.0, contextual_ratio=0.05).counts(36, False) == (False, 36, 0)
    assert VisionZip(dominant=0, contextual=4).counts(576, True) == (False, 0, 4)
    with pytest.raises(ValueError, match="needs the group's share"):
        VisionZip(budget=64).counts(576, True)


@pytest.mark.parametrize("budget", [1, 2, 3, 7, 64, 100, 575, 0.05, 0.3, 0.999])
@pytest.mark.parametrize("has_cls", [True, False])
def test_a_budget_is_the_number_of_tokens_the_decoder_sees(budget, has_cls):
    share = budget_count(576, budget)
    emit_cls, dominant, contextual = VisionZip(budget=budget).counts(576, has_cls, share)
    assert int(emit_cls) + dominant + contextual == share


@pytest.mark.parametrize("fields,message", [
    ({"dominant": -1, "contextual": 10}, "visionzip.dominant must be an integer >= 0 or null, got -1"),
    ({"dominant": 54, "contextual": 2.5}, "visionzip.contextual must be an integer >= 0 or null, got 2.5"),
    ({"dominant": 54}, "set dominant and contextual together"),
    ({"dominant_ratio": 0.65}, "set dominant_ratio and contextual_ratio together"),
    ({"dominant_ratio": 1.5, "contextual_ratio": 0.05}, r"visionzip.dominant_ratio must be a number in \(0, 1\]"),
    ({"dominant_ratio": 0.6, "contextual_ratio": 0.05, "budget": 64},
     "give one of budget, dominant/contextual or dominant_ratio/contextual_ratio"),
    ({"dominant": 54, "contextual": 10, "budget": 64}, r"\(got budget=64, dominant=54\)"),
    ({"budget": 0.0}, r"visionzip.budget must be an integer >= 1 \(tokens\), a float in \(0, 1\]"),
    ({"budget": 0}, r"visionzip.budget must be an integer >= 1 \(tokens\), a float in \(0, 1\]"),
    ({"include_cls": 1}, "visionzip.include_cls must be true or false"),
    ({"merge": "sum"}, r"visionzip.merge must be one of \['official', 'mean'\], got 'sum'"),
    ({"positions": "repack"}, r"visionzip.positions must be one of \['auto', 'keep', 'reindex'\]"),
])
def test_validation_names_the_field_and_the_allowed_values(fields, message):
    with pytest.raises(ValueError, match=message):
        VisionZip(**fields)
