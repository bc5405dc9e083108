"""CDPruner's pure algorithm (issue 18, phase 1): greedy MAP against brute-force determinants and Schur
complements (float64), the card's hand cases, the relevance sign and range, the numerical guard, the CLIP text
chunks on a tiny random CLIP pair (offline), validation."""

import pytest
import torch
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

from tokenprune.methods._budget import budget_count
from tokenprune.methods.cdpruner import (CDPruner, ConditionalKernel, RELEVANCE_EPSILON, cdpruner_relevance,
                                         clip_image_embeds, clip_text_chunks, clip_text_embeds, conditional_kernel,
                                         dpp_greedy_map)


def random_psd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n + 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T  # full rank


def schur_complement(kernel: torch.Tensor, chosen: list[int], j: int) -> float:
    if not chosen:
        return float(kernel[j, j])
    s = torch.tensor(chosen)
    return float(kernel[j, j] - kernel[j, s] @ torch.linalg.solve(kernel[s][:, s], kernel[s, j]))


# ---------------------------------------------------------------------------------------------------------
# brute force (card §8 test 2)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens", [2, 4, 6, 8])
def test_each_pick_maximises_the_determinant_and_its_gain_is_the_schur_complement(n_tokens):
    for seed in range(4):
        kernel = random_psd(n_tokens, seed * 10 + n_tokens)
        result = dpp_greedy_map(kernel[None], n_tokens)
        chosen = []
        for step, pick in enumerate(result.picks[0].tolist()):
            candidates = [j for j in range(n_tokens) if j not in chosen]
            determinants = {j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]])) for j in candidates}
            best = max(candidates, key=lambda j: (determinants[j], -j))
            assert pick == best, (seed, step)
            assert float(result.gains[0, step]) == pytest.approx(schur_complement(kernel, chosen, pick), rel=1e-9)
            chosen.append(pick)
            # det L_S = product of the gains so far
            assert float(result.gains[0, :step + 1].prod()) == pytest.approx(
                float(torch.linalg.det(kernel[chosen][:, chosen])), rel=1e-9)
        assert int(result.guarded[0]) == 0


def test_conditional_kernel_is_relevance_times_cosine_times_relevance():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 7, 5, generator=generator, dtype=torch.float64)
    relevance = torch.rand(2, 7, generator=generator, dtype=torch.float64)
    kernel = conditional_kernel(features, relevance)
    assert kernel.dtype == torch.float32
    for b in range(2):
        for i in range(7):
            for j in range(7):
                cosine = float(features[b, i] @ features[b, j] / (features[b, i].norm() * features[b, j].norm()))
                assert float(kernel[b, i, j]) == pytest.approx(float(relevance[b, i] * relevance[b, j]) * cosine,
                                                               rel=1e-5, abs=1e-6)
    assert torch.equal(conditional_kernel(features, None), conditional_kernel(features, torch.ones(2, 7)))


@pytest.mark.parametrize("with_relevance", [True, False])
def test_kernel_rows_on_demand_equal_the_full_kernel(with_relevance):
    """CDPruner never builds the N x N kernel (issue 17's memory rule): ``ConditionalKernel``'s diagonal and rows
    equal ``conditional_kernel`` up to float32 rounding (another summation order; the unconditional diagonal,
    which decides the first pick, exactly on this CPU BLAS), and the greedy picks and gains over either are the
    same."""
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(3, 300, 32, generator=generator)  # rank 32 > 12 picks; N > DIAGONAL_TILE
    relevance = torch.rand(3, 300, generator=generator) if with_relevance else None
    full = conditional_kernel(features, relevance)  # [3, 40, 40]
    lean = ConditionalKernel(features, relevance)
    assert lean.shape == full.shape and lean.dtype == full.dtype
    torch.testing.assert_close(lean.diagonal(), torch.diagonal(full, dim1=1, dim2=2), rtol=0, atol=1e-6)
    for index in ([0, 5, 299], [17, 17, 2]):
        index = torch.tensor(index)
        torch.testing.assert_close(lean.row(index), full[torch.arange(3), index], rtol=0, atol=1e-6)
    # without relevance every diagonal entry is 1 up to rounding: the first pick follows the product's rounding
    assert torch.equal(lean.diagonal(), torch.diagonal(full, dim1=1, dim2=2)) or with_relevance
    on_demand, matrix = dpp_greedy_map(lean, 12, relevance), dpp_greedy_map(full, 12, relevance)
    assert torch.equal(on_demand.picks, matrix.picks)
    torch.testing.assert_close(on_demand.gains, matrix.gains, rtol=1e-4, atol=1e-6)


