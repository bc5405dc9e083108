"""VisPruner's pure algorithm (issue 18, phase 1): the card's hand cases, a plain-Python list reference, a port
of the official tensor code where that code runs, counts, edge cases, validation.

``reference_vispruner`` follows the card's §2.2 pseudocode with Python lists and float64 dot products;
``official_port`` is written here from the official loop's tensor semantics (widths ``R // 2 - k``) and
reports the cases where the official code raises or mis-indexes.
"""

import math

import pytest
import torch

from tokenprune.methods.vispruner import VisPruner, vispruner_counts, vispruner_select


def reference_vispruner(importance, features, keep, ratio, step=8):
    n = len(importance)
    keep = min(keep, n)
    important_count = int(keep * ratio)
    diverse = keep - important_count
    order = sorted(range(n), key=lambda i: (-importance[i], i))
    important, residual = order[:important_count], order[important_count:]

    def unit(row):
        norm = math.sqrt(sum(x * x for x in row))
        return [x / norm for x in row]

    rows = [unit(row) for row in features]
    while diverse > 0 and len(residual) > diverse:
        k = min(step, len(residual) - diverse)
        side_a, side_b = residual[0::2], residual[1::2]
        sigma = {a: max(sum(x * y for x, y in zip(rows[a], rows[b])) for b in side_b) for a in side_a}
        ranked = sorted(range(len(side_a)), key=lambda i: (-sigma[side_a[i]], i))
        side_a = [side_a[i] for i in ranked][k:]
        residual = side_a + side_b
    return sorted(important + (residual if diverse > 0 else []))


class OfficialCrash(Exception):
    pass


def official_port(importance, features, keep, ratio):
    """The official loop's semantics for one group; raises OfficialCrash where the official code fails."""
    important_count = int(keep * ratio)
    diverse = keep - important_count
    order = torch.argsort(importance, descending=True, stable=True)
    important, residual = order[:important_count], order[important_count:]
    unit = features / features.norm(dim=-1, keepdim=True)
    while diverse > 0:
        width = residual.shape[0]
        k = min(8, width - diverse)
        if k <= 0:
            break
        tokens = unit[residual]
        sigma = (tokens[::2] @ tokens[1::2].T).max(dim=-1).values  # [ceil(R / 2)]
        survivors = sigma.argsort(descending=True)[k:]  # official width: ceil(R/2) - k
        if width % 2 or width // 2 - k < 0:  # the official expand(-1, R // 2 - k) fails or mis-indexes
            raise OfficialCrash
        residual = torch.cat([residual[::2][survivors], residual[1::2]])
    kept = torch.cat([important, residual]) if diverse > 0 else important
    return sorted(kept.tolist())


# ---------------------------------------------------------------------------------------------------------
# hand cases (card §8 test 3)
# ---------------------------------------------------------------------------------------------------------
DESCENDING = torch.arange(12, 0, -1).float()[None]  # attention order = index order


def test_hand_case_two_removals_by_similarity():
    # N = 12, T = 10, r = 0.4: T_imp = 4 (I = 0..3), Q = 4..11, T_div = 6, R = 8, k = 2,
    # A = [4, 6, 8, 10], B = [5, 7, 9, 11]: sigma_4 = 1 (a copy of 5), sigma_8 = 0.9, sigma_6 = sigma_10 = 0
    features = torch.eye(12)
    features[4] = features[5]
    features[8] = 0.9 * features[9] + math.sqrt(0.19) * features[8]
    assert vispruner_counts(12, 10, 0.4) == (4, 6)
    kept = vispruner_select(DESCENDING, features[None], 10, 0.4)
    assert kept.tolist() == [[0, 1, 2, 3, 5, 6, 7, 9, 10, 11]]  # 4 and 8 removed


def test_hand_case_all_of_a_removed_whatever_the_features():
    # N = 12, T = 8, r = 0.5: T_imp = 4, R = 8, T_div = 4, k = 4 = |A|: Q = Q[1::2] = [5, 7, 9, 11]
    for seed in range(3):
        features = torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(seed))
        assert vispruner_select(DESCENDING, features, 8, 0.5).tolist() == [[0, 1, 2, 3, 5, 7, 9, 11]]


def test_duplicates_of_important_tokens_survive():
    # de-duplication runs only inside the residual: an exact copy of an important token is not removed for it
    # T = 4, r = 0.25: I = [0], Q = [1, 2, 3, 4, 5], T_div = 3, k = 2, A = [1, 3, 5], B = [2, 4]
    features = torch.eye(6)[None].clone()
    features[0, 3] = features[0, 0]  # token 3 duplicates important token 0: sigma_3 = 0
    features[0, 1], features[0, 5] = features[0, 2], features[0, 4]  # sigma_1 = sigma_5 = 1
    importance = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    assert vispruner_select(importance, features, 4, 0.25).tolist() == [[0, 2, 3, 4]]  # Q -> [3] + [2, 4]


