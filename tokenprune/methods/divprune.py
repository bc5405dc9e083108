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

Phase 1 (issue 18): the pure algorithm and the config; registered once the engine's reduction result lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, check_choice
from .common import budget_count, check_budget, check_positions, unit_rows

SCOPES = ("sample", "group")
SIM_DTYPES = ("float32", "model")


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


@dataclass
class DivPrune(Method):
    """Keep ``budget`` tokens of each pool by greedy max-min cosine diversity (official: 0.098 of the tokens).

    ``scope="sample"``: every visual row of the sample is one pool (the official single pool, generalised);
    ``"group"``: one pool per image / temporal group.
    """

    budget: int | float = 0.098
    scope: str = "sample"
    sim_dtype: str = "float32"
    positions: str = "auto"

    name = "divprune"

    def __post_init__(self):
        check_budget(self.name, "budget", self.budget)
        check_choice(self.name, "scope", self.scope, SCOPES)
        check_choice(self.name, "sim_dtype", self.sim_dtype, SIM_DTYPES)
        check_positions(self.name, self.positions)

    def kept_count(self, num_tokens: int) -> int:
        return budget_count(self.budget, num_tokens)

    def keep_rows(self, features: torch.Tensor) -> torch.Tensor:
        """Kept rows ``[B, k]`` (ascending) of ``B`` pools of ``N`` tokens: ``features`` ``[B, N, d]``."""
        dtype = torch.float32 if self.sim_dtype == "float32" else features.dtype
        picks = divprune_select(cosine_distances(features, dtype), self.kept_count(features.shape[1]))
        return torch.sort(picks, dim=-1).values
