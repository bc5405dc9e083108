"""VisionZip, VisPruner, DivPrune and CDPruner through the engine on every family (issue 18, the card §8 tests that
need a model): keeping everything gives the stock logits; the pruned prefill equals a reference that builds the
decoder input by hand from the plain-Python references of each card (``reference_*`` of the core tests) and the
vision signals (tested against eager attention in ``test_vision_signals.py``) and runs the stock decoder layers;
order, length and positions (re-packed on LLaVA, gathered on mRoPE); VisionZip's contextual tokens; two images and
two temporal groups equal separate runs; cached decoding equals recomputing the pruned prefill; batches; DivPrune's
scope; CDPruner's groups and its CLIP relevance; refusals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import tokenprune as tp
from conftest import hook_snapshot, make_image, make_sample, stock_logits, takes_video, tiny_vlm
from helpers import (batched_inputs, final_logits, forced_choice, forced_generation, layers_by_hand, prompt_so_far,
                     stock_decoder_call)
from test_divprune import reference_divprune
from test_vispruner import reference_vispruner
from test_visionzip import reference_visionzip
from tokenprune.engine.contract import PruningInputError
from tokenprune.engine.family import FamilySpec
from tokenprune.methods.base import Method
from tokenprune.models.vision_signals import VisionTrace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
METHODS = ("visionzip", "vispruner", "divprune", "cdpruner")
TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # merged rows: float32 sums in another order than the float64 references


@dataclass
class Recorded(Method):
    """Runs ``inner``'s ``before_llm`` and keeps what it saw and returned (test only)."""

    inner: Method = None
    name = "recorded"

    def __post_init__(self):
        self.seen = []

    @property
    def needs_vision_signals(self) -> bool:
        return self.inner.needs_vision_signals

    def validate(self, model):
        self.inner.validate(model)

    def before_llm(self, seq):
        reduction = self.inner.before_llm(seq)
        self.seen.append(seq.reduced(reduction))
        return reduction


def two_images(seed: int) -> tp.Sample:
    return tp.Sample(id=f"two{seed}", question="what colour is the square at the top left ?",
                     images=[make_image(seed), make_image(seed + 50)])


def video(frames: np.ndarray) -> tp.Sample:
    return tp.Sample(id="v", question="which direction does the red square move ?",
                     video=tp.VideoFrames(frames=frames, fps=2.0, frame_indices=list(range(len(frames))),
                                          total_frames=len(frames)))


def video_frames(seed: int, count: int = 4) -> np.ndarray:
    """``count`` random frames of 112 x 112: on the tiny Qwen models, count / 2 temporal steps of 4 x 4 tokens."""
    return (np.random.default_rng(seed).random((count, 3, 112, 112)) * 255).astype("uint8")


def signals(vlm, inputs):
    with VisionTrace(vlm.model, vlm.adapter.family) as trace, torch.no_grad():
        vlm.model(**inputs)
    return trace.groups()


def run(vlm, inputs, method):
    """Logits ``[L', V]`` and the prefill report of one forward under ``method``."""
    with torch.no_grad(), tp.apply(vlm.model, method) as session:
        logits = vlm.model(**inputs).logits[0]
    return logits, session.last_report


def reference_logits(vlm, inputs, entries: list, reindex: bool) -> torch.Tensor:
    """The stock decoder on a decoder input built by hand: ``entries`` lists, in order, a kept prompt row (an int:
    its embedding, positions and side inputs, e.g. Qwen3-VL's DeepStack features) or a new row ``(embedding [d],
    positions [P])``, or ``(embedding, positions, {layer: side input [d]})`` on a family with side inputs; positions
    contiguous when ``reindex``."""
    call = stock_decoder_call(vlm, inputs)
    embeds, positions = call["embeds"][0], call["positions"][0]  # [L, d], [P, L]
    rows = [embeds[e] if isinstance(e, int) else e[0].to(embeds.dtype) for e in entries]
    places = [positions[:, e] if isinstance(e, int) else e[1] for e in entries]
    side = {layer: torch.stack([values[0, e] if isinstance(e, int) else e[2][layer].to(values.dtype)
                                for e in entries])[None] for layer, values in call["side"].items()}  # [1, L', d]
    hidden, positions = torch.stack(rows)[None], torch.stack(places, dim=1)[None]  # [1, L', d], [1, P, L']
    if reindex:
        positions = torch.arange(hidden.shape[1])[None, None].expand(1, positions.shape[1], -1)
    with torch.no_grad():
        return final_logits(vlm, layers_by_hand(vlm, hidden, positions, side, range(len(vlm.adapter.layers(vlm.model)))))


