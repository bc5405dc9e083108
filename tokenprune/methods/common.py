"""What the reduction methods of issue 18 share (VisionZip, VisPruner, DivPrune, CDPruner, ...): the budget and
positions conventions of their fields, and row normalisation for cosine similarities.

**Budget.** ``budget`` is the retained-token setting every such method understands, so that methods compare at
equal token counts. It counts the visual tokens the decoder receives for one *pool* (by default one visual
group: an image, a LLaVA crop, a Qwen temporal step of two frames), every emitted token included (a CLS token
or a merged token counts as one):

* an ``int`` ``k >= 0``: keep ``min(k, N)`` tokens of a pool of ``N`` (LLaVA-1.5: 192 / 128 / 64 of 576);
* a ``float`` ``f`` in ``(0, 1]``: keep ``max(1, round(N * f))`` (Python ``round``, half to even; a positive
  fraction never empties a pool), at most ``N``.

As scikit-learn's ``test_size``: the type says which (``64`` tokens, ``0.25`` of them; ``1`` token, ``1.0`` all).
A budget that keeps every token of a pool leaves the pool exactly as it was (no selection, no merging).

**Positions.** ``positions``: ``auto`` (the official behaviour: contiguous re-packing on 1-D RoPE, where every
official LLaVA implementation re-packs; original positions on mRoPE), ``keep`` (original positions gathered),
``reindex`` (contiguous from the first pruned row; 1-D RoPE only).
"""

from __future__ import annotations

import math

import torch

POSITIONS = ("auto", "keep", "reindex")


def check_budget(method: str, field_name: str, value, allow_none: bool = False) -> None:
    """``value`` must be an int >= 0 (tokens per pool) or a float in (0, 1] (fraction); None if allowed."""
    if value is None and allow_none:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return
    elif isinstance(value, float) and math.isfinite(value) and 0 < value <= 1:
        return
    allowed = "an integer >= 0 (tokens per pool) or a float in (0, 1] (fraction of the pool)"
    raise ValueError(f"{method}.{field_name} must be {allowed}{' or null' if allow_none else ''}, got {value!r}")


def budget_count(budget: int | float, num_tokens: int) -> int:
    """Tokens kept of a pool of ``num_tokens`` at ``budget`` (see the module docstring)."""
    if isinstance(budget, float):
        count = max(1, round(num_tokens * budget))
    else:
        count = budget
    return max(0, min(num_tokens, int(count)))


def check_positions(method: str, value) -> None:
    if value not in POSITIONS:
        raise ValueError(f"{method}.positions must be one of {list(POSITIONS)}, got {value!r}")


def resolve_positions(method: str, value: str, rope: str) -> str:
    """``keep`` or ``reindex`` for a model whose rotary scheme is ``rope`` ("1d" or "mrope")."""
    check_positions(method, value)
    if value == "auto":
        return "reindex" if rope == "1d" else "keep"
    if value == "reindex" and rope != "1d":
        raise ValueError(f"{method}.positions=reindex needs 1-D RoPE; this model uses {rope} "
                         "(use positions=keep or auto)")
    return value


def unit_rows(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows of ``x`` (in ``dtype``, default its own) over their L2 norm; a zero row stays zero instead of NaN."""
    x = x if dtype is None else x.to(dtype)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