def test_batched_groups_equal_each_group_alone():
    kernels = torch.stack([random_psd(9, seed) for seed in range(3)])
    batched = dpp_greedy_map(kernels, 5)
    for b in range(3):
        alone = dpp_greedy_map(kernels[b:b + 1], 5)
        assert torch.equal(batched.picks[b], alone.picks[0])
        assert torch.equal(batched.gains[b], alone.gains[0])


# ---------------------------------------------------------------------------------------------------------
# hand cases (card §8 test 3)
# ---------------------------------------------------------------------------------------------------------
def test_identity_similarity_picks_in_descending_relevance_lower_index_on_ties():
    features = torch.eye(5)[None]  # S = I
    relevance = torch.tensor([[0.5, 0.9, 0.5, 0.2, 0.9]])
    result = dpp_greedy_map(conditional_kernel(features, relevance), 5)
    assert result.picks.tolist() == [[1, 4, 0, 2, 3]]
    torch.testing.assert_close(result.gains, relevance[:, [1, 4, 0, 2, 3]] ** 2)  # d_j = r_j^2 on S = I


def test_first_pick_is_the_most_relevant_token():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(3, 10, 6, generator=generator)
    relevance = torch.rand(3, 10, generator=generator)
    picks = dpp_greedy_map(conditional_kernel(features, relevance), 1).picks
    assert torch.equal(picks[:, 0], relevance.argmax(dim=-1))


def test_two_identical_tokens_are_never_both_picked_while_another_token_has_a_gain():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, 6, 8, generator=generator)
    features[0, 4] = features[0, 1]
    result = dpp_greedy_map(conditional_kernel(features, None), 5)  # r constant: 5 independent directions
    picks = result.picks[0].tolist()
    assert not {1, 4} <= set(picks) and len(set(picks)) == 5 and int(result.guarded[0]) == 0


# ---------------------------------------------------------------------------------------------------------
# the numerical guard (card §8 test 5)
# ---------------------------------------------------------------------------------------------------------
def test_guard_on_a_rank_one_kernel():
    # L = 1 1^T: after the first pick every gain is exactly 0; officially 0 / sqrt(0) = NaN and repeated picks
    kernel = torch.ones(1, 4, 4, dtype=torch.float64)
    fallback = torch.tensor([[0.1, 0.3, 0.3, 0.2]])
    result = dpp_greedy_map(kernel, 4, fallback)
    assert result.picks.tolist() == [[0, 1, 2, 3]]  # 0 by the DPP, then the fallback order 1, 2 (tie: lower), 3
    assert result.guarded.tolist() == [3]
    assert torch.isnan(result.gains[0, 1:]).all() and float(result.gains[0, 0]) == 1.0