def selection_entries(layout, kept_visual: list[int]) -> list[int]:
    """Every text row plus the kept visual rows, in order."""
    return sorted(layout.text_rows().tolist() + list(kept_visual))


def is_llava(vlm) -> bool:
    return vlm.adapter.family == "llava"


# ---------------------------------------------------------------------------------------------------------
# Keeping everything is the stock model (card §8: identity tests)
# ---------------------------------------------------------------------------------------------------------
IDENTITIES = [("visionzip", dict(budget=1.0)), ("visionzip", dict(include_cls=False, dominant=36, contextual=0)),
              ("visionzip", dict(dominant_ratio=1.0, contextual_ratio=0.05, include_cls=False)), ("vispruner", dict(budget=1.0)),
              ("vispruner", dict(budget=1000)), ("divprune", dict(budget=1.0)), ("divprune", dict(budget=1.0, scope="group")),
              ("cdpruner", dict(budget=1.0))]


@pytest.mark.parametrize("name,fields", IDENTITIES)
def test_keeping_everything_gives_the_stock_logits_at_prefill_and_every_decode_step(family, name, fields):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(60))
    with torch.no_grad():
        stock = vlm.model.generate(**inputs, **forced_generation(vlm, 3))
        with tp.apply(vlm.model, name, **fields) as session:
            pruned = vlm.model.generate(**inputs, **forced_generation(vlm, 3))
    assert torch.equal(pruned.sequences, stock.sequences)
    for step in range(3):
        assert torch.equal(pruned.logits[step], stock.logits[step])
    assert session.last_report.visual_entering_decoder == inputs.layout.num_visual


# ---------------------------------------------------------------------------------------------------------
# The pruned prefill equals a decoder input built by hand (order, length, positions)
# ---------------------------------------------------------------------------------------------------------
def test_vispruner_equals_the_plain_reference_on_the_right_features(family):
    """Card tests 4-6: the important set from the encoder's attention, the diverse set from the pre-projector CLIP
    patches (LLaVA: a case where projected and raw cosines disagree) or the LLM embeddings (Qwen); survivors in
    raster order at re-packed (LLaVA) / gathered 3-D (Qwen) positions."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(61))
    layout = inputs.layout
    visual = layout.visual_rows()
    group = signals(vlm, inputs)[0]
    embeds = stock_decoder_call(vlm, inputs)["embeds"][0, visual]
    features = group.features if group.features is not None else embeds
    kept = reference_vispruner(group.scores.tolist(), features.double().tolist(), 12, 0.5)
    logits, report = run(vlm, inputs, tp.methods.create("vispruner", budget=12))
    assert report.visual_entering_decoder == 12 and report.tokens_entering_decoder == layout.length - 24
    expected = reference_logits(vlm, inputs, selection_entries(layout, visual[kept].tolist()), is_llava(vlm))
    assert torch.equal(logits, expected)
    if group.features is not None:  # the projected embeddings would keep another set
        assert reference_vispruner(group.scores.tolist(), embeds.double().tolist(), 12, 0.5) != kept


@pytest.mark.parametrize("positions", ["auto", "keep"])
def test_divprune_equals_the_plain_reference(family, positions):
    """Card test 6: ``keep`` gathers the original positions (every axis), ``reindex`` (auto on LLaVA) numbers the
    L' rows contiguously."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(62))
    layout = inputs.layout
    visual = layout.visual_rows()
    embeds = stock_decoder_call(vlm, inputs)["embeds"][0, visual]
    picks = sorted(reference_divprune(embeds.double().tolist(), 9))  # round(0.25 * 36)
    logits, report = run(vlm, inputs, tp.methods.create("divprune", budget=0.25, positions=positions))
    assert report.visual_entering_decoder == 9
    reindex = positions == "auto" and is_llava(vlm)
    expected = reference_logits(vlm, inputs, selection_entries(layout, visual[picks].tolist()), reindex)
    assert torch.equal(logits, expected)
    if is_llava(vlm):  # the positions matter: the other rule gives other logits
        other = reference_logits(vlm, inputs, selection_entries(layout, visual[picks].tolist()), not reindex)
        assert not torch.equal(logits, other)


