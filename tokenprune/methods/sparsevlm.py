"""SparseVLM (Zhang et al., ICML 2025): text raters rank the visual tokens; the best dropped ones are recycled.

Card: ``shared/methods/sparsevlm.md`` (official v1.5 code by default). Once per sample, the *raters* are the text
rows after the image (question + template) whose input embeddings attract the visual tokens most (unscaled
softmax over the text, mean over the visual rows, strictly above the mean). At the input of each layer K_s of
``layers`` (official [3, 7, 16], scored with layer K_s - 1):

1. score(v) = mean over raters of the head-mean attention probabilities layer K_s - 1 gives v;
2. keep the top ``k_s = min(count_s, n_v - 1)`` visual rows (ascending; the cap always drops one);
3. recycle: of the ``|P|`` dropped rows, the top ``m = int(0.3·|P|) + 1`` by score (descending) are clustered by
   DPC-KNN (``c = int(m/10) + 1`` centres, ``k = c`` neighbours) on the hidden states entering K_s; each cluster
   becomes one row, the members' mean with the official weights ``1 / (size + 1e-6)``, in centre order;
4. the new visual block is ``[kept][recycled]``; recycled rows are visual in later stages.

Counts (at most one field set; none: the official ``retain=192``):

* ``retain`` (official ``--retained_tokens``): per-stage counts from the official table at N = 576, scaled by
  ``round(c·N/576)`` otherwise. Note: "192" is the paper's layer-averaged count, not the survivors (113);
* ``counts``: explicit per-stage counts at N = 576 (scaled the same way);
* ``budget`` (tokenprune, status/budget.md): exactly ``budget_count(N, budget)`` visual rows after the last stage
  (kept + recycled); stage s targets ``round(N·(B/N)^((s+1)/S))`` (geometric; a tokenprune rule, labelled), and
  each stage's ``k`` solves ``k + c(k) = target``; a target >= n_v skips the stage.
* ``schedule="rank"`` (v1): ``k = min(int(rank(A)·scale + bias), n_v - 1)``, with A the rater × visual
  head-mean probabilities (float32); rank = n_v: no pruning at that stage.

Positions: the official code renumbers contiguously after each stage (``positions="auto"`` = ``"reindex"`` where
the family defines it, 1-D RoPE); on mRoPE (no official code) the original positions are kept (``"auto"`` =
``"keep"``), a recycled row taking its centre's position (``merged_position="center"``) or the rounded mean of its
members'. ``keep`` on 1-D RoPE is a labelled variant.

Engine wiring (``select`` at each K_s): the raters come from ``step.decoder_input`` (the embeddings that entered the
decoder; recomputed at each stage, they do not change), the scores from ``step.attention(layer=K_s - 1, queries=
<raters>, keys="visual", heads="mean", reduce="mean")``, recycling from ``step.hidden`` at the dropped rows; the
result is a ``Reduction`` keeping every non-visual row and the kept visual rows, with the recycled rows as merged
rows (members and weights 1/(size + 1e-6), the method's values) placed after the last visual row. On Qwen (no
official code) V is every image / video row, T the text after the last one; counts scale by N/576.
Reported (``stats``): ``sparsevlm_stage_visual`` (visual rows after each stage, recycled included) and
``sparsevlm_official_tokens`` (the official "equal tokens": the mean over layers of the visual count after each
layer's pruning, layer K_s - 1 counted as pruned; 192.0 / 128.6 / 64.8 at the official settings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.dpc_knn import dpc_knn
from ._budget import budget_count, check_budget
from .base import (MergedRows, Method, ModelInfo, PrefillStep, Reduction, check_choice, check_layer, check_positions,
                   register, resolve_positions, topk_rows)

# Official per-stage kept counts at N = 576 (score.py @ v1.5 b9619e6 L7-L9; 96 from main 26a5f48 L11-L14).
OFFICIAL_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
REFERENCE_TOKENS = 576  # the official tables are for LLaVA-1.5's 576 visual tokens
MERGE_EPS = 1e-6  # official: member weight 1 / (cluster size + 1e-6)
OFFICIAL_POSITIONS = "reindex"  # modelling_sparse_llama.py L308: position_ids renumbered after every stage


# ----------------------------------------------------------------------------------------------------------
# Raters
# ----------------------------------------------------------------------------------------------------------
def text_relevance(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """r_t = mean over visual rows of softmax_t(E_v · E_t) (no 1/sqrt(d)), float32.

    visual_embeds ``[N, d]``, text_embeds ``[T, d]`` (decoder input embeddings) → ``[T]``.
    """
    logits = visual_embeds.float() @ text_embeds.float().T  # [N, T]
    return logits.softmax(dim=-1).mean(dim=0)


def raters_from_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """Offsets into the text rows with relevance strictly above the mean (``[n_raters]`` ascending).

    If none is (a constant relevance, e.g. one text row), every text row rates: the official code would average
    over an empty set (NaN scores); this fallback is tokenprune's.
    """
    raters = torch.nonzero(relevance > relevance.mean()).flatten()
    return raters if raters.numel() else torch.arange(relevance.numel(), device=relevance.device)


def select_raters(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Rater offsets into the text rows: ``raters_from_relevance(text_relevance(...))``."""
    if text_embeds.shape[0] == 0:
        raise ValueError("sparsevlm scores visual tokens with the text after them; this prompt has no text after "
                         "the last image / video (put the visual input before the question)")
    return raters_from_relevance(text_relevance(visual_embeds, text_embeds))


