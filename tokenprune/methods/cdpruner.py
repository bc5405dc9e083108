"""CDPruner (Zhang et al., NeurIPS 2025): keep the tokens of a conditional DPP's greedy MAP, before the LLM.

Card: ``shared/methods/cdpruner.md``. Per visual group the kernel is ``L = diag(r) S diag(r)``: ``S`` the cosine
similarity of the projected visual tokens (rows normalised in their dtype, then float32), ``r`` the instruction
relevance min-max normalised over every token of the image / video (``(r' - min + 1e-6) / (max - min)``). Greedy
MAP inference (Chen et al. 2018): ``T`` times pick ``j = argmax d`` (first index on ties), where ``d_j`` is the
Schur complement ``L_jj - L_jS L_SS⁻¹ L_Sj`` kept up to date by rank-one updates, so each pick maximises
``det L_{S ∪ {j}}``. Kept rows: the picks, ascending.

Relevance: ``clip`` (official, LLaVA): ``r' = mean_m(-cos(E_img, E_txt))`` from CLIP's image projection of the
penultimate patches and the CLIP text tower on the raw question cut into 77-token chunks; ``llm``: the cosine
between the visual rows and the instruction rows' LLM input embeddings (sign +1 by default: the paper's meaning,
unverified); ``none``: ``r = 1`` (the unconditional DPP).

Numerical guard (card §4): once the chosen ``d_j`` is not a positive finite number (officially a NaN and repeated
picks), the DPP stops and the remaining picks are the highest-``r`` unpicked tokens (lower index on ties); the
number of such picks is returned. A constant ``r'`` (zero range, officially a division by zero) gives ``r = 1``.

Phase 1 (issue 18): the pure algorithm, the CLIP text helpers and the config; registered once the engine's
reduction result lands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Method, check_choice
from .common import budget_count, check_budget, check_positions, unit_rows

RELEVANCES = ("auto", "clip", "llm", "none")
TEXT_ROWS = ("after_visual", "all")
RELEVANCE_EPSILON = 1e-6  # official: added to the numerator of the min-max only
CLIP_TEXT_POSITIONS = 77


def cdpruner_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor, sign: float = -1.0,
                       theta: float | None = None) -> torch.Tensor:
    """Relevance ``r`` ``[B, N]`` of ``B`` groups of one image / video (min-max over all ``B * N`` tokens).

    image_embeds ``[B, N, C]``, text_embeds ``[M, C]``; ``r' = mean_m(sign * cos)``, float32. ``theta`` in (0, 1)
    applies the paper's ``exp(theta / (2 (1 - theta)) * r)`` (commented out officially).
    """
    cosine = unit_rows(image_embeds, torch.float32) @ unit_rows(text_embeds, torch.float32).T  # [B, N, M]
    raw = (sign * cosine).mean(dim=-1)  # [B, N]
    low, high = raw.min(), raw.max()
    span = high - low
    relevance = torch.where(span > 0, (raw - low + RELEVANCE_EPSILON) / span.clamp_min(torch.finfo(span.dtype).tiny),
                            torch.ones_like(raw))
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor | None) -> torch.Tensor:
    """``L = diag(r) S diag(r)`` ``[B, N, N]`` float32; ``S`` the cosine of ``features`` ``[B, N, d]``, normalised in
    their own dtype, then float32 (as the official code); ``relevance`` ``[B, N]`` or None (``r = 1``)."""
    unit = unit_rows(features).float()
    similarity = unit @ unit.transpose(1, 2)  # [B, N, N]
    if relevance is None:
        return similarity
    relevance = relevance.float()
    return relevance[:, :, None] * similarity * relevance[:, None, :]


@dataclass
class DPPResult:
    """picks ``[B, T]`` in pick order; gains ``[B, T]``: ``d_j`` of each pick (the Schur complement, so that
    ``det L_S = prod(gains)``; NaN for guard picks); guarded ``[B]``: picks made by the numerical guard."""

    picks: torch.Tensor
    gains: torch.Tensor
    guarded: torch.Tensor


def dpp_greedy_map(kernel: torch.Tensor, count: int, fallback_order: torch.Tensor | None = None) -> DPPResult:
    """Greedy MAP of a DPP with kernel ``[B, N, N]``, computed in the kernel's dtype (no host sync).

    At step ``i``: ``j = argmax d``; ``e = (L[j] - Σ_{t<i} c_t[j] c_t) / sqrt(d_j)``; ``c_i = e``; ``d -= e²``;
    ``d_j = -inf``. Once ``d_j`` is not a positive finite number the remaining picks follow ``fallback_order``
    scores (``[B, N]``, highest first, lower index on ties; default: the kernel's diagonal).
    """
    batch, num_tokens, _ = kernel.shape
    count = max(0, min(count, num_tokens))
    device = kernel.device
    rows = torch.arange(batch, device=device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [B, N]: d, the Schur complements
    basis = kernel.new_zeros(count, batch, num_tokens)  # [T, B, N]: the c_t
    fallback = (torch.diagonal(kernel, dim1=1, dim2=2) if fallback_order is None else fallback_order).float().clone()
    picked = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    guarded = torch.zeros(batch, dtype=torch.long, device=device)
    picks = torch.zeros(batch, count, dtype=torch.long, device=device)
    chosen_gains = kernel.new_full((batch, count), float("nan"))
    for i in range(count):
        best = gains.argmax(dim=-1)  # [B]
        best_gain = gains[rows, best]
        stopped = stopped | ~(best_gain > 0) | ~torch.isfinite(best_gain)
        backup = fallback.masked_fill(picked, float("-inf")).argmax(dim=-1)
        pick = torch.where(stopped, backup, best)
        picks[:, i] = pick
        chosen_gains[:, i] = best_gain.masked_fill(stopped, float("nan"))
        guarded += stopped.long()
        # rank-one update of the Schur complements (a no-op on stopped groups)
        projection = torch.einsum("tb,tbn->bn", basis[:i, rows, best], basis[:i])  # [B, N]
        update = (kernel[rows, best] - projection) / torch.where(stopped, 1.0, best_gain).sqrt()[:, None]  # [B, N]
        update = update.masked_fill(stopped[:, None], 0.0)
        basis[i] = update
        gains = gains - update.square()
        gains[rows, pick] = float("-inf")
        picked[rows, pick] = True
    return DPPResult(picks, chosen_gains, guarded)


def clip_text_chunks(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     positions: int = CLIP_TEXT_POSITIONS) -> dict[str, torch.Tensor]:
    """The official CLIP text input: one tokenised question ``[1, len]`` (no truncation) zero-padded to a multiple
    of ``positions`` and cut into ``M = ceil(len / positions)`` rows: ``input_ids`` / ``attention_mask``
    ``[M, positions]``."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"clip_text_chunks expects one tokenised text [1, len], got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    length = input_ids.shape[1]
    chunks = max(1, math.ceil(length / positions))
    padding = chunks * positions - length
    return {name: torch.cat([value, value.new_zeros(1, padding)], dim=1).reshape(chunks, positions)
            for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask))}