def reference_dpp(features: torch.Tensor, relevance: torch.Tensor | None, count: int) -> list[int]:
    """Greedy MAP by brute force (determinants in float64): each pick maximises det L[S + j], first index on ties.
    S as the card says: rows normalised in their dtype (float32 here), the cosine in float32 (its diagonal is 1 up
    to rounding, which decides the unconditional DPP's first pick)."""
    unit = features / features.norm(dim=-1, keepdim=True)
    kernel = (unit @ unit.T).double()
    if relevance is not None:
        kernel = relevance.double()[:, None] * kernel * relevance.double()[None]
    chosen = []
    for _ in range(count):
        dets = [float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]])) if j not in chosen else -np.inf
                for j in range(kernel.shape[0])]
        chosen.append(int(np.argmax(dets)))
    return sorted(chosen)


def llm_relevance(visual: torch.Tensor, text: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """The card's relevance by hand (float64): mean cosine to the text rows, min-max with 1e-6 in the numerator."""
    v = visual.double() / visual.double().norm(dim=-1, keepdim=True)
    t = text.double() / text.double().norm(dim=-1, keepdim=True)
    raw = sign * (v @ t.T).mean(dim=-1)
    return (raw - raw.min() + 1e-6) / (raw.max() - raw.min())


@pytest.mark.parametrize("relevance", ["llm", "none"])
def test_cdpruner_equals_brute_force_determinants(family, relevance):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(63))
    layout = inputs.layout
    visual = layout.visual_rows()
    embeds = stock_decoder_call(vlm, inputs)["embeds"][0]
    r = llm_relevance(embeds[visual], embeds[layout.text_after_visual_rows()]) if relevance == "llm" else None
    picks = reference_dpp(embeds[visual], r, 8)
    logits, report = run(vlm, inputs, tp.methods.create("cdpruner", budget=8, relevance=relevance))
    assert report.visual_entering_decoder == 8 and report.stats.get("cdpruner_dpp_fallbacks") == 0
    expected = reference_logits(vlm, inputs, selection_entries(layout, visual[picks].tolist()), is_llava(vlm))
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("positions", ["auto", "keep"])
def test_visionzip_equals_the_plain_reference(family, positions):
    """Card tests 3 and 4. LLaVA: ``[CLS, dominant ascending, contextual]`` with the CLS and the contextual tokens
    through the projector (``projector(ctx)``, not a mix of projected rows); re-packed positions, or (``keep``) the
    CLS at the image's first row and each contextual token at its target's. Qwen: dominant and target rows in order,
    each target's row replaced by ``ctx`` merged from the LLM embeddings, at the target's 3-D position."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(64))
    layout = inputs.layout
    visual = layout.visual_rows().tolist()
    call = stock_decoder_call(vlm, inputs)
    positions_of = call["positions"][0]
    group = signals(vlm, inputs)[0]
    llava = group.features is not None
    fields = dict(dominant=10, contextual=3) if llava else dict(dominant_ratio=0.5, contextual_ratio=0.1)
    values = group.features if llava else call["embeds"][0, visual]
    dominant = 9 if llava else 18  # LLaVA: the CLS counts in the 10
    chosen, targets, members, merged = reference_visionzip(group.scores.tolist(), group.keys.double().tolist(),
                                                           values.double().tolist(), dominant, 3)
    merged = torch.tensor(merged, dtype=torch.float32)
    logits, report = run(vlm, inputs, tp.methods.create("visionzip", positions=positions, **fields))
    before, after = [r for r in layout.text_rows().tolist() if r < visual[0]], \
        [r for r in layout.text_rows().tolist() if r > visual[-1]]
    if llava:
        project = vlm.model.model.multi_modal_projector
        with torch.no_grad():
            cls, contextual = project(group.cls_feature[None])[0], project(merged)
        entries = (before + [(cls, positions_of[:, visual[0]])] + [visual[i] for i in chosen]
                   + [(contextual[j], positions_of[:, visual[t]]) for j, t in enumerate(targets)] + after)
        # projector(ctx) is not the same mix of the projected rows
        weights = [[1.0] + [1 / len(group_members)] * len(group_members) for group_members in members]
        mixed = torch.stack([sum(w * call["embeds"][0, visual[i]] for w, i in zip(ws, [t] + m))
                             for ws, t, m in zip(weights, targets, members)])
        assert not torch.allclose(contextual, mixed, rtol=1e-2, atol=1e-3)
    else:
        # each side input (Qwen3-VL's DeepStack levels) merged as the embeddings: the same members and weights
        side = {layer: torch.tensor(reference_visionzip(group.scores.tolist(), group.keys.double().tolist(),
                                                        values[0, visual].double().tolist(), dominant, 3)[3])
                for layer, values in call["side"].items()}  # {layer: [3, d]}
        kept = sorted(chosen + targets)
        entries = before + [(merged[targets.index(i)], positions_of[:, visual[i]],
                             {layer: rows[targets.index(i)] for layer, rows in side.items()})
                            if i in targets else visual[i] for i in kept] + after
    assert report.visual_entering_decoder == (1 + 9 + 3 if llava else 18 + 3)
    expected = reference_logits(vlm, inputs, entries, positions == "auto" and llava)
    torch.testing.assert_close(logits, expected, **TOLERANCE)


# ---------------------------------------------------------------------------------------------------------
# Budgets count every emitted token; several groups
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_an_integer_budget_is_the_visual_tokens_of_the_sample(family, name):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(two_images(65))
    _, report = run(vlm, inputs, tp.methods.create(name, budget=13))  # 7 + 6 over two images of 36
    assert report.visual_entering_decoder == 13
    assert report.tokens_entering_decoder == inputs.layout.length - 72 + 13


def group_cells(seen) -> list[list[int]]:
    """The visual cells each group kept (merged rows: -1), per group of the reduced layout."""
    layout = seen.layout
    return [layout.cell[layout.group == g].tolist() for g in range(len(layout.groups))]


def separate_inputs(vlm, use_video: bool):
    """A sample with two visual groups, and the two samples holding one of them each."""
    if use_video:
        frames = video_frames(66)
        return vlm.prepare(video(frames)), [vlm.prepare(video(frames[:2])), vlm.prepare(video(frames[2:]))]
    sample = two_images(66)
    return vlm.prepare(sample), [vlm.prepare(tp.Sample(id=str(i), question=sample.question, images=[image]))
                                 for i, image in enumerate(sample.images)]


SEPARATE = [("visionzip", dict(budget=20)), ("visionzip", dict(dominant=8, contextual=2)),
            ("vispruner", dict(budget=20)), ("divprune", dict(budget=20, scope="group")),
            ("cdpruner", dict(budget=20, relevance="none"))]


@pytest.mark.parametrize("use_video", [False, True], ids=["two_images", "two_temporal_groups"])
@pytest.mark.parametrize("name,fields", SEPARATE)
def test_two_groups_equal_separate_runs(family, name, fields, use_video):
    if use_video and not takes_video(family):
        pytest.skip("the family takes no video")
    vlm = tiny_vlm(family)
    together, alone = separate_inputs(vlm, use_video)
    half = dict(fields, budget=fields["budget"] // 2) if "budget" in fields else fields
    cells = []
    for inputs, method_fields in [(together, fields)] + [(one, half) for one in alone]:
        recorded = Recorded(tp.methods.create(name, **method_fields))
        run(vlm, inputs, recorded)
        cells.append(group_cells(recorded.seen[0]))
    assert len(cells[0]) == 2 and cells[0] == cells[1] + cells[2]
    assert all(len(c) == 10 for c in cells[0])


def test_divprune_scope_sample_is_one_pool_and_group_one_pool_per_group(family):
    """Card test 7: with two images, ``sample`` draws its count from one pool; ``group`` splits it by group size."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(two_images(67))
    visual = inputs.layout.visual_rows()
    embeds = stock_decoder_call(vlm, inputs)["embeds"][0, visual]
    pooled = visual[sorted(reference_divprune(embeds.double().tolist(), 18))].tolist()
    per_group = [visual[g * 36 + i].item() for g in range(2)
                 for i in sorted(reference_divprune(embeds[g * 36:(g + 1) * 36].double().tolist(), 9))]
    assert pooled != sorted(per_group)  # the two scopes differ on this sample
    for scope, kept in (("sample", pooled), ("group", sorted(per_group))):
        recorded = Recorded(tp.methods.create("divprune", budget=0.25, scope=scope))
        run(vlm, inputs, recorded)
        layout = recorded.seen[0].layout
        assert layout.original[layout.is_visual].tolist() == kept, scope


