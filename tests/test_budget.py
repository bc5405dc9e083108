"""The shared budget helper (``tokenprune/methods/_budget.py``): validation, counts and the per-group split."""

import pytest

from tokenprune.methods._budget import budget_count, budget_fraction, check_budget, split_budget


@pytest.mark.parametrize("value", [1, 64, 576, 10**6, 0.25, 1.0, 1e-9, None])
def test_valid_budgets_pass(value):
    check_budget("dart", value)


@pytest.mark.parametrize("value", [0, -3, True, False, 0.0, -0.5, 1.5, float("nan"), float("inf"), "64", [64]])
def test_invalid_budgets_name_the_field_and_the_allowed_values(value):
    with pytest.raises(ValueError, match=r"dart\.budget must be an integer >= 1 .* float in \(0, 1\]"):
        check_budget("dart", value)


def test_none_is_refused_when_required():
    with pytest.raises(ValueError, match="pool.stride_budget"):
        check_budget("pool", None, field_name="stride_budget", allow_none=False)


def test_counts_by_hand():
    assert [budget_count(576, b) for b in (192, 128, 64, 1, 576, 1000)] == [192, 128, 64, 1, 576, 576]
    assert budget_count(576, 1.0) == 576 and budget_count(576, 0.25) == 144
    assert budget_count(576, 1 / 3) == 192  # 192.0 exactly representable after rounding
    assert budget_count(10, 0.25) == 2  # round(2.5) = 2: half to even
    assert budget_count(10, 0.35) == 4  # round(3.5) = 4
    assert budget_count(10, 0.35, rounding="floor") == 3
    assert budget_count(576, 0.0001) == 0  # a tiny fraction may keep nothing
    assert budget_fraction(576, 144) == 0.25 and budget_fraction(576, 2000) == 1.0 and budget_fraction(576, 0.5) == 0.5


def test_split_by_hand():
    assert split_budget(64, [576]) == [64]
    assert split_budget(10, [6, 6, 6]) == [4, 3, 3]  # remainders 2, 2, 2: ties go to the earlier group
    assert split_budget(7, [2, 3, 5]) == [1, 2, 4]  # quotas 1.4, 2.1, 3.5: the largest remainder (.5) gets one
    assert split_budget(0, [3, 4]) == [0, 0] and split_budget(7, [3, 4]) == [3, 4]
    with pytest.raises(ValueError, match="count <= sum"):
        split_budget(8, [3, 4])


def test_split_equals_a_fraction_reference():
    from fractions import Fraction

    for sizes in ([1, 2, 3], [5, 5], [7, 1, 1, 4], [0, 3, 2]):
        total = sum(sizes)
        for count in range(total + 1):
            quotas = [Fraction(count * n, total) for n in sizes]
            floors = [int(q) for q in quotas]
            order = sorted(range(len(sizes)), key=lambda g: (-(quotas[g] - floors[g]), g))
            expected = [f + (g in order[: count - sum(floors)]) for g, f in enumerate(floors)]
            got = split_budget(count, sizes)
            assert got == expected and sum(got) == count and all(0 <= s <= n for s, n in zip(got, sizes))