# ----------------------------------------------------------------------------------------------------------
# Counts
# ----------------------------------------------------------------------------------------------------------
def scaled_counts(counts, num_visual: int) -> list[int]:
    """Per-stage counts given at N = 576, for ``num_visual`` tokens: as is at 576, else ``round(c·N/576)``."""
    if num_visual == REFERENCE_TOKENS:
        return list(counts)
    return [round(c * num_visual / REFERENCE_TOKENS) for c in counts]


def recycle_sizes(num_dropped: int, frac: float = 0.3, div: int = 10) -> tuple[int, int]:
    """(m, c): recycle candidates ``int(frac·|P|) + 1`` and clusters ``int(m/div) + 1``; (0, 0) when none dropped."""
    if num_dropped <= 0:
        return 0, 0
    m = min(num_dropped, int(num_dropped * frac) + 1)
    return m, min(m, int(m / div) + 1)


def fixed_keep(count: int, num_visual: int) -> int:
    """Official kept count ``min(count, n_v - 1)`` (the cap drops at least one token)."""
    return max(0, min(count, num_visual - 1))


def rank_keep(relation: torch.Tensor, scale: float, bias: float) -> int | None:
    """v1's adaptive count from the rater × visual matrix ``relation`` ``[|Q|, n_v]``; None: no pruning.

    ``rank = matrix_rank(relation.float())`` (torch's default tolerance); rank == n_v → None; else
    ``max(0, min(int(rank·scale + bias), n_v - 1))``.
    """
    num_visual = relation.shape[-1]
    rank = int(torch.linalg.matrix_rank(relation.float()))
    if rank == num_visual:
        return None
    return max(0, min(int(rank * scale + bias), num_visual - 1))


def geometric_targets(num_visual: int, count: int, num_stages: int) -> list[int]:
    """Visual rows after each stage for ``budget``: ``round(N·(B/N)^((s+1)/S))``, the last exactly ``B``."""
    if num_visual == 0:
        return [0] * num_stages
    targets = [round(num_visual * (count / num_visual) ** ((s + 1) / num_stages)) for s in range(num_stages)]
    return targets[:-1] + [count] if num_stages else []


def solve_keep(num_visual: int, target: int, recycle: bool = True, frac: float = 0.3,
               div: int = 10) -> int | None:
    """Kept count ``k`` with ``k + c(k) = target`` (``c``: recycled rows, 0 without recycling); None: no pruning.

    With recycling ``k + c`` rises by 0 or 1 per step of ``k``, from ``c(n_v)`` at k = 0 to ``n_v`` at
    k = n_v - 1, so every target in that range is met exactly; a target below ``c(n_v)`` is refused.
    """
    if target >= num_visual:
        return None
    if not recycle:
        return max(0, target)
    for k in range(0, num_visual):
        total = k + recycle_sizes(num_visual - k, frac, div)[1]
        if total == target:
            return k
        if total > target:
            break
    raise ValueError(f"sparsevlm.budget: {target} visual tokens cannot be reached from {num_visual} with "
                     f"recycling (recycling alone adds {recycle_sizes(num_visual, frac, div)[1]}); "
                     "raise the budget or set recycle=false")