def test_guard_with_duplicated_tokens_keeps_exactly_t_distinct_rows_and_leaves_other_groups_alone():
    generator = torch.Generator().manual_seed(4)
    duplicated = torch.randn(1, 3, 4, generator=generator).repeat(1, 3, 1)  # 9 tokens, 3 directions
    distinct = torch.randn(1, 9, 12, generator=generator)
    features = torch.cat([duplicated, torch.zeros(1, 9, 8)], dim=-1)
    features = torch.cat([features, distinct])  # [2, 9, 12]
    relevance = torch.rand(2, 9, generator=generator)
    result = dpp_greedy_map(conditional_kernel(features, relevance), 9, relevance)
    for b in range(2):
        assert sorted(result.picks[b].tolist()) == list(range(9))
    assert int(result.guarded[0]) > 0
    alone = dpp_greedy_map(conditional_kernel(features[1:], relevance[1:]), 9, relevance[1:])
    assert torch.equal(result.picks[1], alone.picks[0]) and int(result.guarded[1]) == int(alone.guarded[0])
    kept, guarded = CDPruner(relevance="none").keep_rows(features[:1], None, 9)
    assert kept.tolist() == [list(range(9))] and guarded.tolist() == [0]  # budget >= N: no DPP at all
    kept, guarded = CDPruner(relevance="none").keep_rows(features[:1], None, 8)
    assert kept.shape == (1, 8) and kept.unique().numel() == 8 and int(guarded[0]) > 0


# ---------------------------------------------------------------------------------------------------------
# relevance (card §8 test 4)
# ---------------------------------------------------------------------------------------------------------
def test_relevance_sign_and_range():
    generator = torch.Generator().manual_seed(5)
    image = torch.randn(1, 6, 5, generator=generator, dtype=torch.float64)
    text = image[0, 3:4].clone()  # the text equals token 3's image embedding
    negative = cdpruner_relevance(image, text, sign=-1.0)
    positive = cdpruner_relevance(image, text, sign=+1.0)
    assert int(negative.argmin()) == 3 and int(positive.argmax()) == 3
    cosine = torch.nn.functional.cosine_similarity(image[0], text, dim=-1)
    span = float(cosine.max() - cosine.min())
    assert float(positive.min()) == pytest.approx(RELEVANCE_EPSILON / span, rel=1e-6)
    assert float(positive.max()) == pytest.approx(1 + RELEVANCE_EPSILON / span, rel=1e-6)
    expected = (cosine - cosine.min() + RELEVANCE_EPSILON) / span
    # float32 relevance vs the float64 reference: a few float32 ulps of values in [0, 1]
    torch.testing.assert_close(positive[0].double(), expected, rtol=1e-6, atol=3e-7)


def test_relevance_min_max_spans_every_group_of_the_image_and_averages_the_text_rows():
    generator = torch.Generator().manual_seed(6)
    image = torch.randn(2, 4, 3, generator=generator)
    text = torch.randn(3, 3, generator=generator)
    joint = cdpruner_relevance(image, text, sign=-1.0)
    raw = -(torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T).mean(-1)
    torch.testing.assert_close(joint, (raw - raw.min() + RELEVANCE_EPSILON) / (raw.max() - raw.min()))
    assert not torch.equal(joint[1:], cdpruner_relevance(image[1:], text, sign=-1.0))  # not per group


def test_constant_relevance_and_theta():
    image = torch.ones(1, 4, 3)
    assert torch.equal(cdpruner_relevance(image, torch.randn(2, 3)), torch.ones(1, 4))  # officially 1e-6 / 0
    generator = torch.Generator().manual_seed(7)
    image, text = torch.randn(1, 5, 3, generator=generator), torch.randn(1, 3, generator=generator)
    base = cdpruner_relevance(image, text, sign=1.0)
    torch.testing.assert_close(cdpruner_relevance(image, text, sign=1.0, theta=0.5), torch.exp(0.5 * base))


# ---------------------------------------------------------------------------------------------------------
# CLIP text and image embeddings (card §8 test 6)
# ---------------------------------------------------------------------------------------------------------
def test_a_200_token_question_is_three_zero_padded_chunks():
    ids = torch.arange(1, 201)[None]
    chunks = clip_text_chunks(ids)
    assert chunks["input_ids"].shape == chunks["attention_mask"].shape == (3, 77)
    assert torch.equal(chunks["input_ids"].flatten()[:200], ids[0])
    assert (chunks["input_ids"].flatten()[200:] == 0).all() and chunks["attention_mask"].flatten()[200:].sum() == 0
    assert chunks["attention_mask"].flatten()[:200].sum() == 200
    assert clip_text_chunks(torch.arange(77)[None])["input_ids"].shape == (1, 77)  # exactly one chunk
    assert clip_text_chunks(torch.arange(78)[None])["input_ids"].shape == (2, 77)
    with pytest.raises(ValueError, match=r"one tokenised text \[1, len\]"):
        clip_text_chunks(torch.zeros(2, 5, dtype=torch.long))


