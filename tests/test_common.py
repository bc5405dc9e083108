"""The budget and positions conventions shared by the issue-18 methods (``methods/options.py``), by hand."""

import pytest

from tokenprune.methods.common import budget_count, check_budget, resolve_positions


@pytest.mark.parametrize("budget,tokens,kept", [
    (64, 576, 64), (192, 576, 192), (576, 576, 576), (1000, 576, 576), (0, 576, 0), (1, 576, 1),
    (0.098, 576, 56),  # DivPrune's default: round(56.448) = 56
    (0.222, 576, 128),  # round(127.872)
    (0.5, 5, 2), (0.5, 7, 4),  # half to even: round(2.5) = 2, round(3.5) = 4
    (0.01, 36, 1),  # round(0.36) = 0, but a positive fraction keeps at least one token
    (1.0, 576, 576), (0.5, 0, 0),
])
def test_budget_count_by_hand(budget, tokens, kept):
    assert budget_count(budget, tokens) == kept


@pytest.mark.parametrize("bad", [-1, 0.0, 1.5, -0.5, float("nan"), float("inf"), True, "64", None])
def test_bad_budgets_are_refused_naming_the_field_and_the_allowed_values(bad):
    message = r"m\.budget must be an integer >= 0 \(tokens per pool\) or a float in \(0, 1\]"
    with pytest.raises(ValueError, match=message):
        check_budget("m", "budget", bad)


def test_null_budget_only_where_allowed():
    check_budget("m", "budget", None, allow_none=True)
    with pytest.raises(ValueError, match="or null, got 'x'"):
        check_budget("m", "budget", "x", allow_none=True)


def test_positions_rule():
    assert resolve_positions("m", "auto", "1d") == "reindex"  # official LLaVA re-packs
    assert resolve_positions("m", "auto", "mrope") == "keep"
    assert resolve_positions("m", "keep", "1d") == "keep"
    assert resolve_positions("m", "reindex", "1d") == "reindex"
    with pytest.raises(ValueError, match="m.positions=reindex needs 1-D RoPE; this model uses mrope"):
        resolve_positions("m", "reindex", "mrope")
    with pytest.raises(ValueError, match=r"m.positions must be one of \['auto', 'keep', 'reindex'\], got 'repack'"):
        resolve_positions("m", "repack", "1d")