# ----------------------------------------------------------------------------------------------------------
# One stage
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Recycled:
    """The recycled rows of one stage (offsets are into the stage's current visual rows).

    candidates ``[m]``: the recycled dropped rows, descending score; labels ``[m]``: cluster of each candidate;
    centers ``[c]``: candidate index of each cluster's centre (centre order); weights ``[c, m]`` float32:
    ``1/(size + 1e-6)`` on the cluster's members; values ``[c, d]`` = ``weights @ hidden[candidates]``.
    """

    candidates: torch.Tensor
    labels: torch.Tensor
    centers: torch.Tensor
    weights: torch.Tensor
    values: torch.Tensor

    @property
    def members(self) -> list[torch.Tensor]:
        """Candidate offsets of each cluster's members (ascending in candidate order), centre order."""
        return [torch.nonzero(self.labels == r).flatten() for r in range(self.centers.numel())]


def recycle_tokens(hidden: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor, frac: float = 0.3,
                   div: int = 10, seed: int = 0) -> Recycled | None:
    """Cluster the best ``m`` dropped rows into ``c`` recycled rows (None when nothing was dropped).

    hidden ``[n_v, d]`` (hidden states entering the layer at the visual rows), scores ``[n_v]``, dropped ``[|P|]``
    offsets into the visual rows (ascending).
    """
    m, c = recycle_sizes(dropped.numel(), frac, div)
    if m == 0:
        return None
    order = torch.argsort(scores[dropped].float(), descending=True, stable=True)[:m]  # ties: lower row first
    candidates = dropped[order]  # [m] descending score
    x = hidden[candidates]  # [m, d]
    result = dpc_knn(x[None], c, k=c, seed=seed)
    labels, centers = result.labels[0], result.centers[0]  # [m], [c]
    one_hot = (labels[None, :] == torch.arange(c, device=labels.device)[:, None]).float()  # [c, m]
    weights = one_hot / (one_hot.sum(-1, keepdim=True) + MERGE_EPS)  # [c, m]
    values = (weights @ x.float()).to(hidden.dtype)  # [c, d]
    return Recycled(candidates, labels, centers, weights, values)


def recycled_positions(positions: torch.Tensor, recycled: Recycled, rule: str = "center") -> torch.Tensor:
    """Positions ``[P, c]`` of the recycled rows from the visual rows' positions ``[P, n_v]``.

    ``center``: the centre's position (all axes); ``mean``: the rounded (half to even) mean of the members'.
    """
    check_choice("sparsevlm", "merged_position", rule, ("center", "mean"))
    member_positions = positions[:, recycled.candidates]  # [P, m]
    if rule == "center":
        return member_positions[:, recycled.centers]
    one_hot = (recycled.weights > 0).double()  # [c, m]
    means = member_positions.double() @ one_hot.T / one_hot.sum(-1)  # [P, c]
    return torch.round(means).to(positions.dtype)


@dataclass
class StageResult:
    """kept ``[k]`` ascending offsets into the stage's visual rows; dropped ``[n_v - k]`` ascending; recycled
    (or None). The stage's new visual block is ``[kept][recycled.values]`` (``n_v' = k + c``)."""

    kept: torch.Tensor
    dropped: torch.Tensor
    recycled: Recycled | None

    @property
    def num_out(self) -> int:
        return self.kept.numel() + (self.recycled.values.shape[0] if self.recycled is not None else 0)


def sparsify_stage(scores: torch.Tensor, hidden: torch.Tensor, keep: int | None, recycle: bool = True,
                   frac: float = 0.3, div: int = 10, seed: int = 0) -> StageResult:
    """One stage on the current visual rows: top-``keep`` by ``scores`` (ties: lower row), then recycling.

    scores ``[n_v]`` (rater head-mean attention), hidden ``[n_v, d]``; ``keep`` None: no pruning at this stage.
    """
    num_visual = scores.numel()
    everything = torch.arange(num_visual, device=scores.device)
    if keep is None:
        return StageResult(everything, everything[:0], None)
    kept = topk_rows(scores, everything, keep)
    dropped = everything[~torch.isin(everything, kept)]
    recycled = recycle_tokens(hidden, scores, dropped, frac, div, seed) if recycle else None
    return StageResult(kept, dropped, recycled)