def test_cdpruner_relevance_spans_the_groups_of_one_video_and_each_group_keeps_its_share(family, monkeypatch):
    """Card test 8 on a video: the DPP per temporal group, the relevance min-max over the whole video."""
    if not takes_video(family):
        pytest.skip("the family takes no video")
    import tokenprune.methods.cdpruner as cdpruner

    vlm = tiny_vlm(family)
    inputs = vlm.prepare(video(video_frames(68)))
    layout = inputs.layout
    embeds = stock_decoder_call(vlm, inputs)["embeds"][0]
    rows = [layout.group_rows(g) for g in range(len(layout.groups))]
    assert len(rows) == 2 and all(r.numel() == 16 for r in rows)
    text = embeds[layout.text_after_visual_rows()]
    joint = llm_relevance(embeds[torch.cat(rows)], text).split(16)  # min-max over the whole video
    expected = [rows[g][reference_dpp(embeds[rows[g]], joint[g], 5)].tolist() for g in range(2)]
    used = []
    original = cdpruner.dpp_greedy_map
    monkeypatch.setattr(cdpruner, "dpp_greedy_map", lambda kernel, count, order: used.append(order) or
                        original(kernel, count, order))
    recorded = Recorded(tp.methods.create("cdpruner", budget=10, relevance="llm"))
    run(vlm, inputs, recorded)
    reduced = recorded.seen[0].layout
    assert [reduced.original[reduced.group == g].tolist() for g in range(2)] == expected  # 5 each
    own = [llm_relevance(embeds[rows[g]], text) for g in range(2)]  # a min-max per group
    for g in range(2):  # the relevance each DPP ran with: the video's joint min-max, not the group's own
        torch.testing.assert_close(used[g][0].double(), joint[g], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(used[g][0].double(), own[g], rtol=1e-3, atol=1e-4) for g in range(2))


