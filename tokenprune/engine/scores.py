"""Attention probabilities for chosen query rows, recomputed from a decoder layer's own projections.

No eager attention and no full attention map: for ``n_q`` query rows and ``L`` keys the work and memory are
``O(n_q * L)`` per head, processed in query chunks so that a very long prompt with many query rows (HiMAP
stage 2 on a long video) stays within a fixed memory budget. The main forward keeps SDPA / flash attention.

Conventions (those of the stock eager attention): queries and keys from the family's ``AttentionMath`` (so q/k
norms apply where the stock attention has them), scores ``q k^T * scaling``, rotary embedding applied to q and k
with the cos/sin of the rows' positions, GQA keys shared by ``num_heads // num_kv_heads`` query
heads, softmax in float32 over every key the query may see (causal: keys at rows ``<=`` the query row).
"""

from __future__ import annotations

import torch

from .attention import AttentionMath, apply_rope, rotate_half  # noqa: F401  (apply_rope, rotate_half: their former home)

# Largest float32 score block materialised at once (bytes); chunks of query rows are sized to fit.
SCORE_CHUNK_BYTES = 256 * 2**20


def project_queries(math: AttentionMath, hidden: torch.Tensor, rows: torch.Tensor, cos, sin, rope: bool) -> torch.Tensor:
    """Queries of ``rows`` from the layer's own input norm and query projection (the family's attention math).
    ``hidden``: ``[B, L, d]``; ``cos``/``sin``: ``[B, L, hd]`` → ``[B, H, n_q, hd]``."""
    q = math.queries(math.norm(hidden[:, rows]))
    return math.rope(q, cos[:, rows], sin[:, rows]) if rope else q


def project_keys(math: AttentionMath, hidden: torch.Tensor, cos, sin, rope: bool) -> torch.Tensor:
    """Keys of every row from the layer's own input norm and key projection. ``hidden``: ``[B, L, d]`` →
    ``[B, KVH, L, hd]``."""
    k = math.keys(math.norm(hidden))
    return math.rope(k, cos, sin) if rope else k


def attention_probabilities(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_rows: torch.Tensor,
    key_columns: torch.Tensor | None,
    scaling: float,
    causal: bool = True,
    heads: str = "mean",
    reduce: str | None = None,
    chunk_bytes: int = SCORE_CHUNK_BYTES,
) -> torch.Tensor:
    """Softmax attention of ``queries`` over ``keys``, returned at ``key_columns`` only.

    Shapes:
      queries ``[B, H, n_q, hd]``, keys ``[B, KVH, L, hd]`` (H a multiple of KVH),
      query_rows ``[n_q]`` (row index of each query in the sequence, for the causal mask),
      key_columns ``[n_k]`` or None (all L).
    Returns (float32):
      heads="mean"|"max": ``[B, n_q, n_k]``, or ``[B, n_k]`` with reduce="sum"|"mean"|"max" over queries;
      heads="none": ``[B, H, n_q, n_k]`` (reduce not allowed).
    """
    if heads not in ("mean", "max", "none"):
        raise ValueError(f"heads must be 'mean', 'max' or 'none', got {heads!r}")
    if reduce not in (None, "sum", "mean", "max"):
        raise ValueError(f"reduce must be None, 'sum', 'mean' or 'max', got {reduce!r}")
    if heads == "none" and reduce is not None:
        raise ValueError("reduce needs heads='mean' or 'max'")
    batch, num_heads, num_queries, head_dim = queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    groups = num_heads // num_kv_heads
    keys32 = keys.float().unsqueeze(2)  # [B, KVH, 1, L, hd]
    key_positions = torch.arange(num_keys, device=keys.device)
    rows_per_chunk = max(1, chunk_bytes // max(1, 4 * num_heads * num_keys * batch * 2))

    pieces = []
    for start in range(0, num_queries, rows_per_chunk):
        stop = min(num_queries, start + rows_per_chunk)
        # [B, KVH, G, n, hd] @ [B, KVH, 1, hd, L] -> [B, KVH, G, n, L]
        q = queries[:, :, start:stop].float().reshape(batch, num_kv_heads, groups, stop - start, head_dim)
        scores = torch.matmul(q, keys32.transpose(-1, -2)) * scaling
        if causal:
            hidden_keys = key_positions[None, :] > query_rows[start:stop, None].to(keys.device)  # [n, L]
            scores = scores.masked_fill(hidden_keys, float("-inf"))
        probs = torch.softmax(scores, dim=-1).reshape(batch, num_heads, stop - start, num_keys)
        if key_columns is not None:
            probs = probs[..., key_columns]
        if heads == "mean":
            probs = probs.mean(dim=1)
        elif heads == "max":
            probs = probs.amax(dim=1)
        if reduce == "sum" or reduce == "mean":
            probs = probs.sum(dim=1)
        elif reduce == "max":
            probs = probs.amax(dim=1)
        pieces.append(probs)

    if reduce is None:
        return torch.cat(pieces, dim=-2)
    stacked = torch.stack(pieces)
    if reduce == "max":
        return stacked.amax(dim=0)
    total = stacked.sum(dim=0)
    return total / num_queries if reduce == "mean" else total
