"""PruneVid (Huang et al., Findings of ACL 2025): merge video tokens before the LLM, then prune them inside it.

Card: ``shared/methods/prunevid.md``.

* Stage 1 (``before_llm``): per video, cut the frames into temporal segments (DPC-KNN over frame means, then
  the official run refinement); inside a segment a grid position whose tokens barely change over time
  (mean pairwise cosine similarity > ``tau``) is "static" and averaged over the segment's frames; static
  tokens (per segment) and dynamic tokens (per frame) are merged spatially by DPC-KNN into
  ``int(n * cluster_ratio)`` cluster means when a group has at least ``min_cluster_tokens`` tokens. The merged
  tokens are a ``Reduction`` with merged rows: each gets the rounded mean 3-D position of its members (stock
  positions, never recomputed) and takes the place of its block's first frame (a segment's static tokens, then
  each frame's dynamic tokens), so frames separated by timestamp text (Qwen3-VL) keep that text in between.
* Stage 2 (``select`` after layer ``stage2_layer``): score the video tokens by the attention they receive from
  the text after the video (layer ``stage2_layer``'s pre-RoPE q/k, no causal mask, max over heads and
  queries: the official quirk), keep ``floor(stage2_keep * n)`` per part (static tokens of a segment, dynamic
  tokens of a frame), and drop the others from the KV caches of the earlier layers too.

An image is a one-frame video (one segment, all tokens dynamic: pure spatial merging). Batch size 1 only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.contract import DecoderInput, MergedRows, PruningInputError, Reduction, TokenLayout
from ..engine.dpc_knn import cluster_means, dpc_knn
from .base import Method, ModelInfo, PrefillStep, check_choice, check_ratio, register

PART_META = "prunevid_part"  # layout.meta: [original_length] stage-2 part id per merged token's original row
SEGMENTS_META = "prunevid_segments"  # layout.meta: segment lengths (temporal groups) per visual source


@register("prunevid")
@dataclass
class PruneVid(Method):
    """Two-stage PruneVid; ``stage1`` / ``stage2`` switch each stage (at least one must be on)."""

    stage1: bool = True
    tau: float = 0.8  # static threshold on the mean pairwise cosine similarity (strict >)
    cluster_ratio: float = 0.5  # spatial clusters: int(n * cluster_ratio)
    temporal_segment_ratio: float = 0.25  # temporal clusters: max(1, int(T * ratio))
    k: int = 7  # DPC-KNN neighbours, self included
    min_cluster_tokens: int = 15  # merge a group spatially only if it has at least this many tokens
    stage2: bool = True
    stage2_layer: int = 10  # prune after this layer (0-indexed), i.e. at the input of stage2_layer + 1
    stage2_keep: float = 0.4  # keep floor(stage2_keep * n) tokens per part
    score_attn: str = "prerope_nomask"  # prerope_nomask (official) | standard (RoPE'd causal attention)
    seed: int = 0  # DPC-KNN density tie-break noise

    def __post_init__(self):
        for name in ("stage1", "stage2"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{self.name}.{name} must be true or false, got {getattr(self, name)!r}")
        if not (self.stage1 or self.stage2):
            raise ValueError(f"{self.name}: stage1 and stage2 are both false; enable one (or use method=baseline)")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not math.isfinite(self.tau):
            raise ValueError(f"{self.name}.tau must be a finite number (static iff mean cosine > tau), got {self.tau!r}")
        check_ratio(self.name, "cluster_ratio", self.cluster_ratio)
        check_ratio(self.name, "temporal_segment_ratio", self.temporal_segment_ratio)
        check_ratio(self.name, "stage2_keep", self.stage2_keep)
        for name, minimum in (("k", 1), ("min_cluster_tokens", 1), ("stage2_layer", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{self.name}.{name} must be an integer >= {minimum}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{self.name}.seed must be an integer, got {self.seed!r}")
        check_choice(self.name, "score_attn", self.score_attn, ("prerope_nomask", "standard"))

    def validate(self, model: ModelInfo) -> None:
        if self.stage2 and self.stage2_layer > model.num_layers - 2:
            raise ValueError(
                f"{self.name}.stage2_layer={self.stage2_layer} is out of range: stage 2 prunes after that layer and "
                f"the model has {model.num_layers} decoder layers (valid 0..{model.num_layers - 2})"
            )

    # ------------------------------------------------------------------------------------------------------
    # Stage 1: before the decoder
    # ------------------------------------------------------------------------------------------------------
    def before_llm(self, seq: DecoderInput) -> Reduction | None:
        """Replace each image / video by its merged tokens (placed where its frames were); text rows stay."""
        if not self.stage1:
            return None
        _refuse_second_sample(seq.stats, "prunevid_stage1_tokens")
        layout = seq.layout
        embeds = seq.embeds[0]  # [L, d]
        device = embeds.device
        merged_rows = torch.zeros(layout.length, dtype=torch.bool, device=device)
        blocks = []  # per image / video: its merged tokens
        totals = {"segments": 0, "static": 0, "cells": 0}
        next_part, next_token = 0, 0
        for groups in _sources(layout):
            rows = torch.cat([layout.group_rows(g) for g in groups])  # [T * N] frame-major, raster order
            block = self._merge_source(embeds, layout, rows, groups, next_part, totals)
            block["into"] = block["into"] + next_token
            merged_rows[rows] = True
            blocks.append(block)
            next_part = int(block["part"].max()) + 1
            next_token += block["values"].shape[0]

        def cat(key):
            return torch.cat([block[key] for block in blocks])

        part_of_original = torch.full((layout.original_length,), -1, dtype=torch.long, device=device)
        part_of_original[layout.original[cat("first_row")]] = cat("part")
        merged = MergedRows(sources=cat("sources"), into=cat("into"), weights=cat("weights"), anchor=cat("anchor"),
                            values=cat("values"), positions="mean")
        visual_after = next_token
        seq.stats["prunevid_stage1_tokens"] = visual_after
        seq.stats["prunevid_segments"] = totals["segments"]
        seq.stats["prunevid_static_fraction"] = totals["static"] / max(1, totals["cells"])
        if not self.stage2:
            seq.stats["prunevid_stage2_tokens"] = visual_after
        return Reduction(keep=(~merged_rows).nonzero().flatten(), merged=merged,
                         meta={PART_META: part_of_original, SEGMENTS_META: [block["segments"] for block in blocks]})

    def _merge_source(self, embeds, layout: TokenLayout, rows, groups, part_offset: int, totals) -> dict:
        """Stage 1 on one image / video: its ``T`` frames of ``N`` tokens → merged tokens in emission order.

        Returns the merged tokens' values ``[n_out, d]`` (cluster means of the unit means), their members as
        ``sources`` / ``into`` / ``weights`` (each original token of a cluster weighs 1 / its member count, so the
        values are the plain means of the members), their anchors (the first row of the first frame of their block:
        a segment's static tokens, then each frame's dynamic tokens, where those frames were), their first member
        row, and their stage-2 part (the block)."""
        grid = layout.groups[groups[0]]
        T, N = len(groups), grid.size
        if rows.numel() != T * N or not torch.equal(layout.cell[rows].view(T, N),
                                                    torch.arange(N, device=rows.device).expand(T, -1)):
            raise ValueError("prunevid stage 1 needs complete frame grids (run it before any other reduction)")
        device = embeds.device
        x = embeds[rows].view(T, N, -1).float()  # [T, N, d]

        # 1. temporal segments: DPC-KNN over frame means + run refinement
        lengths = self.segments(x.mean(1))  # python list, sums to T
        S = len(lengths)
        width = torch.tensor(lengths, device=device)  # [S] frames per segment
        segment_of_frame = torch.repeat_interleave(torch.arange(S, device=device), width)  # [T]
        start = torch.cumsum(width, 0) - width  # [S] first frame of each segment

        # 2. static positions: mean pairwise cosine similarity over a segment's frames, strict > tau
        static = self.static_mask(x, segment_of_frame, S)  # [S, N]

        # 3. units to cluster: static (segment, cell) time-averaged; dynamic (frame, cell) as is
        segment_sum = torch.zeros(S, N, x.shape[-1], device=device).index_add_(0, segment_of_frame, x)
        unit_x = torch.cat([segment_sum / width[:, None, None], x])  # [S + T, N, d]
        unit_valid = torch.cat([static, ~static[segment_of_frame]])  # [S + T, N]
        unit_first_frame = torch.cat([start, torch.arange(T, device=device)])  # [S + T]
        frame_rows = rows.view(T, N)
        # emission order of the blocks: per segment, [static][frame 0]...[frame W-1]
        block_rank = torch.cat([start + torch.arange(S, device=device),
                                torch.arange(T, device=device) + segment_of_frame + 1])  # [S + T]

        # 4. spatial DPC-KNN inside every non-empty block, all blocks in one batched call
        active = unit_valid.any(-1).nonzero().flatten()  # [A]
        packed = torch.sort((~unit_valid[active]).to(torch.int8), dim=-1, stable=True).indices  # valid cells first
        count = unit_valid[active].sum(-1)  # [A]
        mask = torch.arange(N, device=device)[None] < count[:, None]  # [A, N]
        wanted = torch.where(count >= self.min_cluster_tokens,
                             (count.double() * self.cluster_ratio).floor().long().clamp(min=1), count)
        features = unit_x[active].gather(1, packed[..., None].expand(-1, -1, x.shape[-1]))  # [A, N, d]
        result = dpc_knn(features, wanted, k=self.k, mask=mask, seed=self.seed)
        labels, M = result.labels, result.centers.shape[1]  # [A, N]

        # 5. cluster means (features), first member, emission order
        means = cluster_means(features, labels, M)  # [A, M, d] float32
        cell = packed.masked_fill(~mask, N)
        first_cell = torch.full((active.numel(), M), N, dtype=torch.long, device=device).scatter_reduce(
            1, labels.clamp(min=0), cell, reduce="amin")  # [A, M]
        first_row = frame_rows[unit_first_frame[active]][torch.arange(active.numel(), device=device)[:, None],
                                                          first_cell.clamp(max=N - 1)]  # [A, M]
        exists = torch.arange(M, device=device)[None] < wanted[:, None]  # [A, M]
        key = (block_rank[active][:, None] * (N + 1) + first_cell)[exists]
        order = torch.argsort(key)
        emitted = torch.empty_like(order)
        emitted[order] = torch.arange(order.numel(), device=device)  # emission index of each existing cluster
        cluster_index = (torch.cumsum(exists.flatten(), 0) - 1).view(exists.shape)  # [A, M] index among existing

        def emit(values):  # [A, M, ...] -> [n_out, ...] in emission order
            return values[exists][order]

        # 6. members: unit u covers the frames of its segment (static) or its frame (dynamic); each (frame, cell)
        out_of_unit = torch.full((S + T, N), -1, dtype=torch.long, device=device)  # [S + T, N] merged token
        out_of_unit[active[:, None].expand(-1, N)[mask], packed[mask]] = emitted[cluster_index.gather(1, labels.clamp(
            min=0))[mask]]
        pair_unit = torch.cat([segment_of_frame, S + torch.arange(T, device=device)])  # [2T] (unit, frame) pairs
        pair_frame = torch.cat([torch.arange(T, device=device)] * 2)
        pair_out = out_of_unit[pair_unit]  # [2T, N]
        is_member = pair_out >= 0
        into = pair_out[is_member]  # [E]
        sources = frame_rows[pair_frame][is_member]  # [E]
        members = torch.bincount(into, minlength=order.numel())  # [n_out]

        first_row = emit(first_row)
        totals["segments"] += S
        totals["static"] += int((static.sum(-1) * width).sum())
        totals["cells"] += T * N
        return {
            "values": emit(means).to(embeds.dtype),
            "sources": sources,
            "into": into,
            "weights": 1.0 / members[into].double(),
            "anchor": emit(frame_rows[unit_first_frame[active], 0][:, None].expand(-1, M)),
            "first_row": first_row,
            "part": part_offset + emit(block_rank[active][:, None].expand(-1, M)),
            "segments": lengths,
        }

    def segments(self, frame_features: torch.Tensor) -> list[int]:
        """Segment lengths (in frames, time order) from ``[T, d]`` frame descriptors."""
        T = frame_features.shape[0]
        clusters = max(1, int(T * self.temporal_segment_ratio))
        labels = dpc_knn(frame_features[None], clusters, k=self.k, seed=self.seed).labels[0]
        return refine_segments(labels.tolist())

    def static_mask(self, x: torch.Tensor, segment_of_frame: torch.Tensor, num_segments: int) -> torch.Tensor:
        """``[S, N]`` True where the mean pairwise cosine similarity of a cell over its segment's W frames is
        > tau (W = 1: never). ``x``: ``[T, N, d]``."""
        unit = F.normalize(x.float(), dim=-1)  # [T, N, d]
        summed = torch.zeros(num_segments, *unit.shape[1:], device=x.device).index_add_(0, segment_of_frame, unit)
        self_sims = torch.zeros(num_segments, unit.shape[1], device=x.device).index_add_(
            0, segment_of_frame, (unit * unit).sum(-1))  # [S, N] sum_w cos(w, w)
        width = torch.bincount(segment_of_frame, minlength=num_segments).float()[:, None]  # [S, 1]
        pairs = width * (width - 1)
        mean_cos = ((summed * summed).sum(-1) - self_sims) / pairs.clamp(min=1)  # [S, N]: sum over w != t
        return (mean_cos > self.tau) & (width > 1)

    # ------------------------------------------------------------------------------------------------------
    # Stage 2: inside the decoder
    # ------------------------------------------------------------------------------------------------------
    def prune_layers(self, layout: TokenLayout) -> list[int]:
        return [self.stage2_layer + 1] if self.stage2 else []

    def select(self, step: PrefillStep) -> Reduction:
        """Keep the top ``floor(stage2_keep * n)`` video tokens of every part; prune the earlier caches too."""
        _refuse_second_sample(step.stats, "prunevid_stage2_tokens")
        layout = step.layout
        visual = layout.visual_rows()
        if layout.text_after_visual_rows().numel() == 0:
            raise ValueError("prunevid stage 2 scores visual tokens by the text that follows them; this prompt has "
                             "no text after the last image / video (put the visual input before the question)")
        official = self.score_attn == "prerope_nomask"
        scores = step.attention(layer=step.layer - 1, queries="text", keys="visual", rope=not official,
                                causal=not official, heads="max", reduce="max")  # [n_visual]
        kept = keep_per_part(scores, self.parts(layout, visual), self.stage2_keep)
        step.stats["prunevid_stage2_tokens"] = int(kept.numel())
        step.stats.setdefault("prunevid_stage1_tokens", int(visual.numel()))
        return step.keep_visual(visual[kept], prune_cache_before=True)

    @staticmethod
    def parts(layout: TokenLayout, visual: torch.Tensor) -> torch.Tensor:
        """Stage-2 part of each visual row: Stage 1's blocks, or each image / frame without Stage 1."""
        part_of_original = layout.meta.get(PART_META)
        if part_of_original is None:
            return layout.group[visual]
        part = part_of_original[layout.original[visual]]
        if bool((part < 0).any()):
            raise ValueError("prunevid stage 2: some visual tokens were not produced by stage 1")
        return part


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def refine_segments(labels: list[int]) -> list[int]:
    """Official run refinement of per-frame cluster labels → segment lengths in time order.

    Per label, runs shorter than its longest run become unassigned (all of them if the longest has length 1);
    scanning left to right, each unassigned run joins the longer adjacent run of the refined labels (ties:
    left if there is one); with no neighbour it gets label 0. Segments are the maximal runs of one label.
    """
    labels = list(labels)
    runs = _runs(labels)
    longest: dict[int, int] = {}
    for label, begin, end in runs:
        longest[label] = max(longest.get(label, 0), end - begin)
    for label, begin, end in runs:
        if longest[label] == 1 or end - begin < longest[label]:
            labels[begin:end] = [-1] * (end - begin)
    for _, begin, end in [run for run in _runs(labels) if run[0] == -1]:
        left = _run_around(labels, begin - 1) if begin > 0 else None
        right = _run_around(labels, end) if end < len(labels) else None
        if left is None and right is None:
            fill = 0
        elif right is None or (left is not None and left[1] >= right[1]):
            fill = left[0]
        else:
            fill = right[0]
        labels[begin:end] = [fill] * (end - begin)
    return [end - begin for _, begin, end in _runs(labels)]