def test_tiny_random_clip_pair_runs_offline():
    torch.manual_seed(0)
    text_model = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=1, num_attention_heads=2,
                                                            max_position_embeddings=77, projection_dim=16)).eval()
    ids = torch.randint(3, 300, (1, 200), generator=torch.Generator().manual_seed(1))
    embeds = clip_text_embeds(text_model, ids)
    assert embeds.shape == (3, 16)
    chunks = clip_text_chunks(ids)
    with torch.no_grad():
        for m in range(3):  # each chunk encoded on its own
            alone = text_model(input_ids=chunks["input_ids"][m:m + 1],
                               attention_mask=chunks["attention_mask"][m:m + 1]).text_embeds[0]
            torch.testing.assert_close(embeds[m], alone, rtol=1e-5, atol=1e-6)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=28, patch_size=14,
                                                            projection_dim=16)).eval()
    with torch.no_grad():
        out = vision(pixel_values=torch.randn(1, 3, 28, 28), output_hidden_states=True)
    # the image embedding of the CLS through the same norm and projection equals CLIP's own image_embeds
    cls = clip_image_embeds(vision.vision_model.post_layernorm, vision.visual_projection, out.last_hidden_state[:, :1])
    torch.testing.assert_close(cls[:, 0], out.image_embeds, rtol=1e-5, atol=1e-6)
    patches = clip_image_embeds(vision.vision_model.post_layernorm, vision.visual_projection,
                                out.hidden_states[-2][:, 1:])
    assert patches.shape == (1, 4, 16) and patches.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------
def test_resolved_relevance_and_sign():
    assert (CDPruner().resolved_relevance(), CDPruner().resolved_sign()) == ("llm", 1.0)
    clip = CDPruner(clip_path="openai/clip-vit-large-patch14-336")
    assert (clip.resolved_relevance(), clip.resolved_sign()) == ("clip", -1.0)  # official
    assert CDPruner(relevance_sign=-1).resolved_sign() == -1.0
    assert budget_count(576, CDPruner().budget) == 128  # the default fraction: 128 of LLaVA-1.5's 576
    assert CDPruner(clip_path="x").needs_vision_signals and not CDPruner().needs_vision_signals


@pytest.mark.parametrize("fields,message", [
    ({"budget": 1.5}, r"cdpruner.budget must be an integer >= 1 \(tokens\), a float in \(0, 1\]"),
    ({"relevance": "text"}, r"cdpruner.relevance must be one of \['auto', 'clip', 'llm', 'none'\], got 'text'"),
    ({"relevance": "clip"}, "cdpruner.relevance=clip needs clip_path"),
    ({"relevance_sign": 0}, "cdpruner.relevance_sign must be -1, 1 or null, got 0"),
    ({"relevance_sign": True}, "cdpruner.relevance_sign must be -1, 1 or null, got True"),
    ({"theta": 1.0}, r"cdpruner.theta must be a number in \(0, 1\) or null, got 1.0"),
    ({"clip_path": ""}, "cdpruner.clip_path must be a checkpoint path / hub id or null"),
    ({"text_rows": "question"}, r"cdpruner.text_rows must be one of \['after_visual', 'all'\]"),
    ({"positions": "same"}, r"cdpruner.positions must be one of \['auto', 'keep', 'reindex'\]"),
])
def test_validation_names_the_field_and_the_allowed_values(fields, message):
    with pytest.raises(ValueError, match=message):
        CDPruner(**fields)