# ---------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------
CASES = [(12, 10, 0.4), (12, 8, 0.5), (40, 16, 0.5), (40, 9, 0.3), (37, 12, 0.25), (30, 2, 0.0), (30, 3, 0.5),
         (50, 20, 0.75), (25, 24, 0.5), (16, 16, 0.5), (16, 30, 0.5), (20, 1, 0.5), (20, 0, 0.5), (20, 5, 1.0),
         (64, 17, 0.1), (33, 7, 0.0)]


@pytest.mark.parametrize("n_tokens,keep,ratio", CASES)
def test_equals_the_plain_list_reference(n_tokens, keep, ratio):
    generator = torch.Generator().manual_seed(n_tokens * 100 + keep)
    batch = 3
    importance = torch.randint(0, 5, (batch, n_tokens), generator=generator).float()  # attention ties
    features = torch.randn(batch, n_tokens, 5, generator=generator, dtype=torch.float64)
    features[:, 1::4] = features[:, 0:1]  # duplicate rows: similarity ties at exactly 1
    kept = vispruner_select(importance, features, keep, ratio)
    assert kept.shape == (batch, min(keep, n_tokens))
    for b in range(batch):
        assert kept[b].tolist() == reference_vispruner(importance[b].tolist(), features[b].tolist(), keep, ratio)


def test_equals_the_official_tensor_code_wherever_it_runs():
    generator = torch.Generator().manual_seed(0)
    ran = crashed = 0
    for n_tokens in (20, 31, 36, 64):
        for keep in (2, 5, 8, 13, 16):
            for ratio in (0.0, 0.3, 0.5, 0.75):
                importance = torch.rand(n_tokens, generator=generator)
                features = torch.randn(n_tokens, 8, generator=generator)
                try:
                    expected = official_port(importance, features, keep, ratio)
                except OfficialCrash:
                    crashed += 1
                    continue
                ran += 1
                assert vispruner_select(importance[None], features[None], keep, ratio)[0].tolist() == expected
    assert ran > 20 and crashed > 5  # both kinds of case were exercised


# ---------------------------------------------------------------------------------------------------------
# counts, edge cases, validation
# ---------------------------------------------------------------------------------------------------------
def test_counts_and_the_lightcompress_parity_option():
    assert vispruner_counts(576, 64, 0.5) == (32, 32)
    assert vispruner_counts(576, 64, 0.3) == (19, 45)  # N - T_imp = 557 is odd: the official code raises
    assert vispruner_counts(576, 64, 0.3, "lightcompress") == (20, 44)
    assert vispruner_counts(576, 64, 0.5, "lightcompress") == (32, 32)  # even residual: unchanged
    assert vispruner_counts(9, 4, 1.0, "lightcompress") == (4, 0)  # never more than keep
    assert vispruner_counts(10, 30, 0.5) == (5, 5)  # keep > N: all N


def test_keeping_everything_or_nothing():
    importance = torch.rand(2, 9, generator=torch.Generator().manual_seed(1))
    features = torch.randn(2, 9, 3)
    assert vispruner_select(importance, features, 9, 0.5).tolist() == [list(range(9))] * 2
    assert vispruner_select(importance, features, 100, 0.5).tolist() == [list(range(9))] * 2
    assert vispruner_select(importance, features, 0, 0.5).shape == (2, 0)
    top = torch.sort(torch.argsort(importance, dim=-1, descending=True)[:, :4]).values
    assert torch.equal(vispruner_select(importance, features, 4, 1.0), top)  # r = 1: importance only


def test_identical_features_and_zero_rows_give_no_nan_and_the_right_count():
    features = torch.zeros(1, 20, 4)  # cosine 0 everywhere instead of NaN
    kept = vispruner_select(torch.rand(1, 20), features, 7, 0.0)
    assert kept.shape == (1, 7) and kept.unique().numel() == 7
    features = torch.ones(1, 20, 4)
    kept = vispruner_select(torch.rand(1, 20), features, 7, 0.0)
    assert kept.shape == (1, 7) and kept.unique().numel() == 7


def test_config():
    method = VisPruner()
    assert (method.budget, method.important_ratio, method.step) == (64, 0.5, 8)
    assert VisPruner(budget=0.25).needs_vision_signals


@pytest.mark.parametrize("fields,message", [
    ({"budget": -3}, r"vispruner.budget must be an integer >= 1 \(tokens\), a float in \(0, 1\]"),
    ({"budget": None}, r"vispruner.budget must be"),
    ({"important_ratio": 1.2}, r"vispruner.important_ratio must be a number in \[0, 1\], got 1.2"),
    ({"important_ratio": float("nan")}, r"vispruner.important_ratio must be a number in \[0, 1\]"),
    ({"step": 0}, "vispruner.step must be an integer >= 1, got 0"),
    ({"parity": "odd"}, r"vispruner.parity must be one of \['general', 'lightcompress'\], got 'odd'"),
    ({"positions": "x"}, r"vispruner.positions must be one of \['auto', 'keep', 'reindex'\]"),
])
def test_validation_names_the_field_and_the_allowed_values(fields, message):
    with pytest.raises(ValueError, match=message):
        VisPruner(**fields)
