"""DivPrune's pure algorithm (issue 18, phase 1): the card's hand case, a plain-loop reference written from the
card's definition (float64, Python lists), the official recompute-the-minimum loop, ties, duplicates, edges."""

import math

import pytest
import torch

from tokenprune.methods._budget import budget_count
from tokenprune.methods.divprune import CosineDistanceRows, DivPrune, cosine_distances, divprune_select


def reference_divprune(features, count):
    """Picks in order: the largest nearest-neighbour distance first, then argmax of the min distance to the picks."""
    n = len(features)
    norms = [math.sqrt(sum(x * x for x in row)) for row in features]
    dist = [[1 - sum(a * b for a, b in zip(features[i], features[j])) / (norms[i] * norms[j]) for j in range(n)]
            for i in range(n)]
    count = min(count, n)
    if count == 0:
        return []
    if n == 1:
        return [0]
    nearest = [sorted(dist[i][j] for i in range(n))[1] for j in range(n)]  # 2nd smallest of column j
    picks = [max(range(n), key=lambda j: (nearest[j], -j))]
    while len(picks) < count:
        score = [min(dist[s][j] for s in picks) if j not in picks else -math.inf for j in range(n)]
        picks.append(max(range(n), key=lambda j: (score[j], -j)))  # first index on ties
    return picks


def official_loop(distances, count):
    """The official loop: the minimum over all kept rows recomputed at every step, kept tokens not masked."""
    picks = []
    for i in range(count):
        if i == 0:
            scores = torch.topk(distances, 2, dim=0, largest=False).values[1]
        else:
            scores = distances[torch.tensor(picks)].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return picks


def test_hand_case_four_unit_vectors():
    # 0, 10, 90 and 180 degrees: nearest-neighbour distances 1 - cos 10, 1 - cos 10, 1 - cos 80, 1 (180 degrees)
    angles = [0.0, 10.0, 90.0, 180.0]
    features = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])[None]
    picks = divprune_select(cosine_distances(features), 3)
    assert picks.tolist() == [[3, 0, 2]]  # 180 (isolated, 1), then 0 (distance 2), then 90 (min(1, 1) = 1)
    assert DivPrune().keep_rows(features, 3).tolist() == [[0, 2, 3]]


@pytest.mark.parametrize("n_tokens", [2, 3, 5, 7, 9])
def test_equals_the_plain_loop_reference(n_tokens):
    generator = torch.Generator().manual_seed(n_tokens)
    for trial in range(5):
        features = torch.randn(n_tokens, 4, generator=generator, dtype=torch.float64)
        for count in range(n_tokens + 2):
            picks = divprune_select(cosine_distances(features[None], torch.float64), count)[0].tolist()
            assert picks == reference_divprune(features.tolist(), count), (trial, count)


def test_float32_default_equals_the_reference_on_well_separated_features():
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(2, 30, 16, generator=generator)
    picks = divprune_select(cosine_distances(features), 12)
    for b in range(2):
        assert picks[b].tolist() == reference_divprune(features[b].double().tolist(), 12)


def test_running_minimum_equals_the_official_recompute_loop():
    generator = torch.Generator().manual_seed(3)
    for n_tokens, count in [(40, 10), (64, 30), (20, 20)]:
        features = torch.randn(1, n_tokens, 8, generator=generator)
        distances = cosine_distances(features)
        assert divprune_select(distances, count)[0].tolist() == official_loop(distances[0], count)


def test_distances_are_exactly_symmetric_with_the_self_distance_on_the_diagonal():
    features = 3 + torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(4))
    distances = cosine_distances(features)
    assert torch.equal(distances, distances.transpose(1, 2))
    assert distances.diagonal(dim1=1, dim2=2).abs().max() < 1e-6


def test_ties_go_to_the_lowest_index_and_duplicates_are_never_repeated():
    # all rows identical: every distance is 0, so the picks are 0, 1, 2, ... and never repeat
    same = torch.ones(1, 6, 3)
    assert divprune_select(cosine_distances(same), 6).tolist() == [[0, 1, 2, 3, 4, 5]]
    # two clusters of duplicates and one lone token: the lone token first, then the first row of a cluster
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, -1.0]])[None]
    picks = divprune_select(cosine_distances(features), 5)[0].tolist()
    assert picks[:3] == [4, 0, 2] and sorted(picks) == list(range(5))


