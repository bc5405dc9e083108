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


class CosineDistanceRows:
    """``D = 1 - X̂ X̂ᵀ`` without the ``N x N`` matrix: rows on demand (``rows``) and every token's nearest-neighbour
    distance (``nearest``), computed in tiles of at most ``block_bytes`` (default: the size of the features).

    ``nearest`` computes each pair's distance once (tile ``(i, j)`` with ``i <= j`` serves the rows of both blocks),
    so it is exactly symmetric: mutually nearest tokens tie exactly and the lower index wins (card §2, step 3).
    Values equal ``cosine_distances`` up to float rounding (another summation blocking)."""

    def __init__(self, features: torch.Tensor, dtype: torch.dtype = torch.float32, block_bytes: int | None = None):
        self.unit = unit_rows(features, dtype)  # [B, N, d]
        batch, num_tokens, _ = self.unit.shape
        budget = block_bytes or features.numel() * features.element_size()
        self.block_rows = max(1, int((budget // max(1, 2 * batch * self.unit.element_size())) ** 0.5))
        self.device = self.unit.device

    @property
    def shape(self) -> tuple[int, int, int]:
        batch, num_tokens, _ = self.unit.shape
        return batch, num_tokens, num_tokens

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """``D[b, index[b]]``: ``index`` ``[B, r]`` → ``[B, r, N]``."""
        chosen = self.unit.gather(1, index[..., None].expand(-1, -1, self.unit.shape[-1]))  # [B, r, d]
        return 1 - chosen @ self.unit.transpose(1, 2)

    def nearest(self) -> torch.Tensor:
        """``[B, N]``: each token's 2nd-smallest distance (its own included): the distance to its nearest neighbour."""
        batch, num_tokens, _ = self.shape
        two = torch.full((batch, num_tokens, 2), float("inf"), dtype=self.unit.dtype, device=self.unit.device)
        step = self.block_rows
        for i in range(0, num_tokens, step):
            for j in range(i, num_tokens, step):
                tile = 1 - self.unit[:, i:i + step] @ self.unit[:, j:j + step].transpose(1, 2)  # [B, bi, bj]
                served = [(slice(i, i + step), tile)]
                if j != i:  # an off-diagonal tile also serves block j's rows (a diagonal one serves its rows once)
                    served.append((slice(j, j + step), tile.transpose(1, 2)))
                for rows, values in served:
                    merged = torch.cat([two[:, rows], values], dim=-1)
                    two[:, rows] = merged.topk(2, dim=-1, largest=False).values
        return two[..., 1]


class FullDistanceRows:
    """``CosineDistanceRows``' interface over a given ``[B, N, N]`` symmetric distance matrix."""

    def __init__(self, distances: torch.Tensor):
        self.distances = distances
        self.shape, self.device = distances.shape, distances.device

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.distances.gather(1, index[..., None].expand(-1, -1, self.shape[-1]))

    def nearest(self) -> torch.Tensor:
        return self.distances.topk(2, dim=1, largest=False).values[:, 1]  # 2nd smallest of each column


def divprune_select(distances: torch.Tensor | CosineDistanceRows, count: int) -> torch.Tensor:
    """Greedy max-min picks ``[B, count]`` in pick order (sort them for the kept rows).

    ``distances``: ``[B, N, N]`` symmetric (``cosine_distances``), or rows on demand (``CosineDistanceRows``: the
    same distances without the ``N x N`` matrix); ``count`` is clamped to ``[0, N]``. Ties: the lowest index. The
    loop runs ``count`` tensor steps (no host sync).
    """
    source = FullDistanceRows(distances) if isinstance(distances, torch.Tensor) else distances
    batch, num_tokens, _ = source.shape
    device = source.device
    count = max(0, min(count, num_tokens))
    picks = torch.zeros(batch, count, dtype=torch.long, device=device)
    if count == 0 or num_tokens == 1:
        return picks
    rows = torch.arange(batch, device=device)
    # the most isolated token: the largest nearest-neighbour distance (2nd smallest of its column, diagonal included)
    picks[:, 0] = source.nearest().argmax(dim=-1)
    closest = source.rows(picks[:, :1])[:, 0].clone()  # [B, N]: distance of every token to the kept set
    closest[rows, picks[:, 0]] = float("-inf")
    for i in range(1, count):
        picks[:, i] = closest.argmax(dim=-1)  # first index on ties
        closest = torch.minimum(closest, source.rows(picks[:, i:i + 1])[:, 0])
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
        picks = divprune_select(CosineDistanceRows(features, dtype), count)  # never the N x N matrix
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