# ---------------------------------------------------------------------------------------------------------
# Decoding, batches
# ---------------------------------------------------------------------------------------------------------
DECODING = [("visionzip", dict(budget=12)), ("visionzip", dict(budget=12, positions="keep")),
            ("vispruner", dict(budget=12)), ("divprune", dict(budget=12)), ("divprune", dict(budget=12, positions="keep")),
            ("cdpruner", dict(budget=12, relevance="none"))]


@pytest.mark.parametrize("name,fields", DECODING)
def test_cached_decoding_equals_recomputing_the_pruned_prefill(family, name, fields):
    """Re-packed positions decode from L'; kept ones from the unpruned prompt length (Qwen: rope_deltas)."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(69))
    steps = 3
    with torch.no_grad(), tp.apply(vlm.model, name, **fields):
        out = vlm.model.generate(**inputs, **forced_generation(vlm, steps))
    prompt_length = inputs["input_ids"].shape[1]
    for step in range(steps):
        extended = prompt_so_far(inputs, out.sequences, step)
        with torch.no_grad(), tp.apply(vlm.model, name, **fields):
            recomputed = vlm.model(**extended, use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[step], recomputed, **TOLERANCE)
        assert forced_choice(vlm, recomputed) == int(out.sequences[0, prompt_length + step])


@pytest.mark.parametrize("name", METHODS)
def test_an_unpadded_batch_equals_each_sample_alone_and_a_padded_one_is_refused(family, name):
    """DivPrune card test 8 (and the other three): vision signals map onto each sample's groups."""
    vlm = tiny_vlm(family)
    samples = [make_sample(70), make_sample(71)]
    batch = batched_inputs(vlm, samples)
    method = tp.methods.create(name, budget=12)
    with torch.no_grad(), tp.apply(vlm.model, method):
        together = vlm.model(**batch).logits[:, -1]
        alone = torch.cat([vlm.model(**vlm.prepare(s)).logits[:, -1] for s in samples])
    torch.testing.assert_close(together, alone, **TOLERANCE)
    padded = dict(batch, attention_mask=batch["attention_mask"].clone())
    padded["attention_mask"][0, 0] = 0
    with torch.no_grad(), tp.apply(vlm.model, method):
        with pytest.raises(PruningInputError, match="padded batches are not supported"):
            vlm.model(**padded)


