"""VisPruner (Zhang et al., ICCV 2025): keep the important tokens and a diverse set of the rest, before the LLM.

Card: ``shared/methods/vispruner.md``. Training-free, text-agnostic, pure selection. Per visual group of ``N``
tokens and a budget ``T``:

1. ``T_imp = int(T * important_ratio)`` **important** tokens: the highest encoder attention ``a`` (CLS attention of
   CLIP's penultimate layer on LLaVA; received attention of the last ViT block on Qwen2.5-VL, see
   ``models/vision_signals.py``); ties: lower index first. The residual ``Q`` keeps descending-attention order.
2. ``T_div = T - T_imp`` **diverse** tokens: while ``|Q| > T_div``, split ``Q`` by position parity into
   ``A = Q[0::2]`` and ``B = Q[1::2]``; score each ``a`` by its highest cosine to ``B`` (features ``X``: the
   pre-projector CLIP patches on LLaVA, the LLM embeddings on Qwen); drop the ``min(k, |A|)`` highest-scoring
   ``a`` with ``k = min(step, |Q| - T_div)``; ``Q <- [rest of A, descending score] ++ B``.
3. Keep ``I ∪ Q`` in ascending order.

This follows the card's pseudocode, which equals the official tensor code wherever that code runs (it raises
when ``|Q|`` is odd or ``k > |Q|/2 + 1``). ``parity="lightcompress"`` adds one important token when ``N - T_imp``
is odd (LightCompress's Qwen2.5-VL port).

Budget (``_budget.py``): ``budget`` tokens for the whole sample (an int; a float: that fraction of its visual
tokens, Python rounding), split over its images / temporal groups in proportion to their sizes; each group runs
the algorithm above with its share ``T`` (official: ``--visual_token_num`` per image, 128 / 64 / 32 of 576 on
LLaVA-1.5). Positions (``positions``): official re-packing on 1-D RoPE (LLaVA: ``position_ids`` None after the
splice), original positions on mRoPE (LightCompress's Qwen2.5-VL port gathers them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._budget import check_budget
from .base import (DecoderInput, Method, ModelInfo, Reduction, check_choice, check_positions, register,
                   resolve_positions)
from .common import complete_group_rows, group_shares, keep_visual_rows, unit_rows

PARITIES = ("general", "lightcompress")
OFFICIAL_POSITIONS = "reindex"  # card §4: LLaVA re-packs positions to arange(L') (A L368, L377)


def vispruner_counts(num_tokens: int, keep: int, important_ratio: float, parity: str = "general") -> tuple[int, int]:
    """``(T_imp, T_div)`` for a group of ``num_tokens`` and ``keep`` tokens kept (card §2.2 step 1)."""
    check_choice("vispruner", "parity", parity, PARITIES)
    keep = min(keep, num_tokens)
    important = int(keep * important_ratio)  # the official int(T * r), float product included
    if parity == "lightcompress" and (num_tokens - important) % 2 and important < keep:
        important += 1  # (LightCompress would also do so at important == keep, emitting keep + 1 tokens)
    return important, keep - important


def vispruner_select(importance: torch.Tensor, features: torch.Tensor, keep: int, important_ratio: float,
                     step: int = 8, parity: str = "general") -> torch.Tensor:
    """Kept token indices ``[B, min(keep, N)]``, ascending, for ``B`` groups of ``N`` tokens.

    importance ``[B, N]`` (encoder attention), features ``[B, N, C]`` (similarity features, cosine in float32).
    The loop runs a number of rounds fixed by ``N``, ``keep`` and ``step`` (no host sync).
    """
    if importance.dim() != 2 or features.dim() != 3 or features.shape[:2] != importance.shape:
        raise ValueError(f"vispruner_select expects importance [B, N] and features [B, N, C], got "
                         f"{tuple(importance.shape)} and {tuple(features.shape)}")
    batch, num_tokens = importance.shape
    num_important, num_diverse = vispruner_counts(num_tokens, keep, important_ratio, parity)
    order = torch.argsort(importance.float(), dim=-1, descending=True, stable=True)  # [B, N]
    important, residual = order[:, :num_important], order[:, num_important:]  # [B, T_imp], [B, R]
    unit = unit_rows(features, torch.float32)  # [B, N, C]
    while num_diverse > 0 and residual.shape[1] > num_diverse:
        removals = min(step, residual.shape[1] - num_diverse)
        side_a, side_b = residual[:, 0::2], residual[:, 1::2]  # [B, |A|], [B, |B|]
        unit_a = unit.gather(1, side_a[..., None].expand(-1, -1, unit.shape[-1]))  # [B, |A|, C]
        unit_b = unit.gather(1, side_b[..., None].expand(-1, -1, unit.shape[-1]))  # [B, |B|, C]
        duplication = (unit_a @ unit_b.transpose(1, 2)).amax(dim=-1)  # [B, |A|]
        ranked = torch.argsort(duplication, dim=-1, descending=True, stable=True)  # [B, |A|]
        side_a = side_a.gather(1, ranked)[:, min(removals, side_a.shape[1]):]
        residual = torch.cat([side_a, side_b], dim=1)
    kept = torch.cat([important, residual], dim=1) if num_diverse > 0 else important
    return torch.sort(kept, dim=-1).values


@register("vispruner")
@dataclass
class VisPruner(Method):
    """Keep ``budget`` visual tokens (per sample, split over its groups): per group ``int(T * important_ratio)`` by
    encoder attention, the rest by iterative de-duplication of the residual. Official: ``--visual_token_num`` 128 /
    64 / 32, ``--important_ratio`` 0.5; LightCompress's ``prune_ratio`` p is ``budget = 1 - p`` as a fraction.
    Similarity features: the pre-projector CLIP patches where the encoder emits them (LLaVA), else the LLM
    embeddings (Qwen)."""

    budget: int | float = 64
    important_ratio: float = 0.5
    step: int = 8
    parity: str = "general"
    positions: str = "auto"

    needs_vision_signals = True

    def __post_init__(self):
        check_budget(self.name, self.budget, allow_none=False)
        if isinstance(self.important_ratio, bool) or not isinstance(self.important_ratio, (int, float)) \
                or not 0 <= self.important_ratio <= 1:
            raise ValueError(f"{self.name}.important_ratio must be a number in [0, 1], got {self.important_ratio!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"{self.name}.step must be an integer >= 1, got {self.step!r}")
        check_choice(self.name, "parity", self.parity, PARITIES)
        check_positions(self.name, self.positions)

    def validate(self, model: ModelInfo) -> None:
        resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, model)

    def before_llm(self, seq: DecoderInput) -> Reduction | None:
        layout = seq.layout
        rows = complete_group_rows(layout, self.name)
        kept = []
        for g, (group_rows, count) in enumerate(zip(rows, group_shares(self.budget, layout, rows))):
            if count >= group_rows.numel():
                kept.append(group_rows)
                continue
            signals = seq.vision.group(g)
            features = signals.features if signals.features is not None else seq.embeds[0, group_rows]  # [N, C]
            keep = vispruner_select(signals.scores[None], features[None], count, self.important_ratio, self.step,
                                    self.parity)[0]  # [T] ascending
            kept.append(group_rows[keep])
        reindex = resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, seq.model) == "reindex"
        return keep_visual_rows(seq, kept, reindex)
