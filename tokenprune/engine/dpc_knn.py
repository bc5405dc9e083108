"""DPC-KNN: density-peak clustering with k-nearest-neighbour density, batched over independent groups.

Used by token-merging methods (PruneVid's temporal segmentation and spatial merging; HiMAP-style merging can
reuse it). Everything runs as batched tensor operations on the input's device: a batch of ``B`` groups of up
to ``n`` tokens each (ragged groups are padded and masked), with no Python loop over tokens.

For the tokens ``x_1..x_n`` (``C`` features) of one group, with ``m`` clusters and ``k`` neighbours:

1. ``D_ij = ||x_i - x_j||_2 / sqrt(C)`` in float32, computed exactly (``D_ii = 0``).
2. ``kNN(i)``: the ``min(k, n)`` smallest entries of row ``i`` (``i`` itself included).
3. density ``rho_i = exp(-mean_{j in kNN(i)} D_ij^2) + 1e-6 * u_i`` with seeded noise ``u_i ~ U(0, 1)``.
4. ``delta_i = min_{j: rho_j > rho_i} D_ij``, or ``max_{a,b} D_ab`` for the density peak.
5. ``score_i = rho_i * delta_i``; the centres ``c_0..c_{m-1}`` are the top-m scores, descending (ties: lower
   index first).
6. ``label_i = argmin_r D_{i, c_r}`` (first ``r`` on ties), then ``label_{c_r} = r``.

``cluster_sums`` / ``cluster_means`` add / average any per-token values over each cluster's members (unweighted,
as PruneVid does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DENSITY_NOISE = 1e-6
# Largest float32 [chunk, n, n] block materialised at once (bytes); groups are processed in chunks that fit.
DPC_CHUNK_BYTES = 512 * 2**20


@dataclass
class DPCKNNResult:
    """Per group ``b`` with ``m_b`` clusters (``M = max_b m_b``); padding rows carry -1 / 0.

    labels ``[B, n]`` (int64): cluster of each token in ``[0, m_b)``, -1 for padding.
    centers ``[B, M]`` (int64): token index of centre ``r`` (descending score), -1 for ``r >= m_b``.
    density, delta, score ``[B, n]`` (float32): the quantities of steps 3-5 (0 for padding).
    """

    labels: torch.Tensor
    centers: torch.Tensor
    density: torch.Tensor
    delta: torch.Tensor
    score: torch.Tensor


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """``D = ||x_i - x_j|| / sqrt(C)`` in float32, exact (not the matmul expansion, whose diagonal is not 0).

    ``x``: ``[B, n, C]`` → ``[B, n, n]``.
    """
    x = x.float()
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(x.shape[-1])


def dpc_knn(
    x: torch.Tensor,
    num_clusters: int | torch.Tensor,
    k: int = 7,
    mask: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: int = 0,
    chunk_bytes: int = DPC_CHUNK_BYTES,
) -> DPCKNNResult:
    """Cluster each of ``B`` groups of tokens with DPC-KNN.

    x: ``[B, n, C]`` token features (any float dtype; distances are float32).
    num_clusters: ``m`` for every group, or ``[B]`` per group; clamped to ``[1, n_b]``.
    k: neighbours in the density, the token itself included (``min(k, n_b)`` per group).
    mask: ``[B, n]`` bool, True for real tokens (default: all); real tokens must come first in each row.
    noise: ``[B, n]`` values in [0, 1) for the density tie-break (default: ``U(0, 1)`` from ``seed``).
    """
    if x.dim() != 3:
        raise ValueError(f"dpc_knn expects x of shape [B, n, C], got {tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"dpc_knn: k must be a positive integer, got {k!r}")
    batch, n, _ = x.shape
    device = x.device
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    counts = mask.sum(-1)  # [B]
    if batch and int(counts.min()) < 1:
        raise ValueError("dpc_knn: every group needs at least one token")
    if not torch.equal(mask, torch.arange(n, device=device)[None] < counts[:, None]):
        raise ValueError("dpc_knn: each row of mask must be True for its first n_b tokens, then False")
    num_clusters = torch.as_tensor(num_clusters, device=device).long().expand(batch)
    num_clusters = torch.minimum(num_clusters.clamp(min=1), counts.clamp(min=1))
    if noise is None:
        generator = torch.Generator(device=device).manual_seed(seed)
        noise = torch.rand(batch, n, generator=generator, device=device)
    max_clusters = int(num_clusters.max()) if batch else 0

    rows_per_chunk = max(1, chunk_bytes // max(1, 4 * n * n * 4))  # ~4 live [n, n] float32 blocks per group
    pieces = [
        _dpc_knn_chunk(x[s:e], num_clusters[s:e], k, mask[s:e], counts[s:e], noise[s:e].float(), max_clusters)
        for s, e in ((s, min(batch, s + rows_per_chunk)) for s in range(0, batch, rows_per_chunk))
    ]
    if not pieces:
        empty = x.new_zeros(0, n, dtype=torch.float32)
        return DPCKNNResult(empty.long(), empty.new_zeros(0, 0).long(), empty, empty, empty)
    return DPCKNNResult(*(torch.cat(parts) for parts in zip(*pieces)))


def _dpc_knn_chunk(x, num_clusters, k, mask, counts, noise, max_clusters):
    batch, n, _ = x.shape
    device = x.device
    pair_valid = mask[:, :, None] & mask[:, None, :]  # [B, n, n]
    dist = pairwise_distances(x).masked_fill(~pair_valid, float("inf"))  # [B, n, n]

    # density: mean squared distance to the k nearest tokens (self included); padding columns are +inf
    k_max = min(k, n)
    nearest = dist.topk(k_max, dim=-1, largest=False).values  # [B, n, k_max] ascending
    k_b = counts.clamp(max=k).clamp(min=1)  # [B]
    in_knn = torch.arange(k_max, device=device)[None, None] < k_b[:, None, None]
    mean_sq = (nearest.masked_fill(~in_knn, 0.0) ** 2).sum(-1) / k_b[:, None]  # [B, n]
    density = torch.exp(-mean_sq) + DENSITY_NOISE * noise
    density = density.masked_fill(~mask, float("-inf"))

    # delta: distance to the nearest denser token; the densest token gets the largest distance of its group
    denser = density[:, None, :] > density[:, :, None]  # [B, n(i), n(j)]: rho_j > rho_i
    delta = dist.masked_fill(~denser, float("inf")).amin(-1)  # [B, n]
    largest = dist.masked_fill(~pair_valid, float("-inf")).flatten(1).amax(-1)  # [B]
    delta = torch.where(torch.isinf(delta), largest[:, None], delta)

    # centres: top m_b scores, descending; ties keep the lower index (stable sort)
    score = (density * delta).masked_fill(~mask, float("-inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :max_clusters]  # [B, M]
    centre_valid = torch.arange(max_clusters, device=device)[None] < num_clusters[:, None]  # [B, M]
    centers = torch.where(centre_valid, order, -1)

    # nearest centre (first on ties); each centre labels itself
    to_centre = dist.gather(2, order[:, None, :].expand(-1, n, -1))  # [B, n, M]
    to_centre = to_centre.masked_fill(~centre_valid[:, None, :], float("inf"))
    labels = to_centre.argmin(-1)  # [B, n]
    cluster_ids = torch.arange(max_clusters, device=device)[None].expand(batch, -1)
    # (slots r >= m_b point at distinct non-centre tokens: they write their own label back)
    labels = labels.scatter(1, order, torch.where(centre_valid, cluster_ids, labels.gather(1, order)))
    labels = labels.masked_fill(~mask, -1)

    zero = torch.zeros((), device=device)
    return (labels, centers, torch.where(mask, density, zero), torch.where(mask, delta, zero),
            torch.where(mask, score, zero))


def cluster_sums(values: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Sum of ``values`` over each cluster's members: float32 for float values, float64 (exact) for integers.

    values ``[B, n, *F]``; labels ``[B, n]`` (-1: ignored) → ``[B, num_clusters, *F]``.
    """
    dtype = torch.float32 if values.is_floating_point() else torch.float64
    batch, n = labels.shape
    flat = values.reshape(batch, n, -1).to(dtype)  # [B, n, F]
    valid = (labels >= 0).to(dtype)[..., None]  # [B, n, 1]
    index = labels.clamp(min=0)[..., None].expand_as(flat)  # [B, n, F]
    sums = flat.new_zeros(batch, num_clusters, flat.shape[-1]).scatter_add_(1, index, flat * valid)
    return sums.reshape(batch, num_clusters, *values.shape[2:])


def cluster_means(values: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Unweighted mean of ``values`` over each cluster's members (empty clusters: 0); dtypes as ``cluster_sums``.

    values ``[B, n, *F]``; labels ``[B, n]`` (-1: ignored) → ``[B, num_clusters, *F]``.
    """
    sums = cluster_sums(values, labels, num_clusters)
    sizes = cluster_sums(torch.ones_like(labels)[..., None], labels, num_clusters)  # [B, M, 1] float64
    sizes = sizes.reshape(*sizes.shape[:2], *([1] * (values.dim() - 2))).to(sums.dtype)
    return sums / sizes.clamp(min=1)