# ---------------------------------------------------------------------------------------------------------
# Vision signals through apply: only when asked, fresh at every prefill, refused where a family has none
# ---------------------------------------------------------------------------------------------------------
def test_vision_hooks_only_for_methods_that_need_them_and_fresh_captures_every_prefill(family):
    vlm = tiny_vlm(family)
    vision = vlm.adapter.vision_model(vlm.model)
    before = hook_snapshot(vision)
    first, second = vlm.prepare(make_sample(72)), vlm.prepare(make_sample(73))
    with torch.no_grad(), tp.apply(vlm.model, "divprune"):
        assert hook_snapshot(vision) == before  # DivPrune reads no vision signals: no hooks
    method = tp.methods.create("vispruner", budget=12)
    expected = [run(vlm, inputs, method)[0] for inputs in (first, second)]
    with torch.no_grad(), tp.apply(vlm.model, method):
        assert hook_snapshot(vision) != before
        # a stray encoder call that no prefill consumes ...
        if is_llava(vlm):
            vision(first["pixel_values"])
        else:
            vision(first["pixel_values"], grid_thw=first["image_grid_thw"])
        got = [vlm.model(**inputs).logits[0] for inputs in (first, second)]  # ... is dropped by the next forward
        generated = vlm.model.generate(**second, **forced_generation(vlm, 2))  # encodes before its first forward
    assert hook_snapshot(vision) == before
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    torch.testing.assert_close(generated.logits[0], expected[1][-1:], **TOLERANCE)


def test_a_family_without_vision_signals_refuses_before_any_model_work(family, monkeypatch):
    vlm = tiny_vlm(family)
    monkeypatch.setattr(type(vlm.adapter), "vision_signal_source", FamilySpec.vision_signal_source)
    before = hook_snapshot(vlm.model)
    with pytest.raises(ValueError, match=f"vision signals not available for family '{vlm.adapter.family}'"):
        with tp.apply(vlm.model, "visionzip"):
            pass
    assert hook_snapshot(vlm.model) == before
    with tp.apply(vlm.model, "divprune"):  # a method that reads none still runs
        pass


def test_reindexed_positions_are_refused_on_mrope_before_any_model_work(family):
    vlm = tiny_vlm(family)
    for name in METHODS:
        method = tp.methods.create(name, positions="reindex")
        if is_llava(vlm):
            with tp.apply(vlm.model, method):
                pass
        else:
            with pytest.raises(ValueError, match=rf"{name}.positions='reindex' \(contiguous re-numbering\) is not "
                                                 "defined for the qwen"):
                with tp.apply(vlm.model, method):
                    pass


