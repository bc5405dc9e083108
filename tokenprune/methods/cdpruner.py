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

Budget (``_budget.py``): ``budget`` tokens for the whole sample (an int; a float: that fraction of its visual
tokens), split over its images / temporal groups in proportion to their sizes; the DPP runs per group (official:
``visual_token_num`` per crop, 128 / 64 / 32 of 576). The min-max of ``r`` spans every group of one image / video.
Positions (``positions``): official re-packing on 1-D RoPE (``position_ids`` None), original positions on mRoPE.
``relevance=clip`` needs the sample's question text (``apply(..., questions=[...])``; the runner passes each
sample's question) and the CLIP tower's pre-projector features (LLaVA's vision signals); it is refused elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ._budget import check_budget
from .base import (DecoderInput, Method, ModelInfo, Reduction, check_choice, check_positions, register,
                   resolve_positions)
from .common import group_rows, group_shares, keep_visual_rows, unit_rows

RELEVANCES = ("auto", "clip", "llm", "none")
TEXT_ROWS = ("after_visual", "all")
RELEVANCE_EPSILON = 1e-6  # official: added to the numerator of the min-max only
CLIP_TEXT_POSITIONS = 77
OFFICIAL_POSITIONS = "reindex"  # card §4: position_ids None (A L394-L395), every layer caches L' rows


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


DIAGONAL_TILE = 256  # rows per diagonal tile of the Gram product (a [B, 256, 256] float32 block at most)


class ConditionalKernel:
    """``conditional_kernel`` without the ``N x N`` matrix: its diagonal and the rows the greedy MAP reads (one per
    pick), computed on demand from the unit rows — equal to ``conditional_kernel`` up to float rounding."""

    def __init__(self, features: torch.Tensor, relevance: torch.Tensor | None):
        self.unit = unit_rows(features).float()  # [B, N, d]: normalised in the features' dtype, then float32
        self.relevance = None if relevance is None else relevance.float()  # [B, N]
        batch, num_tokens, _ = self.unit.shape
        self.shape = (batch, num_tokens, num_tokens)
        self.device, self.dtype = self.unit.device, self.unit.dtype

    def diagonal(self) -> torch.Tensor:
        """``[B, N]``: ``r_j² x̂_j·x̂_j``, from the diagonal tiles of the Gram product ``X̂ X̂ᵀ`` (``DIAGONAL_TILE``
        rows at a time): the rounding of the full product's diagonal, which the official code's first pick of the
        unconditional DPP follows (every entry is 1 in exact arithmetic)."""
        tile = DIAGONAL_TILE
        similarity = torch.cat([torch.diagonal(block @ block.transpose(1, 2), dim1=1, dim2=2)
                                for block in self.unit.split(tile, dim=1)], dim=1)  # [B, N]
        return similarity if self.relevance is None else self.relevance * similarity * self.relevance

    def row(self, index: torch.Tensor) -> torch.Tensor:
        """``L[b, index[b]]``: ``index`` ``[B]`` → ``[B, N]``."""
        rows = torch.arange(self.shape[0], device=self.device)
        similarity = (self.unit @ self.unit[rows, index][..., None])[..., 0]  # [B, N]
        if self.relevance is None:
            return similarity
        return self.relevance[rows, index][:, None] * similarity * self.relevance


class MatrixKernel:
    """``ConditionalKernel``'s interface over a given ``[B, N, N]`` kernel."""

    def __init__(self, kernel: torch.Tensor):
        self.kernel = kernel
        self.shape, self.device, self.dtype = kernel.shape, kernel.device, kernel.dtype

    def diagonal(self) -> torch.Tensor:
        return torch.diagonal(self.kernel, dim1=1, dim2=2)

    def row(self, index: torch.Tensor) -> torch.Tensor:
        return self.kernel[torch.arange(self.shape[0], device=self.device), index]


@dataclass
class DPPResult:
    """picks ``[B, T]`` in pick order; gains ``[B, T]``: ``d_j`` of each pick (the Schur complement, so that
    ``det L_S = prod(gains)``; NaN for guard picks); guarded ``[B]``: picks made by the numerical guard."""

    picks: torch.Tensor
    gains: torch.Tensor
    guarded: torch.Tensor


def dpp_greedy_map(kernel: torch.Tensor | ConditionalKernel, count: int,
                   fallback_order: torch.Tensor | None = None) -> DPPResult:
    """Greedy MAP of a DPP with kernel ``[B, N, N]`` (a tensor, or rows on demand: ``ConditionalKernel``), computed
    in the kernel's dtype (no host sync; memory ``O(T N)``: one kernel row per pick).

    At step ``i``: ``j = argmax d``; ``e = (L[j] - Σ_{t<i} c_t[j] c_t) / sqrt(d_j)``; ``c_i = e``; ``d -= e²``;
    ``d_j = -inf``. Once ``d_j`` is not a positive finite number the remaining picks follow ``fallback_order``
    scores (``[B, N]``, highest first, lower index on ties; default: the kernel's diagonal).
    """
    kernel = MatrixKernel(kernel) if isinstance(kernel, torch.Tensor) else kernel
    batch, num_tokens, _ = kernel.shape
    count = max(0, min(count, num_tokens))
    device = kernel.device
    rows = torch.arange(batch, device=device)
    diagonal = kernel.diagonal()
    gains = diagonal.clone()  # [B, N]: d, the Schur complements
    basis = torch.zeros(count, batch, num_tokens, dtype=kernel.dtype, device=device)  # [T, B, N]: the c_t
    fallback = (diagonal if fallback_order is None else fallback_order).float().clone()
    picked = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    guarded = torch.zeros(batch, dtype=torch.long, device=device)
    picks = torch.zeros(batch, count, dtype=torch.long, device=device)
    chosen_gains = torch.full((batch, count), float("nan"), dtype=kernel.dtype, device=device)
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
        update = (kernel.row(best) - projection) / torch.where(stopped, 1.0, best_gain).sqrt()[:, None]  # [B, N]
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


@lru_cache(maxsize=2)
def load_clip(path: str):
    """``(text_model, tokenizer, visual_projection)`` of a CLIP checkpoint (CLIPTextModelWithProjection, its
    tokenizer, the image projection), loaded once per path, float32, eval mode."""
    from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(path)  # a full CLIP checkpoint: the towers' projection width is its own
    text_config, vision_config = config.text_config, config.vision_config
    text_config.projection_dim = vision_config.projection_dim = config.projection_dim
    text_model = CLIPTextModelWithProjection.from_pretrained(path, config=text_config, dtype=torch.float32).eval()
    vision = CLIPVisionModelWithProjection.from_pretrained(path, config=vision_config, dtype=torch.float32)
    return text_model, AutoTokenizer.from_pretrained(path), vision.visual_projection.eval()


def clip_relevance_inputs(path: str, question: str, features: torch.Tensor, post_norm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E_img [..., N, C], E_txt [M, C])`` of the official CLIP relevance: the pre-projector patches ``features``
    through the tower's own final norm and CLIP's image projection, and the question's 77-token chunks."""
    text_model, tokenizer, projection = load_clip(path)
    device = features.device
    text_model, projection = text_model.to(device), projection.to(device)
    tokens = tokenizer(question, return_tensors="pt", truncation=False)
    text = clip_text_embeds(text_model, tokens["input_ids"], tokens.get("attention_mask"))
    return clip_image_embeds(post_norm, projection, features), text


@register("cdpruner")
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
        check_budget(self.name, self.budget, allow_none=False)
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

    @property
    def needs_vision_signals(self) -> bool:
        return self.resolved_relevance() == "clip"  # the CLIP tower's pre-projector patches and final norm

    def validate(self, model: ModelInfo) -> None:
        resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, model)

    def keep_rows(self, features: torch.Tensor, relevance: torch.Tensor | None,
                  count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept rows ``[B, count]`` ascending and the guard counts ``[B]`` for ``B`` groups (features ``[B, N, d]``,
        relevance ``[B, N]`` or None). A count keeping every token keeps them all without running the DPP."""
        batch, num_tokens, _ = features.shape
        if count >= num_tokens:
            rows = torch.arange(num_tokens, device=features.device).expand(batch, -1)
            return rows, torch.zeros(batch, dtype=torch.long, device=features.device)
        fallback = relevance if relevance is not None else torch.ones(batch, num_tokens, device=features.device)
        result = dpp_greedy_map(ConditionalKernel(features, relevance), count, fallback)  # never the N x N kernel
        return torch.sort(result.picks, dim=-1).values, result.guarded

    def relevance_of(self, seq: DecoderInput, rows: list[torch.Tensor], groups: list[int]) -> list[torch.Tensor]:
        """``r`` of each of ``groups`` (the groups of one image / video; ``[N_g]`` each), min-max over all of them."""
        relevance = self.resolved_relevance()
        members = torch.cat([rows[g] for g in groups])  # every row of the image / video
        if relevance == "llm":
            layout = seq.layout
            text = layout.text_after_visual_rows() if self.text_rows == "after_visual" else layout.text_rows()
            if text.numel() == 0:
                raise ValueError(f"{self.name}: relevance=llm with text_rows={self.text_rows!r} found no text rows "
                                 "(the prompt ends with a visual token); use text_rows='all' or relevance='none'")
            image, text = seq.embeds[:, members], seq.embeds[0, text]  # [1, n, d], [M, d]
        else:
            if seq.question is None:
                raise ValueError(f"{self.name}.relevance=clip needs the sample's question text: pass apply(..., "
                                 "questions=[...]) (the runner does), or use relevance='llm'")
            signals = [seq.vision.group(g) for g in groups]
            if any(s.features is None for s in signals):
                raise ValueError(f"{self.name}.relevance=clip needs the CLIP tower's pre-projector features, which "
                                 f"the {seq.vision.family} family's vision encoder does not emit: use relevance='llm'")
            cells = [seq.layout.cell[rows[g]] for g in groups]  # whole groups or thinned ones: by cell
            features = torch.cat([s.features[c] for s, c in zip(signals, cells)])[None]  # [1, n, D]
            image, text = clip_relevance_inputs(self.clip_path, seq.question, features, seq.vision.post_norm)
        relevance = cdpruner_relevance(image, text, self.resolved_sign(), self.theta)[0]  # [n]
        return list(relevance.split([rows[g].numel() for g in groups]))

    def before_llm(self, seq: DecoderInput) -> Reduction | None:
        layout = seq.layout
        rows = group_rows(layout)
        counts = group_shares(self.budget, layout, rows)
        pruned = [g for g in range(len(rows)) if counts[g] < rows[g].numel()]
        kept = [rows[g] for g in range(len(rows)) if counts[g] >= rows[g].numel()]
        # the groups of one image / video share the relevance min-max (card §4)
        sources: dict[tuple[int, int], list[int]] = {}
        for g in pruned:
            sources.setdefault((layout.groups[g].kind, layout.groups[g].source), []).append(g)
        for groups in sources.values():
            relevance = [None] * len(groups) if self.resolved_relevance() == "none" else \
                self.relevance_of(seq, rows, groups)
            for g, r in zip(groups, relevance):
                keep, guarded = self.keep_rows(seq.embeds[:, rows[g]], None if r is None else r[None], counts[g])
                kept.append(rows[g][keep[0]])
                seq.stats["cdpruner_dpp_fallbacks"] = seq.stats.get("cdpruner_dpp_fallbacks", 0) + int(guarded[0])
        reindex = resolve_positions(self.name, self.positions, OFFICIAL_POSITIONS, seq.model) == "reindex"
        return keep_visual_rows(seq, kept, reindex)
