"""The retained-token ``budget`` shared by the issue-18 methods (convention: ``/work/wt/status/budget.md``).

``budget`` says how many visual tokens survive a method's (last) reduction, merged rows included:

* an ``int >= 1``: that many tokens for the whole sample, capped at its visual token count ``N``;
* a ``float`` in ``(0, 1]``: that fraction of ``N``; the count is ``round(N * budget)`` (Python's round, half to
  even) unless a method's official code rounds otherwise (``rounding="floor"``, stated in its docstring).

So ``budget: 1`` is one token and ``budget: 1.0`` is every token. Methods that reduce per image / frame group
split the sample's count over groups in proportion to group size (``split_budget``).
"""

from __future__ import annotations

import math


def check_budget(method: str, value, field_name: str = "budget", allow_none: bool = True) -> None:
    """Raise ValueError naming ``method.field_name`` and the allowed values unless ``value`` is a valid budget."""
    if value is None and allow_none:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    if isinstance(value, float) and math.isfinite(value) and 0 < value <= 1:
        return
    allowed = "an integer >= 1 (tokens), a float in (0, 1] (fraction of the visual tokens)"
    raise ValueError(f"{method}.{field_name} must be {allowed}{' or null' if allow_none else ''}, got {value!r}")


def budget_count(num_tokens: int, budget: int | float, rounding: str = "round") -> int:
    """Visual tokens kept out of ``num_tokens`` for a valid ``budget``: in ``[0, num_tokens]``.

    rounding (float budgets only): ``"round"`` (Python round, half to even) or ``"floor"``.
    """
    if isinstance(budget, int) and not isinstance(budget, bool):
        return min(budget, num_tokens)
    if rounding not in ("round", "floor"):
        raise ValueError(f"budget rounding must be 'round' or 'floor', got {rounding!r}")
    count = round(num_tokens * budget) if rounding == "round" else math.floor(num_tokens * budget)
    return max(0, min(num_tokens, int(count)))


def budget_fraction(num_tokens: int, budget: int | float) -> float:
    """The fraction of ``num_tokens`` a budget asks for, in ``[0, 1]`` (grid-based methods: pool, downsample)."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        return min(1.0, budget / num_tokens) if num_tokens else 1.0
    return float(budget)


def split_budget(count: int, sizes: list[int]) -> list[int]:
    """Split ``count`` tokens over groups of ``sizes`` tokens in proportion to size (largest remainder).

    Group ``g`` gets ``floor(count * n_g / N)`` plus one for the ``count - sum(floors)`` groups with the largest
    remainders ``count * n_g mod N`` (ties: the earlier group). Exact integer arithmetic; each share <= n_g.
    """
    total = sum(sizes)
    if any(size < 0 for size in sizes) or not 0 <= count <= total:
        raise ValueError(f"split_budget: need 0 <= count <= sum(sizes) and sizes >= 0, got {count} over {sizes}")
    if total == 0:
        return [0] * len(sizes)
    shares = [count * size // total for size in sizes]
    remainders = [count * size % total for size in sizes]
    left = count - sum(shares)
    for g in sorted(range(len(sizes)), key=lambda g: (-remainders[g], g))[:left]:
        shares[g] += 1
    return shares
