"""DART (Wen et al., EMNLP 2025): keep the visual tokens least duplicated with a few pivot tokens.

Card: ``shared/methods/dart.md``. At the input of layer K (default 2), with layer K-1's post-RoPE keys ``k``
and its output ``h`` through the text model's **final** norm (``z``):

1. pivots: the ``pivot_visual`` visual rows and the ``pivot_text`` text rows with the largest key L1 norms;
2. the pool ``R`` = visual rows that are not visual pivots (ascending);
3. each pivot ``p``, visited in CPython's ``list(set(visual_pivots + text_pivots))`` order (official), claims the
   ``c_p`` rows of ``R`` least cosine-similar to ``z_p`` and removes them from ``R``;
4. the kept visual rows are the visual pivots plus every claimed row (text pivots stay text rows).

Per-pivot counts ``c_p`` (first set field wins; at most one may be set):

* ``keep`` (official LLaVA ``max_num_trunction``): ``c = keep // (p_v + p_t)``, so 128 keeps 4 + 8·16 = **132**;
* ``reduction_ratio`` (official Qwen, default 0.778): ``c = int(N·(1 - r) / (p_v + p_t))``, ``1 - r`` as written;
* ``budget`` (tokenprune, status/budget.md): exactly ``count = budget_count(N, budget)`` rows survive: the visual
  pivots, then ``count - p_v`` rows spread over the visited pivots, the earlier ones getting one more
  (``count < p_v``: only the top ``count`` visual pivots). A tokenprune rule, labelled as such.

Every ``c_p`` is clamped to what is left of the pool (the official code fails there: card §7).
Ties (pivot norms and cosines): the lower row first; cosines in float32 by default (official: model dtype).
Positions: the official code keeps the original positions on both LLaVA and Qwen (``positions="auto"`` =
``"keep"`` everywhere); ``"reindex"`` (contiguous, where the family defines it: 1-D RoPE) is a labelled variant.

Engine wiring (``select`` at layer K): ``z = step.final_norm(step.hidden)``; ``k = step.keys(K - 1)`` (layer K-1's
KV cache at prefill, recomputed with the family's attention math without a cache); visual rows per ``scope``
(``sample``: every image and frame, text pivots from the text after the last visual row; ``first``: the official
Qwen rule, only the first image / temporal group, every later row a text row, ``budget`` counting that group's
tokens; ``group``: each group alone, with ``budget`` split over groups in proportion to size and ``keep`` /
``reduction_ratio`` applied per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._budget import budget_count, check_budget, split_budget
from .base import Method, ModelInfo, PrefillStep, Reduction, check_choice, check_layer, check_positions, register, \
    resolve_positions

PIVOT_ORDERS = ("official", "sorted")
SCOPES = ("sample", "first", "group")
OFFICIAL_POSITIONS = "keep"  # modeling_llama_self.py L359 (position_ids = keep_indexs); Qwen: gathered 3-D positions


# ----------------------------------------------------------------------------------------------------------
# Pure algorithm
# ----------------------------------------------------------------------------------------------------------
def key_l1_norms(keys: torch.Tensor) -> torch.Tensor:
    """L1 norm of every row's key over all KV heads (not repeated), float32.

    keys: ``[H_kv, L, d_h]`` post-RoPE keys of layer K-1 (one sample) → ``[L]``. Repeating GQA heads would scale
    every norm by the same factor, so the pivots do not depend on it.
    """
    if keys.dim() != 3:
        raise ValueError(f"key_l1_norms expects keys of shape [H_kv, L, d_h], got {tuple(keys.shape)}")
    return keys.float().abs().sum(dim=(0, 2))


def top_rows(scores: torch.Tensor, rows: torch.Tensor, k: int) -> list[int]:
    """The ``k`` rows with the largest ``scores`` in descending-score order (ties: the lower row first).

    scores ``[n]`` (over ``rows`` ``[n]``, ascending) → Python list of ``min(k, n)`` row indices.
    """
    order = torch.argsort(scores.float(), descending=True, stable=True)[: max(0, k)]
    return rows[order].tolist()


def visit_order(visual_pivots: list[int], text_pivots: list[int], order: str = "official") -> list[int]:
    """Order in which the pivots claim their rows.

    ``official``: CPython's ``list(set(visual + text))`` with each list in descending-norm order, as the official
    code (the result depends on the row values and the insertion order); ``sorted``: ascending rows.
    """
    check_choice("dart", "pivot_order", order, PIVOT_ORDERS)
    pivots = list(visual_pivots) + list(text_pivots)
    return list(set(pivots)) if order == "official" else sorted(pivots)


def official_per_pivot(num_visual: int, num_pivots: int, keep: int | None = None,
                       reduction_ratio: float | None = None) -> int:
    """The official per-pivot count c: ``keep // P`` (LLaVA) or ``int(N·(1 - r) / P)`` (Qwen), P = p_v + p_t."""
    if num_pivots < 1:
        return 0
    if keep is not None:
        return keep // num_pivots
    return int(num_visual * (1 - reduction_ratio) / num_pivots)


