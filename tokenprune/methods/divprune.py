"""DivPrune (Alvar et al., CVPR 2025): keep a max-min diverse subset of the visual tokens, before the LLM.

Card: ``shared/methods/divprune.md``. Pruning as a Max-Min Diversity Problem, solved greedily (farthest point /
Gonzalez) on the cosine distance ``D = 1 - cos(X, X)`` of the visual rows the decoder would read (the projected
embeddings): the first token is the most isolated one (largest distance to its nearest neighbour, taken as the
second-smallest entry of its column of ``D``, diagonal included), each next one maximises the minimum distance
to the tokens already kept (first index on ties). The kept rows keep their original order.

Deviations from the official code, both in degenerate cases only (card §2): kept tokens are masked, so an index
is never picked twice (officially a kept token scores ``D[s, s]``, about 0); a zero row has distance 1 to every
row instead of NaN. ``sim_dtype="float32"`` (default) computes ``D`` in float32; ``"model"`` in the features'
dtype, as the official fp16 code.

Budget (``_budget.py``): ``budget`` tokens for the whole sample (an int; a float: that fraction of its visual
tokens, ``round`` as the official ``int(round(r * N))``). ``scope="sample"``: one pool of every visual row of the
sample (the official single pool, generalised to several images / frames); ``"group"``: one pool per image /
temporal group, the count split in proportion to the group sizes. Positions (``positions``): official re-packing
on 1-D RoPE (HF numbering from the gathered mask), original positions on mRoPE (both Qwen ports gather them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._budget import check_budget
from .base import (DecoderInput, Method, ModelInfo, Reduction, check_choice, check_positions, register,
                   resolve_positions)
from .common import group_rows, group_shares, keep_visual_rows, sample_count, unit_rows

SCOPES = ("sample", "group")
SIM_DTYPES = ("float32", "model")
OFFICIAL_POSITIONS = "reindex"  # card §4: position_ids None, HF numbers the L' rows 0..L'-1


def cosine_distances(features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``D = 1 - X̂ X̂ᵀ`` in ``dtype``, exactly symmetric. ``features``: ``[B, N, d]`` → ``[B, N, N]``."""
    unit = unit_rows(features, dtype)
    gram = unit @ unit.transpose(1, 2)
    gram = (gram + gram.transpose(1, 2)) / 2  # a + b == b + a: exactly symmetric, the diagonal unchanged
    return 1 - gram


def divprune_select(distances: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min picks ``[B, count]`` in pick order (sort them for the kept rows).

    ``distances``: ``[B, N, N]`` symmetric (``cosine_distances``); ``count`` is clamped to ``[0, N]``.
    Ties: the lowest index. The loop runs ``count`` tensor steps (no host sync).
    """
    batch, num_tokens, _ = distances.shape
    count = max(0, min(count, num_tokens))
    picks = torch.zeros(batch, count, dtype=torch.long, device=distances.device)
    if count == 0:
        return picks
    rows = torch.arange(batch, device=distances.device)
    if num_tokens == 1:
        return picks
    # the most isolated token: the largest nearest-neighbour distance (2nd smallest of its column, diagonal included)
    nearest = distances.topk(2, dim=1, largest=False).values[:, 1]  # [B, N]
    picks[:, 0] = nearest.argmax(dim=-1)
    closest = distances[rows, picks[:, 0]].clone()  # [B, N]: distance of every token to the kept set
    closest[rows, picks[:, 0]] = float("-inf")
    for i in range(1, count):
        picks[:, i] = closest.argmax(dim=-1)  # first index on ties
        closest = torch.minimum(closest, distances[rows, picks[:, i]])
        closest[rows, picks[:, i]] = float("-inf")
    return picks


@register("divprune")
@dataclass
class DivPrune(Method):
    """Keep ``budget`` visual tokens of the sample by greedy max-min cosine diversity of the LLM embeddings
    (official: 0.098 of the tokens). ``scope="sample"``: one pool of every visual row; ``"group"``: one pool per
    image / temporal group (count split by group size)."""

    budget: int | float = 0.098
    scope: str = "sample"
    sim_dtype: str = "float32"
    positions: str = "auto"

    def __post_init__(self):
        check_budget(self.name, self.budget, allow_none=False)
        check_choice(self.name, "scope", self.scope, SCOPES)
        check_choice(self.name, "sim_dtype", self.sim_dtype, SIM_DTYPES)
        check_positions(self.name, self.positions)

    def validate(self, model: ModelInfo) -> None:
        resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, model)

    def keep_rows(self, features: torch.Tensor, count: int) -> torch.Tensor:
        """Kept rows ``[B, count]`` (ascending) of ``B`` pools of ``N`` tokens: ``features`` ``[B, N, d]``."""
        dtype = torch.float32 if self.sim_dtype == "float32" else features.dtype
        picks = divprune_select(cosine_distances(features, dtype), count)
        return torch.sort(picks, dim=-1).values

    def before_llm(self, seq: DecoderInput) -> Reduction | None:
        layout = seq.layout
        if self.scope == "sample":
            pools, counts = [layout.visual_rows()], [sample_count(self.budget, layout)]
        else:
            pools = [rows for rows in group_rows(layout) if rows.numel()]
            counts = group_shares(self.budget, layout, pools)
        kept = [rows if count >= rows.numel() else rows[self.keep_rows(seq.embeds[:, rows], count)[0]]
                for rows, count in zip(pools, counts)]
        reindex = resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, seq.model) == "reindex"
        return keep_visual_rows(seq, kept, reindex)