# ---------------------------------------------------------------------------------------------------------
# CDPruner's official CLIP relevance (LLaVA): a tiny random CLIP checkpoint, offline
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP checkpoint whose vision width matches the tiny LLaVA tower's (its visual_projection takes the tower's
    patches), with the tiny word-level tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    vlm = tiny_vlm("tiny_llava")
    tokenizer = vlm.processor.tokenizer
    width = vlm.model.config.vision_config.hidden_size
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                         eos_token_id=2),  # the legacy pooling at the highest id
                        vision_config=dict(hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14),
                        projection_dim=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_cdpruner_clip_relevance_is_the_negated_clip_similarity_to_the_question(tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    vlm = tiny_vlm("tiny_llava")
    sample = make_sample(74, question="what colour is the square at the top left ?")
    inputs = vlm.prepare(sample)
    layout = inputs.layout
    visual = layout.visual_rows()
    group = signals(vlm, inputs)[0]
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    ids = AutoTokenizer.from_pretrained(tiny_clip)(sample.question, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        text = clip.get_text_features(input_ids=ids)  # one chunk: the question is shorter than 77 tokens
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        image = clip.visual_projection(vlm.model.model.vision_tower.post_layernorm(group.features))  # [36, 16]
    relevance = llm_relevance(image, text, sign=-1.0)  # the official sign: least similar first
    embeds = stock_decoder_call(vlm, inputs)["embeds"][0]
    picks = reference_dpp(embeds[visual], relevance, 8)
    method = tp.methods.create("cdpruner", budget=8, clip_path=tiny_clip)
    assert method.resolved_relevance() == "clip" and method.needs_vision_signals
    with torch.no_grad(), tp.apply(vlm.model, method, questions=[sample.question]) as session:
        logits = vlm.model(**inputs).logits[0]
    assert session.last_report.visual_entering_decoder == 8
    assert torch.equal(logits, reference_logits(vlm, inputs, selection_entries(layout, visual[picks].tolist()), True))
    with torch.no_grad(), tp.apply(vlm.model, method):
        with pytest.raises(ValueError, match="relevance=clip needs the sample's question text"):
            vlm.model(**inputs)


def test_cdpruner_clip_relevance_is_refused_where_the_encoder_emits_no_clip_features(family, tiny_clip):
    vlm = tiny_vlm(family)
    if is_llava(vlm):
        pytest.skip("LLaVA's CLIP tower emits them (the official setting)")
    inputs = vlm.prepare(make_sample(75))
    with torch.no_grad(), tp.apply(vlm.model, "cdpruner", budget=8, clip_path=tiny_clip, questions=["q"]):
        with pytest.raises(ValueError, match="needs the CLIP tower's pre-projector features, which the "
                                             f"{vlm.adapter.family}"):
            vlm.model(**inputs)


def test_every_new_method_is_registered_with_official_defaults():
    assert set(METHODS) <= set(tp.methods.available())
    defaults = {name: dataclasses.asdict(tp.methods.create(name)) for name in METHODS}
    assert defaults["vispruner"]["budget"] == 64 and defaults["vispruner"]["important_ratio"] == 0.5
    assert defaults["divprune"]["budget"] == 0.098 and defaults["divprune"]["scope"] == "sample"
    assert defaults["cdpruner"]["budget"] == 0.222 and defaults["cdpruner"]["relevance"] == "auto"
    assert tp.methods.create("visionzip").counts(576, has_cls=True) == (True, 53, 10)
    assert tp.methods.create("visionzip").counts(1296, has_cls=False) == (False, 842, 64)
    assert all(defaults[name]["positions"] == "auto" for name in METHODS)


def test_the_runner_hands_each_sample_its_question():
    from tokenprune.run.measure import measure_generation

    vlm = tiny_vlm("tiny_llava")
    sample = make_sample(76, question="how many red squares are there ?")
    inputs = vlm.prepare(sample)
    assert inputs.questions == [sample.question]
    recorded = Recorded(tp.methods.create("divprune", budget=8))
    measure_generation(vlm, inputs, recorded, max_new_tokens=1)
    assert [seen.question for seen in recorded.seen] == [sample.question]