def official_equal_tokens(num_visual: int, layers: list[int], stage_visual: list[int], num_layers: int) -> float:
    """The official "equal tokens" (modelling_sparse_llama.py L363-L373): the mean over the ``num_layers`` layers of
    the visual count after each layer's pruning, stage s counted from layer ``layers[s] - 1`` (its scoring layer)."""
    total, count, stage = 0, num_visual, 0
    for layer in range(num_layers):
        while stage < len(layers) and layer >= layers[stage] - 1:
            count, stage = stage_visual[stage], stage + 1
        total += count
    return total / num_layers


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------
@register("sparsevlm")
@dataclass
class SparseVLM(Method):
    """SparseVLM v1.5; see the module docstring."""

    layers: list[int] = (3, 7, 16)  # prune at the input of K, score with K - 1 (official pruning_loc 2, 6, 15)
    budget: int | float | None = None  # tokenprune: exact visual rows after the last stage (status/budget.md)
    retain: int | None = None  # official --retained_tokens: 192 | 128 | 96 | 64 (None: 192 unless set otherwise)
    counts: list[int] | None = None  # explicit per-stage counts at N = 576
    schedule: str = "fixed"  # fixed (v1.5) | rank (v1)
    rank_scale: float | None = None  # v1 scripts: MME 13.5, POPE 9, TextVQA 0.8
    rank_bias: float = 0.0  # v1 scripts: MME 0, POPE 6, TextVQA 0
    recycle: bool = True
    recycle_frac: float = 0.3
    cluster_div: int = 10
    positions: str = "auto"  # auto (official: reindex where defined, i.e. 1-D RoPE; else keep) | keep | reindex
    merged_position: str = "center"  # center | mean (keep positions only)
    seed: int = 0  # DPC-KNN density tie-break noise

    def __post_init__(self):
        self.layers = list(self.layers)  # [] prunes nothing (card §8.6: the baseline's logits)
        for i, layer in enumerate(self.layers):
            check_layer(self.name, f"layers[{i}]", layer)
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"{self.name}.layers must be strictly increasing, got {self.layers}")
        check_budget(self.name, self.budget)
        if self.retain is not None and self.retain not in OFFICIAL_COUNTS:
            raise ValueError(f"{self.name}.retain must be one of {sorted(OFFICIAL_COUNTS)} (the official tables) or "
                             f"null, got {self.retain!r}; use budget for other token counts")
        if self.counts is not None:
            self.counts = list(self.counts)
            if len(self.counts) != len(self.layers) or any(
                    isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.counts):
                raise ValueError(f"{self.name}.counts must be {len(self.layers)} non-negative integers (one per "
                                 f"layer), got {self.counts!r}")
        given = [n for n in ("budget", "retain", "counts") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"{self.name}: set at most one of budget, retain, counts (got {', '.join(given)})")
        check_choice(self.name, "schedule", self.schedule, ("fixed", "rank"))
        if self.schedule == "rank":
            if given:
                raise ValueError(f"{self.name}.schedule='rank' derives its counts from the rank; "
                                 f"unset {', '.join(given)}")
            if isinstance(self.rank_scale, bool) or not isinstance(self.rank_scale, (int, float)) or self.rank_scale < 0:
                raise ValueError(f"{self.name}.rank_scale must be a number >= 0 with schedule='rank' "
                                 f"(v1 scripts: 13.5 MME, 9 POPE, 0.8 TextVQA), got {self.rank_scale!r}")
            if isinstance(self.rank_bias, bool) or not isinstance(self.rank_bias, (int, float)):
                raise ValueError(f"{self.name}.rank_bias must be a number, got {self.rank_bias!r}")
        elif self.budget is None and self.counts is None and len(self.layers) not in (0, 3):
            raise ValueError(f"{self.name}.retain gives 3 per-stage counts but layers has {len(self.layers)}; "
                             "set counts (one per layer) or budget")
        if not isinstance(self.recycle, bool):
            raise ValueError(f"{self.name}.recycle must be true or false, got {self.recycle!r}")
        frac = self.recycle_frac
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
            raise ValueError(f"{self.name}.recycle_frac must be a number in [0, 1], got {frac!r}")
        div = self.cluster_div
        if isinstance(div, bool) or not isinstance(div, int) or div < 1:
            raise ValueError(f"{self.name}.cluster_div must be an integer >= 1, got {div!r}")
        check_positions(self.name, self.positions)
        check_choice(self.name, "merged_position", self.merged_position, ("center", "mean"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{self.name}.seed must be an integer, got {self.seed!r}")

    def validate(self, model: ModelInfo) -> None:
        for i, layer in enumerate(self.layers):
            check_layer(self.name, f"layers[{i}]", layer, model)
        resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, model)

    def stage_counts(self, num_visual: int) -> list[int]:
        """Per-stage requested counts for N = ``num_visual`` original visual tokens (schedule='fixed' only).

        ``retain`` / ``counts``: the official scaled counts (each capped at n_v - 1 by ``fixed_keep``);
        ``budget``: the geometric stage targets (visual rows after each stage, recycled included).
        """
        if self.budget is not None:
            return geometric_targets(num_visual, budget_count(num_visual, self.budget), len(self.layers))
        counts = self.counts if self.counts is not None else OFFICIAL_COUNTS[self.retain or 192]
        return scaled_counts(counts, num_visual)

    def stage_keep(self, stage: int, num_visual_now: int, num_visual: int,
                   relation: torch.Tensor | None = None) -> int | None:
        """``k`` at stage ``stage`` with ``num_visual_now`` current visual rows (None: no pruning there).

        relation ``[|Q|, n_v]``: the rater × visual probabilities, needed by schedule='rank' only.
        """
        if self.schedule == "rank":
            return rank_keep(relation, self.rank_scale, self.rank_bias)
        target = self.stage_counts(num_visual)[stage]
        if self.budget is not None:
            return solve_keep(num_visual_now, target, self.recycle, self.recycle_frac, self.cluster_div)
        return fixed_keep(target, num_visual_now)

    # -- hooks ----------------------------------------------------------------------------------------------
    def prune_layers(self, layout) -> list[int]:
        return list(self.layers)

    def raters(self, step: PrefillStep) -> torch.Tensor:
        """Current rows of the raters ``[n_raters]``: chosen once from the decoder input (same rows every stage)."""
        entering = step.decoder_input
        text = step.layout.text_after_visual_rows()
        text_entering = entering.layout.text_after_visual_rows()
        if text.numel() != text_entering.numel():
            raise ValueError("sparsevlm: the text after the visual rows changed since the decoder input (another "
                             "method pruned it); the raters cannot be found")
        embeds = entering.embeds[0]
        return text[select_raters(embeds[entering.layout.visual_rows()], embeds[text_entering])]

    def select(self, step: PrefillStep) -> Reduction:
        stage = self.layers.index(step.layer)
        layout = step.layout
        visual = layout.visual_rows()  # [n_v]
        raters = self.raters(step)
        relation = None
        if self.schedule == "rank":  # [|Q|, n_v] rater x visual head-mean probabilities
            relation = step.attention(layer=step.layer - 1, queries=raters, keys="visual", heads="mean")
            scores = relation.mean(dim=0)
        else:
            scores = step.attention(layer=step.layer - 1, queries=raters, keys="visual", heads="mean",
                                    reduce="mean")  # [n_v]
        num_visual = step.decoder_input.layout.num_visual  # N of the official count tables
        keep = self.stage_keep(stage, visual.numel(), num_visual, relation)
        result = sparsify_stage(scores, step.hidden[0, visual], keep, self.recycle, self.recycle_frac,
                                self.cluster_div, self.seed)
        reindex = resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, step.model) == "reindex"
        reduction = step.keep_visual(visual[result.kept], reindex_positions=reindex)
        recycled = result.recycled
        if recycled is not None:
            into, member = (recycled.weights > 0).nonzero(as_tuple=True)  # [E] cluster, candidate offset
            positions = recycled_positions(step.positions[0][:, visual], recycled, self.merged_position)
            anchor = torch.full((recycled.centers.numel(),), int(visual[-1]) + 1, device=visual.device)
            reduction.merged = MergedRows(sources=visual[recycled.candidates[member]], into=into,
                                          weights=recycled.weights[into, member], anchor=anchor,
                                          values=recycled.values, positions=positions)
        outs = step.stats.setdefault("sparsevlm_stage_visual", [])  # the first sample's (the report's convention)
        if len(outs) == stage:
            outs.append(result.num_out)
        if stage == len(self.layers) - 1 and step.model is not None:
            step.stats["sparsevlm_official_tokens"] = official_equal_tokens(num_visual, self.layers, outs,
                                                                            step.model.num_layers)
        return reduction