def budget_per_pivot(count: int, num_visual_pivots: int, num_visited: int) -> list[int]:
    """Per-pivot counts (visit order) so that ``num_visual_pivots + sum == count`` (tokenprune's ``budget``)."""
    extra = max(0, count - num_visual_pivots)
    if num_visited == 0:
        return []
    base, remainder = divmod(extra, num_visited)
    return [base + 1] * remainder + [base] * (num_visited - remainder)


def duplication_keep(z: torch.Tensor, visual: torch.Tensor, visual_pivots: list[int], visit: list[int],
                     counts: list[int], sim_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Steps 2-4: the kept visual rows, ascending ``[n_kept]`` int64.

    z: ``[L, d]`` layer K-1's output through the final norm; visual: ``[N]`` visual rows (ascending);
    visual_pivots: the visual pivot rows; visit: every pivot row in visit order; counts: ``c_p`` per visited
    pivot (clamped to the remaining pool). Pool rows are claimed by lowest ``cos(z_p, z_j)``, ties lower row.
    """
    if len(counts) != len(visit):
        raise ValueError(f"duplication_keep: {len(counts)} counts for {len(visit)} pivots")
    pivot_set = set(visual_pivots)
    pool = visual[~torch.isin(visual, torch.tensor(sorted(pivot_set), dtype=visual.dtype, device=visual.device))]
    zs = z.to(sim_dtype)
    claimed = [torch.tensor(sorted(pivot_set), dtype=torch.long, device=visual.device)]
    for pivot, count in zip(visit, counts):
        count = min(count, pool.numel())
        if count <= 0:
            continue
        sims = F.cosine_similarity(zs[pivot][None], zs[pool], dim=-1, eps=1e-8)  # [|R|]
        chosen = torch.argsort(sims.float(), stable=True)[:count]  # least similar first; ties: lower row
        claimed.append(pool[chosen])
        remaining = torch.ones(pool.numel(), dtype=torch.bool, device=pool.device)
        remaining[chosen] = False
        pool = pool[remaining]
    return torch.sort(torch.cat(claimed)).values


def dart_keep(z: torch.Tensor, norms: torch.Tensor, visual: torch.Tensor, text: torch.Tensor,
              pivot_visual: int = 4, pivot_text: int = 4, *, keep: int | None = None,
              reduction_ratio: float | None = None, budget: int | float | None = None,
              pivot_order: str = "official", sim_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DART's kept visual rows (ascending ``[n_kept]``) for one visual set.

    z ``[L, d]`` (final-normed output of layer K-1), norms ``[L]`` (``key_l1_norms``), visual ``[N]`` and text
    ``[T]`` row indices. Exactly one of ``keep`` / ``reduction_ratio`` / ``budget`` gives the counts (module doc).
    Fewer visual or text rows than pivots: every row of that kind is a pivot.
    """
    if sum(value is not None for value in (keep, reduction_ratio, budget)) != 1:
        raise ValueError("dart_keep: give exactly one of keep, reduction_ratio, budget")
    num_visual = visual.numel()
    if budget is not None:
        count = budget_count(num_visual, budget)
        visual_pivots = top_rows(norms[visual], visual, min(pivot_visual, count))
    else:
        visual_pivots = top_rows(norms[visual], visual, pivot_visual)
    text_pivots = top_rows(norms[text], text, pivot_text)
    visit = visit_order(visual_pivots, text_pivots, pivot_order)
    if budget is not None:
        counts = budget_per_pivot(count, len(visual_pivots), len(visit))
    else:
        c = official_per_pivot(num_visual, pivot_visual + pivot_text, keep, reduction_ratio)
        counts = [c] * len(visit)
    return duplication_keep(z, visual, visual_pivots, visit, counts, sim_dtype)


def scope_sets(scope: str, groups: list[torch.Tensor], text_after_last: torch.Tensor,
               length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(visual rows, text rows) per DART run for a scope.

    groups: each image's (or temporal group's) visual rows in prompt order, ascending; text_after_last: the
    non-visual rows after the last visual row; length: the sequence length.

    * ``sample``: one run over every visual row; text pivots from ``text_after_last``.
    * ``first`` (official Qwen): one run over the first group; every row after its span is a text row
      (later images included, as in the official code).
    * ``group``: one run per group, each with ``text_after_last``.
    """
    check_choice("dart", "scope", scope, SCOPES)
    groups = [g for g in groups if g.numel()]
    if not groups:
        return []
    if scope == "sample":
        return [(torch.cat(groups).sort().values, text_after_last)]
    if scope == "first":
        first = groups[0]
        return [(first, torch.arange(int(first[-1]) + 1, length, device=first.device))]
    return [(g, text_after_last) for g in groups]


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------
@register("dart")
@dataclass
class DART(Method):
    """DART; see the module docstring. With no count field set, the official ``reduction_ratio=0.778``."""

    budget: int | float | None = None  # tokenprune: exact survivors (status/budget.md)
    keep: int | None = None  # official max_num_trunction (LLaVA scripts: 128 → 132 kept)
    reduction_ratio: float | None = None  # official reduction_ratio (None: 0.778 unless budget / keep is set)
    layer: int = 2  # select at layer K's input, scoring with layer K-1 (K >= 1)
    pivot_visual: int = 4
    pivot_text: int = 4
    pivot_order: str = "official"  # official (CPython set order) | sorted
    sim_dtype: str = "float32"  # float32 | model (official: the model dtype)
    scope: str = "sample"  # sample | first (official Qwen: first image only) | group
    positions: str = "auto"  # auto (official: keep, every family) | keep | reindex (1-D RoPE only)

    OFFICIAL_REDUCTION_RATIO = 0.778

    def __post_init__(self):
        check_budget(self.name, self.budget)
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0):
            raise ValueError(f"{self.name}.keep must be a non-negative integer or null, got {self.keep!r}")
        ratio = self.reduction_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0 <= ratio < 1):
            raise ValueError(f"{self.name}.reduction_ratio must be a number in [0, 1) or null, got {ratio!r}")
        given = [n for n in ("budget", "keep", "reduction_ratio") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"{self.name}: set at most one of budget, keep, reduction_ratio (got {', '.join(given)})")
        check_layer(self.name, "layer", self.layer)
        for field_name in ("pivot_visual", "pivot_text"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{self.name}.{field_name} must be a non-negative integer, got {value!r}")
        if self.pivot_visual + self.pivot_text < 1:
            raise ValueError(f"{self.name}: pivot_visual + pivot_text must be >= 1, got 0")
        check_choice(self.name, "pivot_order", self.pivot_order, PIVOT_ORDERS)
        check_choice(self.name, "sim_dtype", self.sim_dtype, ("float32", "model"))
        check_choice(self.name, "scope", self.scope, SCOPES)
        check_positions(self.name, self.positions)

    def validate(self, model: ModelInfo) -> None:
        check_layer(self.name, "layer", self.layer, model)
        resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, model)

    def count_fields(self) -> dict:
        """The one count field ``dart_keep`` takes: the set one, else the official reduction ratio."""
        if self.budget is not None:
            return {"budget": self.budget}
        if self.keep is not None:
            return {"keep": self.keep}
        return {"reduction_ratio": self.OFFICIAL_REDUCTION_RATIO if self.reduction_ratio is None
                else self.reduction_ratio}

    # -- hooks ----------------------------------------------------------------------------------------------
    def prune_layers(self, layout) -> list[int]:
        return [self.layer]

    def select(self, step: PrefillStep) -> Reduction:
        layout = step.layout
        z = step.final_norm(step.hidden[0])  # [L, d] layer K-1's output through the final norm
        norms = key_l1_norms(step.keys(self.layer - 1))  # [L]
        groups = [layout.group_rows(g) for g in range(len(layout.groups))]
        runs = scope_sets(self.scope, groups, layout.text_after_visual_rows(), layout.length)
        counts = [self.count_fields()] * len(runs)
        if self.scope == "group" and self.budget is not None:  # the sample's budget, split over the groups
            total = budget_count(layout.num_visual, self.budget)
            counts = [{"budget": share} for share in split_budget(total, [v.numel() for v, _ in runs])]
        sim_dtype = step.hidden.dtype if self.sim_dtype == "model" else torch.float32
        kept = [dart_keep(z, norms, visual, text, self.pivot_visual, self.pivot_text, pivot_order=self.pivot_order,
                          sim_dtype=sim_dtype, **count) for (visual, text), count in zip(runs, counts)]
        if self.scope == "first":  # the official Qwen rule prunes the first group only
            kept += groups[1:]
        rows = torch.cat(kept) if kept else layout.visual_rows()[:0]
        reindex = resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, step.model) == "reindex"
        return step.keep_visual(rows, reindex_positions=reindex)
