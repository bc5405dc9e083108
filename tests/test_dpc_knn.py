"""Done-when 3: the batched DPC-KNN against hand-computed numbers, Gaussian blobs and a plain reference.

``reference_dpc_knn`` is written from the card's formulas with Python loops over tokens (float64), independent
of the batched implementation; ``test_prunevid.py`` reuses it for its stage-1 reference.
"""

import math

import pytest
import torch

from tokenprune.engine.dpc_knn import cluster_means, cluster_sums, dpc_knn, pairwise_distances


def reference_dpc_knn(x: torch.Tensor, m: int, k: int, noise: torch.Tensor):
    """One group ``x`` ``[n, C]``: returns (labels, centres, rho, delta, score) as Python lists."""
    n, C = x.shape
    x = x.double()
    D = [[math.sqrt(float(((x[i] - x[j]) ** 2).sum())) / math.sqrt(C) for j in range(n)] for i in range(n)]
    k = min(k, n)
    rho = []
    for i in range(n):
        nearest = sorted(D[i])[:k]
        rho.append(math.exp(-sum(d * d for d in nearest) / k) + 1e-6 * float(noise[i]))
    largest = max(max(row) for row in D)
    delta = []
    for i in range(n):
        denser = [D[i][j] for j in range(n) if rho[j] > rho[i]]
        delta.append(min(denser) if denser else largest)
    score = [rho[i] * delta[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[: min(m, n)]
    labels = []
    for i in range(n):
        distances = [D[i][c] for c in centres]
        labels.append(distances.index(min(distances)))  # first centre on ties
    for r, c in enumerate(centres):
        labels[c] = r
    return labels, centres, rho, delta, score


def test_hand_computed_example():
    # four points on a line (C = 1, so D = |x_i - x_j|), k = 3, no noise:
    # rho_0 = exp(-(0 + 1 + 2.25)/3), rho_1 = exp(-(0 + .25 + 1)/3), rho_2 = exp(-(0 + .25 + 2.25)/3),
    # rho_3 = exp(-(0 + 8.5^2 + 9^2)/3); rho_1 > rho_2 > rho_0 > rho_3.
    # delta_1 = max D = 10 (the density peak), delta_2 = D(2,1) = .5, delta_0 = D(0,1) = 1, delta_3 = D(3,2) = 8.5.
    # scores: 10 e^{-5/12} = 6.592, e^{-13/12} = .3385, .5 e^{-5/6} = .2173, 8.5 e^{-51.08} ~ 0 -> centres [1, 0].
    x = torch.tensor([[0.0], [1.0], [1.5], [10.0]])
    result = dpc_knn(x[None], 2, k=3, noise=torch.zeros(1, 4))
    rho = [math.exp(-13 / 12), math.exp(-5 / 12), math.exp(-5 / 6), math.exp(-153.25 / 3)]
    delta = [1.0, 10.0, 0.5, 8.5]
    # float32: exp(-51.08) inherits the exponent's rounding (~3e-6 relative); the rest is exact to ~1e-7
    torch.testing.assert_close(result.density[0], torch.tensor(rho), rtol=5e-6, atol=0)
    torch.testing.assert_close(result.delta[0], torch.tensor(delta), rtol=1e-7, atol=0)
    torch.testing.assert_close(result.score[0], torch.tensor(rho) * torch.tensor(delta), rtol=5e-6, atol=0)
    assert result.centers[0].tolist() == [1, 0]
    # x_2 is .5 from centre 1 (cluster 0) and 1.5 from centre 0; x_3 is 9 from centre 1 and 10 from centre 0
    assert result.labels[0].tolist() == [1, 0, 0, 0]


def test_density_peak_has_the_largest_distance_and_centres_label_themselves():
    x = torch.randn(1, 30, 8, generator=torch.Generator().manual_seed(3))
    result = dpc_knn(x, 5, k=7)
    peak = int(result.density[0].argmax())
    assert float(result.delta[0, peak]) == float(pairwise_distances(x)[0].max())
    assert result.labels[0, result.centers[0]].tolist() == list(range(5))


def test_well_separated_gaussian_blobs_are_recovered_exactly():
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(3, 16, generator=generator)
    means = 10 * directions / directions.norm(dim=-1, keepdim=True)  # pairwise separation ~10
    points = torch.cat([mean + 0.1 * torch.randn(20, 16, generator=generator) for mean in means])
    order = torch.randperm(60, generator=generator)
    truth = torch.arange(3).repeat_interleave(20)[order]
    result = dpc_knn(points[order][None], 3, k=7)
    labels = result.labels[0]
    assert sorted(truth[result.centers[0]].tolist()) == [0, 1, 2]  # one centre per blob
    for cluster in range(3):  # each cluster is exactly one whole blob
        members = truth[labels == cluster]
        assert members.numel() == 20 and members.unique().numel() == 1


@pytest.mark.parametrize("n,m,k", [(12, 3, 7), (40, 9, 7), (5, 5, 7), (30, 1, 3)])
def test_equals_the_plain_reference_on_random_features(n, m, k):
    generator = torch.Generator().manual_seed(n * 100 + m)
    x = torch.randn(n, 6, generator=generator)
    noise = torch.rand(n, generator=generator)
    labels, centres, rho, delta, score = reference_dpc_knn(x, m, k, noise)
    result = dpc_knn(x[None], m, k=k, noise=noise[None])
    assert result.centers[0].tolist() == centres
    assert result.labels[0].tolist() == labels
    # float32 distances vs the float64 reference
    torch.testing.assert_close(result.density[0].double(), torch.tensor(rho, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.delta[0].double(), torch.tensor(delta, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.score[0].double(), torch.tensor(score, dtype=torch.float64), rtol=1e-5, atol=0)


def test_distances_are_exact_with_a_zero_diagonal_beyond_25_tokens():
    x = 100 + torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(1))  # large norms: matmul path errs
    D = pairwise_distances(x)
    assert torch.equal(torch.diagonal(D[0]), torch.zeros(64))
    brute = ((x[0, :, None].double() - x[0, None].double()) ** 2).sum(-1).sqrt() / math.sqrt(32)
    torch.testing.assert_close(D[0].double(), brute, rtol=1e-6, atol=1e-6)


def test_padded_batch_equals_each_group_alone():
    generator = torch.Generator().manual_seed(2)
    sizes, clusters = [20, 7, 13, 1], [4, 2, 13, 1]
    groups = [torch.randn(n, 5, generator=generator) for n in sizes]
    noise = torch.rand(len(sizes), max(sizes), generator=generator)
    x = torch.zeros(len(sizes), max(sizes), 5)
    mask = torch.zeros(len(sizes), max(sizes), dtype=torch.bool)
    for b, group in enumerate(groups):
        x[b, : group.shape[0]] = group
        mask[b, : group.shape[0]] = True
    batched = dpc_knn(x, torch.tensor(clusters), k=7, mask=mask, noise=noise, chunk_bytes=1)  # one group per chunk
    for b, (group, m) in enumerate(zip(groups, clusters)):
        alone = dpc_knn(group[None], m, k=7, noise=noise[b : b + 1, : group.shape[0]])
        n = group.shape[0]
        assert torch.equal(batched.labels[b, :n], alone.labels[0])
        assert torch.equal(batched.centers[b, :m], alone.centers[0])
        assert (batched.labels[b, n:] == -1).all() and (batched.centers[b, m:] == -1).all()
        assert torch.equal(batched.score[b, :n], alone.score[0])


def test_as_many_clusters_as_tokens_is_the_identity_even_with_duplicates():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])[None]  # three identical tokens
    result = dpc_knn(x, 4, k=7)
    assert sorted(result.centers[0].tolist()) == [0, 1, 2, 3]
    # a centre at distance 0 from an earlier centre still labels itself (argmin alone would pick the earlier one)
    assert result.labels[0, result.centers[0]].tolist() == [0, 1, 2, 3]
    assert torch.equal(cluster_means(x, result.labels, 4)[0, result.labels[0]], x[0])


def test_cluster_sums_and_means_by_hand():
    labels = torch.tensor([[0, 1, 0, -1, 1, 1]])
    values = torch.tensor([[1, 2, 3, 100, 4, 7]])[..., None]  # padding (-1) is ignored
    assert cluster_sums(values, labels, 3)[0, :, 0].tolist() == [4.0, 13.0, 0.0]
    assert cluster_means(values, labels, 3)[0, :, 0].tolist() == [2.0, 13 / 3, 0.0]
    assert cluster_sums(values, labels, 3).dtype == torch.float64  # integer values are summed exactly


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="shape \\[B, n, C\\]"):
        dpc_knn(torch.zeros(4, 3), 2)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        dpc_knn(torch.zeros(1, 4, 3), 2, k=0)
    with pytest.raises(ValueError, match="first n_b tokens"):
        dpc_knn(torch.zeros(1, 4, 3), 2, mask=torch.tensor([[True, False, True, False]]))
    with pytest.raises(ValueError, match="at least one token"):
        dpc_knn(torch.zeros(1, 4, 3), 2, mask=torch.zeros(1, 4, dtype=torch.bool))


@pytest.mark.gpu
def test_cuda_equals_cpu():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 50, 16, generator=generator)
    noise = torch.rand(6, 50, generator=generator)
    mask = torch.arange(50)[None] < torch.tensor([50, 40, 30, 20, 10, 1])[:, None]
    cpu = dpc_knn(x, torch.tensor([5, 4, 3, 2, 1, 1]), k=7, mask=mask, noise=noise)
    cuda = dpc_knn(x.cuda(), torch.tensor([5, 4, 3, 2, 1, 1]).cuda(), k=7, mask=mask.cuda(), noise=noise.cuda())
    assert torch.equal(cuda.labels.cpu(), cpu.labels) and torch.equal(cuda.centers.cpu(), cpu.centers)
    torch.testing.assert_close(cuda.score.cpu(), cpu.score, rtol=1e-5, atol=1e-7)  # float32 kernels differ in order
