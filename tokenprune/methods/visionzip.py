"""VisionZip (Yang et al., CVPR 2025): keep the tokens the vision encoder attends to most, merge the rest.

Card: ``shared/methods/visionzip.md``. Training-free, text-agnostic, before the decoder. Per visual group:

1. **Dominant**: the ``D'`` content tokens with the highest encoder attention ``s`` (CLS attention of CLIP's
   penultimate layer on LLaVA; received attention of the last ViT block on Qwen2.5-VL, see
   ``models/vision_signals.py``); ties: lower index first. On a CLS encoder the CLS feature is emitted too and
   counts in ``dominant`` (official "54" = CLS + 53 patches).
2. **Remaining** ``R``: the other content tokens, ascending (``n = |R|``).
3. **Targets by stride**: ``step = max(1, n // C)``, targets ``R[0], R[step], ...``, the first ``min(C, n)``.
4. **Assign** every other remaining token to the target of highest key cosine (first target on ties); keys
   are the encoder layer's head-mean keys.
5. **Merge** (official): ``ctx_j = V[target_j] + mean(V[members of j])`` (a memberless target is unchanged);
   ``merge="mean"``: the plain mean of the target and its members.

Phase 1 (issue 18): the pure algorithm and the config. The method is registered once the engine's reduction
result (kept rows + merged rows) lands; until then it has no hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, check_choice, check_ratio
from .common import budget_count, check_budget, check_positions, unit_rows

MERGES = ("official", "mean")
# tokenprune's split of a ``budget`` into dominant + contextual: the paper's LLaVA settings (54 + 10, 108 + 20,
# 162 + 30) all give the contextual tokens 10/64 of the total.
CONTEXTUAL_SHARE = 10 / 64


@dataclass
class VisionZipPlan:
    """The selection of a batch of ``B`` groups of ``N`` content tokens each (content = no CLS).

    dominant ``[B, D']``: content indices of the dominant tokens, ascending.
    remaining ``[B, n]``: the other content indices, ascending (``n = N - D'``).
    targets ``[B, C]``: content indices of the contextual targets, in target order (ascending), ``C <= n``.
    slot ``[B, n]``: for each remaining token, the target it merges into (a target: its own slot).
    is_target ``[B, n]``: whether the remaining token is a target.
    """

    dominant: torch.Tensor
    remaining: torch.Tensor
    targets: torch.Tensor
    slot: torch.Tensor
    is_target: torch.Tensor

    @property
    def num_contextual(self) -> int:
        return self.targets.shape[1]


def topk_stable(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest ``scores`` along the last axis (ties: lower index first), ascending.

    ``scores``: ``[B, N]`` → ``[B, count]``.
    """
    order = torch.argsort(scores.float(), dim=-1, descending=True, stable=True)[:, :count]
    return torch.sort(order, dim=-1).values


def complement(chosen: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The indices of ``range(num_tokens)`` not in ``chosen``, ascending (no host sync).

    ``chosen``: ``[B, k]`` distinct indices → ``[B, num_tokens - k]``.
    """
    batch = chosen.shape[0]
    taken = torch.zeros(batch, num_tokens, dtype=torch.int8, device=chosen.device)
    taken.scatter_(1, chosen, 1)
    # a stable sort of the 0/1 flags puts the untaken indices first, in ascending order
    order = torch.sort(taken, dim=-1, stable=True).indices
    return order[:, : num_tokens - chosen.shape[1]]


def visionzip_plan(scores: torch.Tensor, keys: torch.Tensor, num_dominant: int, num_contextual: int) -> VisionZipPlan:
    """Dominant selection, stride targets and key-similarity assignment (card §2.2 steps 1-4).

    scores ``[B, N]`` (encoder attention of each content token), keys ``[B, N, d_k]`` (head-mean keys);
    ``num_dominant``: ``D'`` content tokens (the CLS, if emitted, is not counted here); ``num_contextual``: ``C``.
    """
    if scores.dim() != 2 or keys.dim() != 3 or keys.shape[:2] != scores.shape:
        raise ValueError(f"visionzip_plan expects scores [B, N] and keys [B, N, d], got {tuple(scores.shape)} "
                         f"and {tuple(keys.shape)}")
    batch, num_tokens = scores.shape
    device = scores.device
    dominant = topk_stable(scores, min(max(num_dominant, 0), num_tokens))  # [B, D']
    remaining = complement(dominant, num_tokens)  # [B, n]
    n = remaining.shape[1]
    contextual = min(max(num_contextual, 0), n)
    if contextual == 0:
        empty = remaining[:, :0]
        return VisionZipPlan(dominant, remaining, empty, torch.full_like(remaining, -1),
                             torch.zeros_like(remaining, dtype=torch.bool))
    step = max(1, n // contextual)
    target_positions = torch.arange(0, contextual * step, step, device=device)  # [C] positions within R
    targets = remaining[:, target_positions]  # [B, C]
    unit = unit_rows(keys.gather(1, remaining[..., None].expand(-1, -1, keys.shape[-1])), torch.float32)  # [B, n, d_k]
    similarity = unit @ unit[:, target_positions].transpose(1, 2)  # [B, n, C]
    slot = similarity.argmax(dim=-1)  # [B, n]: first target on ties
    is_target = torch.zeros(batch, n, dtype=torch.bool, device=device)
    is_target[:, target_positions] = True
    slot[:, target_positions] = torch.arange(contextual, device=device)  # a target owns its own slot
    return VisionZipPlan(dominant, remaining, targets, slot, is_target)


def visionzip_merge(values: torch.Tensor, plan: VisionZipPlan, merge: str = "official") -> torch.Tensor:
    """The contextual tokens (card §2.2 step 5), computed in float32 or wider, returned in ``values``' dtype.

    values ``[B, N, d]`` (content rows; LLaVA: pre-projector features, Qwen: LLM embeddings) → ``[B, C, d]``.
    official: ``V[target] + sum(V[members]) / max(1, members)``;
    mean: ``(V[target] + sum(V[members])) / (1 + members)``.
    """
    check_choice("visionzip", "merge", merge, MERGES)
    batch, _, dim = values.shape
    contextual = plan.num_contextual
    if contextual == 0:
        return values[:, :0]
    dtype = torch.promote_types(values.dtype, torch.float32)
    remaining = values.gather(1, plan.remaining[..., None].expand(-1, -1, dim)).to(dtype)  # [B, n, d]
    member = (~plan.is_target).float()[..., None]  # [B, n, 1]
    sums = remaining.new_zeros(batch, contextual, dim).scatter_add_(1, plan.slot[..., None].expand(-1, -1, dim),
                                                                      remaining * member)  # [B, C, d]
    counts = member.new_zeros(batch, contextual, 1).scatter_add_(1, plan.slot[..., None], member)  # [B, C, 1]
    target = values.gather(1, plan.targets[..., None].expand(-1, -1, dim)).to(dtype)  # [B, C, d]
    if merge == "official":
        merged = target + sums / counts.clamp(min=1)
    else:
        merged = (target + sums) / (1 + counts)
    return merged.to(values.dtype)


def visionzip_weights(plan: VisionZipPlan, num_tokens: int, merge: str = "official") -> torch.Tensor:
    """The merge as weights over the content tokens: ``[B, C, N]`` float32 with ``ctx = weights @ V``.

    official: 1 on the target, ``1 / members`` on each member (rows sum to 2 when the target has members);
    mean: ``1 / (1 + members)`` on the target and each member. For inputs that must follow the merged rows
    (side inputs merged with the same weights) and for reporting; ``visionzip_merge`` applies the same merge.
    """
    check_choice("visionzip", "merge", merge, MERGES)
    batch, contextual = plan.targets.shape
    weights = torch.zeros(batch, contextual, num_tokens, device=plan.targets.device)
    if contextual == 0:
        return weights
    member = (~plan.is_target).float()  # [B, n]
    counts = torch.zeros(batch, contextual, device=weights.device).scatter_add_(1, plan.slot, member)  # [B, C]
    member_weight = 1 / counts.clamp(min=1) if merge == "official" else 1 / (1 + counts)  # [B, C]
    target_weight = torch.ones_like(counts) if merge == "official" else member_weight
    slots = torch.arange(contextual, device=weights.device).expand(batch, -1)
    # members: weights[b, slot[b, i], remaining[b, i]] = member_weight[b, slot[b, i]] for non-targets
    flat = weights.view(batch, -1)
    member_index = plan.slot * num_tokens + plan.remaining  # [B, n]
    flat.scatter_add_(1, member_index, member_weight.gather(1, plan.slot) * member)
    flat.scatter_(1, slots * num_tokens + plan.targets, target_weight)
    return weights


@dataclass
class VisionZip(Method):
    """Per visual group keep ``dominant`` tokens (CLS included on CLS encoders) and ``contextual`` merged ones.

    Counts, first that applies: ``budget`` (tokens per group, split 10/64 contextual as the paper's LLaVA
    settings; a budget keeping all N tokens is the identity), else ``dominant_ratio`` / ``contextual_ratio``
    (``D = int(r_d M)``, ``C = max(int(r_c M), 1)``, the official Qwen2.5-VL port: 0.65 / 0.05), else
    ``dominant`` / ``contextual`` (official LLaVA: 54 + 10, 108 + 20, 162 + 30).
    """

    dominant: int = 54
    contextual: int = 10
    dominant_ratio: float | None = None
    contextual_ratio: float | None = None
    budget: int | float | None = None
    include_cls: bool = True
    merge: str = "official"
    positions: str = "auto"

    name = "visionzip"

    def __post_init__(self):
        for field_name, minimum in (("dominant", 0), ("contextual", 0)):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{self.name}.{field_name} must be an integer >= {minimum}, got {value!r}")
        if (self.dominant_ratio is None) != (self.contextual_ratio is None):
            raise ValueError(f"{self.name}: set dominant_ratio and contextual_ratio together (got dominant_ratio="
                             f"{self.dominant_ratio!r}, contextual_ratio={self.contextual_ratio!r})")
        if self.dominant_ratio is not None:
            check_ratio(self.name, "dominant_ratio", self.dominant_ratio)
            check_ratio(self.name, "contextual_ratio", self.contextual_ratio)
            if self.budget is not None:
                raise ValueError(f"{self.name}: give budget or dominant_ratio/contextual_ratio, not both "
                                 f"(got budget={self.budget!r}, dominant_ratio={self.dominant_ratio!r})")
        check_budget(self.name, "budget", self.budget, allow_none=True)
        if not isinstance(self.include_cls, bool):
            raise ValueError(f"{self.name}.include_cls must be true or false, got {self.include_cls!r}")
        check_choice(self.name, "merge", self.merge, MERGES)
        check_positions(self.name, self.positions)

    def counts(self, num_tokens: int, has_cls: bool) -> tuple[bool, int, int]:
        """``(emit_cls, D', C)`` for a group of ``num_tokens`` content tokens (``D'``: dominant content tokens).

        A group whose budget keeps all its tokens gives ``(False, num_tokens, 0)``: the identity.
        """
        emit_cls = has_cls and self.include_cls
        if self.budget is not None:
            total = budget_count(self.budget, num_tokens)
            if total >= num_tokens:
                return False, num_tokens, 0
            contextual = round(total * CONTEXTUAL_SHARE)
            dominant = total - contextual
        elif self.dominant_ratio is not None:
            dominant = int(self.dominant_ratio * num_tokens)
            contextual = max(int(self.contextual_ratio * num_tokens), 1)
        else:
            dominant, contextual = self.dominant, self.contextual
        if emit_cls and dominant == 0:
            emit_cls = False  # no room for the CLS: D counts it
        content = min(num_tokens, dominant - int(emit_cls))
        return emit_cls, content, min(contextual, num_tokens - content)