def _runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs ``(label, begin, end)`` of equal labels."""
    runs, begin = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[begin]:
            runs.append((labels[begin], begin, i))
            begin = i
    return runs


def _run_around(labels: list[int], index: int) -> tuple[int, int]:
    """``(label, length)`` of the maximal run containing ``index``."""
    label, begin, end = labels[index], index, index + 1
    while begin > 0 and labels[begin - 1] == label:
        begin -= 1
    while end < len(labels) and labels[end] == label:
        end += 1
    return label, end - begin


def keep_per_part(scores: torch.Tensor, part: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices (ascending) of the top ``floor(keep * n_p)`` scores of every part ``p`` (ties: lower index).

    scores, part: ``[n]``.
    """
    _, part = torch.unique(part, return_inverse=True)  # contiguous ids 0..P-1
    sizes = torch.bincount(part)  # [P]
    quota = (sizes.double() * keep).floor().long()  # [P]
    order = torch.argsort(scores.float(), descending=True, stable=True)
    order = order[torch.argsort(part[order], stable=True)]  # grouped by part, best first
    start = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(order.numel(), device=order.device) - start[part[order]]
    return torch.sort(order[rank < quota[part[order]]]).values


def _sources(layout: TokenLayout) -> list[list[int]]:
    """Visual groups per image / video, in prompt order (a video's groups are its frames in time order)."""
    sources: dict[tuple[int, int], list[int]] = {}
    for index, group in enumerate(layout.groups):
        sources.setdefault((group.kind, group.source), []).append(index)
    return [groups for groups in sources.values() if layout.group_rows(groups[0]).numel()]


def _refuse_second_sample(stats: dict, key: str) -> None:
    if key in stats:
        raise PruningInputError("prunevid supports batch size 1 only (as the official code); run one sample per call")
