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

Counts (per visual group), first that applies: ``budget`` (tokens for the whole sample, split over its groups in
proportion to their sizes (``_budget.py``); a group's share T is split 10/64 contextual as in the paper's LLaVA
settings, 64 → 54 + 10; a share keeping all N tokens leaves the group as it is), ``dominant_ratio`` /
``contextual_ratio`` (``D = int(r_d M)``, ``C = max(int(r_c M), 1)``: the official Qwen2.5-VL port), ``dominant`` /
``contextual`` (official LLaVA: 54 + 10, 108 + 20, 162 + 30). With none of them set, the official values of the
encoder: 54 + 10 on an encoder with a CLS token (LLaVA), ratios 0.65 / 0.05 on one without (Qwen).

Emitted rows (``before_llm``, a ``Reduction`` with merged rows): on an encoder that emits pre-projector features
(LLaVA) the image span becomes ``[CLS, dominant ascending, ctx_0..ctx_{C-1}]`` (official order), the CLS and the
contextual tokens given **by value** (``projector(F_cls)``, ``projector(ctx_j)``: the projector is nonlinear);
otherwise (Qwen) the kept rows are ``dominant ∪ targets`` in original order with each target's row replaced by
``ctx_j`` as a **weighted sum** of the LLM embeddings (side inputs such as DeepStack features merge with the same
weights). A contextual token sits at its target's position, the CLS at the image's first row's; positions follow
``positions`` (official: re-packed on 1-D RoPE, original on mRoPE). Layout entries of a merged row: its first
member's kind / group / original row (the CLS's members are the whole image, so its cell is -1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._budget import check_budget
from .base import (DecoderInput, MergedRows, Method, ModelInfo, Reduction, check_choice, check_positions, check_ratio,
                   register, resolve_positions)
from .common import complete_group_rows, group_shares, keep_visual_rows, unit_rows

MERGES = ("official", "mean")
# tokenprune's split of a ``budget`` into dominant + contextual: the paper's LLaVA settings (54 + 10, 108 + 20,
# 162 + 30) all give the contextual tokens 10/64 of the total.
CONTEXTUAL_SHARE = 10 / 64
OFFICIAL_COUNTS = (54, 10)  # README: visionzip(model, dominant=54, contextual=10) (CLS encoders)
OFFICIAL_RATIOS = (0.65, 0.05)  # the official Qwen2.5-VL port (Q L1916-L1917) (encoders without a CLS token)
OFFICIAL_POSITIONS = "reindex"  # card §4: LLaVA re-packs positions to arange(L') (A L232, L241)


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