def test_edges():
    features = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(5))
    distances = cosine_distances(features)
    assert divprune_select(distances, 0).shape == (1, 0)
    assert sorted(divprune_select(distances, 50)[0].tolist()) == list(range(5))  # clamped to N, a permutation
    assert divprune_select(cosine_distances(torch.randn(1, 1, 3)), 3).tolist() == [[0]]
    zero_row = features.clone()
    zero_row[0, 2] = 0  # officially NaN distances; here distance 1 to everything
    picks = divprune_select(cosine_distances(zero_row), 5)
    assert sorted(picks[0].tolist()) == list(range(5))


def test_batched_pools_equal_each_pool_alone():
    features = torch.randn(4, 24, 6, generator=torch.Generator().manual_seed(6))
    batched = divprune_select(cosine_distances(features), 9)
    for b in range(4):
        assert torch.equal(batched[b], divprune_select(cosine_distances(features[b:b + 1]), 9)[0])


@pytest.mark.parametrize("block_bytes", [1, 200, None])
def test_distances_without_the_full_matrix(block_bytes):
    """The method never builds the N x N matrix (issue 17's memory rule): rows on demand and nearest-neighbour
    distances in tiles of any size equal ``cosine_distances`` up to rounding, the nearest-neighbour distances are
    exactly symmetric (mutual nearest neighbours tie exactly), and the picks equal the full matrix's."""
    features = torch.randn(3, 30, 5, generator=torch.Generator().manual_seed(11))
    full = cosine_distances(features)
    lean = CosineDistanceRows(features, block_bytes=block_bytes)
    everything = torch.arange(30).expand(3, -1)
    torch.testing.assert_close(lean.rows(everything), full, rtol=0, atol=1e-6)
    nearest = lean.nearest()
    torch.testing.assert_close(nearest, full.topk(2, dim=1, largest=False).values[:, 1], rtol=0, atol=1e-6)
    partner = (full + torch.eye(30) * 10).argmin(dim=1)  # [3, 30]: each token's nearest neighbour
    mutual = partner.gather(1, partner) == torch.arange(30)
    assert mutual.any()
    assert torch.equal(nearest[mutual], nearest.gather(1, partner)[mutual])  # exact ties between mutual neighbours
    for count in (1, 9, 30):
        assert torch.equal(divprune_select(lean, count), divprune_select(full, count))


def test_duplicates_without_the_full_matrix_never_repeat_an_index():
    features = torch.randn(1, 24, 4, generator=torch.Generator().manual_seed(12))
    features[0, 12:] = features[0, :12]  # every token twice
    picks = divprune_select(CosineDistanceRows(features, block_bytes=64), 24)[0].tolist()
    assert sorted(picks) == list(range(24))


def test_config_counts_and_model_dtype():
    assert budget_count(576, DivPrune().budget) == 56  # the official round(0.098 * 576)
    features = torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    assert cosine_distances(features, torch.bfloat16).dtype == torch.bfloat16
    kept = DivPrune(sim_dtype="model").keep_rows(features, 5)
    assert kept.shape == (1, 5) and torch.equal(kept, kept.sort().values) and kept.unique().numel() == 5


@pytest.mark.parametrize("fields,message", [
    ({"budget": 2.0}, r"divprune.budget must be an integer >= 1 \(tokens\), a float in \(0, 1\]"),
    ({"budget": 0}, r"divprune.budget must be an integer >= 1 \(tokens\), a float in \(0, 1\]"),
    ({"scope": "image"}, r"divprune.scope must be one of \['sample', 'group'\], got 'image'"),
    ({"sim_dtype": "float16"}, r"divprune.sim_dtype must be one of \['float32', 'model'\]"),
    ({"positions": "original"}, r"divprune.positions must be one of \['auto', 'keep', 'reindex'\]"),
])
def test_validation_names_the_field_and_the_allowed_values(fields, message):
    with pytest.raises(ValueError, match=message):
        DivPrune(**fields)


def check_device(device: str):
    features = torch.randn(3, 144, 128, generator=torch.Generator().manual_seed(10))
    on_device = cosine_distances(features.to(device))
    assert torch.equal(on_device, on_device.transpose(1, 2))  # cuBLAS need not give a symmetric X X^T by itself
    picks = divprune_select(on_device, 40).cpu()
    assert torch.equal(picks, divprune_select(cosine_distances(features), 40))


@pytest.mark.gpu
def test_cuda_distances_are_symmetric_and_picks_equal_cpu():
    check_device("cuda")