@torch.no_grad()
def clip_text_embeds(text_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``E_txt`` ``[M, C]``: ``CLIPTextModelWithProjection.text_embeds`` of each 77-token chunk of the question."""
    chunks = clip_text_chunks(input_ids, attention_mask, text_model.config.max_position_embeddings)
    device = next(text_model.parameters()).device
    return text_model(**{name: value.to(device) for name, value in chunks.items()}).text_embeds


@torch.no_grad()
def clip_image_embeds(post_layernorm, visual_projection, features: torch.Tensor) -> torch.Tensor:
    """``E_img`` ``[..., N, C]``: the penultimate CLIP patches ``features`` ``[..., N, D]`` through the tower's own
    ``post_layernorm`` (its dtype) and CLIP's ``visual_projection`` in float32 (official)."""
    normed = post_layernorm(features)
    weight = visual_projection.weight.float()
    bias = None if visual_projection.bias is None else visual_projection.bias.float()
    return torch.nn.functional.linear(normed.float(), weight, bias)


@dataclass
class CDPruner(Method):
    """Keep ``budget`` tokens per group by greedy conditional-DPP MAP (official: 128 / 64 / 32 of 576).

    ``relevance``: ``auto`` = ``clip`` when ``clip_path`` is set (official, LLaVA), else ``llm``; ``none`` is the
    unconditional DPP. ``relevance_sign``: null = -1 for ``clip`` (official), +1 for ``llm``.
    """

    budget: int | float = 0.222
    relevance: str = "auto"
    relevance_sign: float | None = None
    theta: float | None = None
    clip_path: str | None = None
    text_rows: str = "after_visual"
    positions: str = "auto"

    name = "cdpruner"

    def __post_init__(self):
        check_budget(self.name, "budget", self.budget)
        check_choice(self.name, "relevance", self.relevance, RELEVANCES)
        if self.relevance_sign is not None and (isinstance(self.relevance_sign, bool)
                                                or self.relevance_sign not in (-1, 1)):
            raise ValueError(f"{self.name}.relevance_sign must be -1, 1 or null, got {self.relevance_sign!r}")
        if self.theta is not None and (isinstance(self.theta, bool) or not isinstance(self.theta, (int, float))
                                       or not 0 < self.theta < 1):
            raise ValueError(f"{self.name}.theta must be a number in (0, 1) or null, got {self.theta!r}")
        if self.clip_path is not None and (not isinstance(self.clip_path, str) or not self.clip_path):
            raise ValueError(f"{self.name}.clip_path must be a checkpoint path / hub id or null, "
                             f"got {self.clip_path!r}")
        if self.relevance == "clip" and self.clip_path is None:
            raise ValueError(f"{self.name}.relevance=clip needs clip_path (the CLIP checkpoint with the text tower "
                             "and visual_projection, e.g. openai/clip-vit-large-patch14-336)")
        check_choice(self.name, "text_rows", self.text_rows, TEXT_ROWS)
        check_positions(self.name, self.positions)

    def resolved_relevance(self) -> str:
        if self.relevance == "auto":
            return "clip" if self.clip_path is not None else "llm"
        return self.relevance

    def resolved_sign(self) -> float:
        if self.relevance_sign is not None:
            return float(self.relevance_sign)
        return -1.0 if self.resolved_relevance() == "clip" else 1.0

    def kept_count(self, num_tokens: int) -> int:
        return budget_count(self.budget, num_tokens)

    def keep_rows(self, features: torch.Tensor, relevance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept rows ``[B, k]`` ascending and the guard counts ``[B]`` for ``B`` groups (features ``[B, N, d]``,
        relevance ``[B, N]`` or None). A budget keeping every token keeps them all without running the DPP."""
        batch, num_tokens, _ = features.shape
        count = self.kept_count(num_tokens)
        if count >= num_tokens:
            rows = torch.arange(num_tokens, device=features.device).expand(batch, -1)
            return rows, torch.zeros(batch, dtype=torch.long, device=features.device)
        fallback = relevance if relevance is not None else torch.ones(batch, num_tokens, device=features.device)
        result = dpp_greedy_map(conditional_kernel(features, relevance), count, fallback)
        return torch.sort(result.picks, dim=-1).values, result.guarded