@register("visionzip")
@dataclass
class VisionZip(Method):
    """Per visual group keep the dominant tokens (CLS included on CLS encoders) and merge the rest into contextual
    tokens (counts: see the module docstring; all unset = the encoder's official values)."""

    dominant: int | None = None
    contextual: int | None = None
    dominant_ratio: float | None = None
    contextual_ratio: float | None = None
    budget: int | float | None = None
    include_cls: bool = True
    merge: str = "official"
    positions: str = "auto"

    needs_vision_signals = True

    def __post_init__(self):
        for field_name in ("dominant", "contextual"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{self.name}.{field_name} must be an integer >= 0 or null, got {value!r}")
        for first, second in (("dominant", "contextual"), ("dominant_ratio", "contextual_ratio")):
            if (getattr(self, first) is None) != (getattr(self, second) is None):
                raise ValueError(f"{self.name}: set {first} and {second} together (got {first}="
                                 f"{getattr(self, first)!r}, {second}={getattr(self, second)!r})")
        if self.dominant_ratio is not None:
            check_ratio(self.name, "dominant_ratio", self.dominant_ratio)
            check_ratio(self.name, "contextual_ratio", self.contextual_ratio)
        check_budget(self.name, self.budget, allow_none=True)
        given = [name for name in ("budget", "dominant", "dominant_ratio") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{self.name}: give one of budget, dominant/contextual or dominant_ratio/contextual_ratio "
                             f"(got {', '.join(f'{name}={getattr(self, name)!r}' for name in given)})")
        if not isinstance(self.include_cls, bool):
            raise ValueError(f"{self.name}.include_cls must be true or false, got {self.include_cls!r}")
        check_choice(self.name, "merge", self.merge, MERGES)
        check_positions(self.name, self.positions)

    def validate(self, model: ModelInfo) -> None:
        resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, model)

    def counts(self, num_tokens: int, has_cls: bool, share: int | None = None) -> tuple[bool, int, int]:
        """``(emit_cls, D', C)`` for a group of ``num_tokens`` content tokens (``D'``: dominant content tokens);
        ``share``: the group's part of the sample's ``budget`` (budget only).

        A budget share keeping all its tokens gives ``(False, num_tokens, 0)``: the identity.
        """
        emit_cls = has_cls and self.include_cls
        ratios = self.dominant_ratio, self.contextual_ratio
        if self.budget is not None:
            if share is None:
                raise ValueError(f"{self.name}.counts needs the group's share of the budget")
            if share >= num_tokens:
                return False, num_tokens, 0
            contextual = round(share * CONTEXTUAL_SHARE)
            dominant = share - contextual
        elif self.dominant is not None or (ratios[0] is None and has_cls):
            dominant, contextual = (self.dominant, self.contextual) if self.dominant is not None else OFFICIAL_COUNTS
        else:
            ratio_d, ratio_c = ratios if ratios[0] is not None else OFFICIAL_RATIOS
            dominant = int(ratio_d * num_tokens)
            contextual = max(int(ratio_c * num_tokens), 1)
        if emit_cls and dominant == 0:
            emit_cls = False  # no room for the CLS: D counts it
        content = min(num_tokens, dominant - int(emit_cls))
        if content >= num_tokens:
            return False, num_tokens, 0  # counts that keep every token leave the group as it is
        return emit_cls, content, min(contextual, num_tokens - content)

    def before_llm(self, seq: DecoderInput) -> Reduction | None:
        layout, vision = seq.layout, seq.vision
        rows = complete_group_rows(layout, self.name)
        shares = group_shares(self.budget, layout, rows) if self.budget is not None else [None] * len(rows)
        positions = seq.positions[0]  # [P, L]
        kept, parts = [], []
        for g, (group_rows, share) in enumerate(zip(rows, shares)):
            num_tokens = group_rows.numel()
            emit_cls, dominant, contextual = self.counts(num_tokens, vision.has_cls, share)
            if not emit_cls and contextual == 0 and dominant >= num_tokens:
                kept.append(group_rows)
                continue
            signals = vision.group(g)
            plan = visionzip_plan(signals.scores[None], signals.keys[None], dominant, contextual)
            kept.append(group_rows[plan.dominant[0]])
            parts.append(self.merged_rows(seq, group_rows, signals, plan, emit_cls, positions))
        reindex = resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, seq.model) == "reindex"
        return keep_visual_rows(seq, kept, reindex, concat_merged(parts))

    def merged_rows(self, seq: DecoderInput, rows: torch.Tensor, signals, plan: VisionZipPlan, emit_cls: bool,
                    positions: torch.Tensor) -> MergedRows | None:
        """One group's CLS and contextual rows (``rows``: the group's rows, ``positions`` ``[P, L]``): by value
        through the projector where the encoder emits pre-projector features, else as weighted sums of the group's
        rows of ``seq.embeds``. A contextual row sits at its target's position, the CLS at the group's first row's."""
        weights = visionzip_weights(plan, rows.numel(), self.merge)[0]  # [C, N]
        slot, member = weights.nonzero(as_tuple=True)  # [E]: members of each contextual row, its target included
        targets = rows[plan.targets[0]]  # [C]
        by_value = signals.features is not None
        merged = MergedRows(
            sources=rows[member], into=slot, weights=weights[slot, member],
            # official LLaVA order [CLS, dominant, ctx]: after the group's last row; official Qwen: in the target's row
            anchor=torch.full_like(targets, int(rows[-1]) + 1) if by_value else targets,
            values=visionzip_merge(signals.features[None], plan, self.merge)[0] if by_value else None,  # [C, D]
            positions=positions[:, targets])
        if emit_cls:  # by value (CLS encoders emit features); members: the whole group (layout: first row, cell -1)
            cls = MergedRows(sources=rows, into=torch.zeros_like(rows),
                             weights=torch.full((rows.numel(),), 1 / rows.numel(), device=rows.device),
                             anchor=rows[:1], values=signals.cls_feature[None], positions=positions[:, rows[:1]])
            merged = concat_merged([cls, merged])
        if merged.count == 0:
            return None
        if by_value:
            merged.values = seq.vision.project(merged.values)  # [M, d]: the projector is nonlinear
        return merged


def concat_merged(parts: list[MergedRows | None]) -> MergedRows | None:
    """The merged rows of several groups as one ``MergedRows`` (row numbers offset group by group)."""
    parts = [part for part in parts if part is not None]
    if not parts:
        return None
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += part.count
    values = None if parts[0].values is None else torch.cat([part.values for part in parts])
    return MergedRows(sources=torch.cat([part.sources for part in parts]),
                      into=torch.cat([part.into + offset for part, offset in zip(parts, offsets)]),
                      weights=torch.cat([part.weights for part in parts]),
                      anchor=torch.cat([part.anchor for part in parts]), values=values,
                      positions=torch.cat([part.positions for part in parts], dim=1))
