"""PruneVid stage 1 (before the LLM): segments, static tokens, spatial merging, positions; done-when 1, 2, 5.

Unit tests build a TokenLayout and features by hand (no model); ``reference_stage1`` re-implements stage 1
with Python loops from the card (``reference_dpc_knn`` from test_dpc_knn, Python ``round``), independently of
the batched implementation. Model tests use the tiny random Qwen2.5-VL on synthetic videos.
"""

import math

import numpy as np
import pytest
import torch

import tokenprune as tp
from conftest import stock_logits, tiny_vlm
from test_dpc_knn import reference_dpc_knn
from tokenprune.engine.contract import TEXT, VIDEO, DecoderInput, TokenLayout, VisualSpec
from tokenprune.methods.prunevid import PART_META, SEGMENTS_META, keep_per_part, refine_segments

VIDEO_ID, TEXT_ID = 99, 5


# ----------------------------------------------------------------------------------------------------------
# Hand-built sequences
# ----------------------------------------------------------------------------------------------------------
def video_sequence(x: torch.Tensor, rows: int, cols: int, before: int = 3, after: int = 4, t_step: int = 2):
    """A [text][video T x (rows x cols)][text] sequence with Qwen2.5-VL-style 3-D positions.

    x: ``[T, N, C]``. Video token (k, r, c) gets (s + k * t_step, s + r, s + c) with s = ``before``; the text after
    the video continues from s + max(rows, cols) (the transformers 5.x rule).
    """
    T, N, C = x.shape
    ids = torch.tensor([TEXT_ID] * before + [VIDEO_ID] * (T * N) + [TEXT_ID] * after)
    layout = TokenLayout.from_input_ids(ids, VisualSpec(image_token_id=98, video_token_id=VIDEO_ID,
                                                        video_grids=((T, rows, cols),)))
    s = before
    k, r, c = torch.meshgrid(torch.arange(T), torch.arange(rows), torch.arange(cols), indexing="ij")
    video = torch.stack([s + k * t_step, s + r, s + c]).reshape(3, -1)  # [3, T*N]
    text_before = torch.arange(before).expand(3, -1)
    text_after = (s + max(rows, cols) + torch.arange(after)).expand(3, -1)
    positions = torch.cat([text_before, video, text_after], dim=1)[None]  # [1, 3, L]
    embeds = torch.cat([torch.randn(before, C, generator=torch.Generator().manual_seed(7)),
                        x.reshape(T * N, C),
                        torch.randn(after, C, generator=torch.Generator().manual_seed(8))])[None]
    return DecoderInput(embeds, positions, layout)


def scene(generator, N, C, static_cells, frames, wobble=0.01):
    """``[frames, N, C]``: cells in ``static_cells`` keep one vector (+ tiny noise), the others change every frame."""
    base = torch.randn(N, C, generator=generator)
    x = torch.randn(frames, N, C, generator=generator)
    x[:, static_cells] = base[static_cells] + wobble * torch.randn(frames, len(static_cells), C, generator=generator)
    return x


# ----------------------------------------------------------------------------------------------------------
# Reference stage 1 (loops, from the card)
# ----------------------------------------------------------------------------------------------------------
def reference_stage1(method, seq: DecoderInput):
    """Merged video tokens of a one-video sequence: (embeds [n, C] float64, positions [n][3], parts [n])."""
    layout = seq.layout
    rows = layout.visual_rows()
    T, N = len(layout.groups), layout.groups[0].size
    x = seq.embeds[0, rows].double().view(T, N, -1)
    P = seq.positions[0][:, rows].view(3, T, N).tolist()

    frame_means = x.mean(1)
    clusters = max(1, int(T * method.temporal_segment_ratio))
    noise = torch.rand(1, T, generator=torch.Generator().manual_seed(method.seed))[0]
    labels, *_ = reference_dpc_knn(frame_means, clusters, method.k, noise)
    lengths = refine_segments(labels)
    segments, begin = [], 0
    for width in lengths:
        segments.append(list(range(begin, begin + width)))
        begin += width

    blocks = []  # (order key, features of units [n][C], member (frame, cell) lists per unit, cells)
    rank = 0
    static_blocks, dynamic_blocks = [], []
    for frames in segments:
        W = len(frames)
        static = []
        for cell in range(N):
            if W == 1:
                continue
            total = 0.0
            for w in frames:
                for t in frames:
                    if w != t:
                        total += float(torch.nn.functional.cosine_similarity(x[w, cell], x[t, cell], dim=0))
            if total / (W * (W - 1)) > method.tau:
                static.append(cell)
        static_units = [(x[frames, cell].mean(0), [(t, cell) for t in frames], cell) for cell in static]
        static_blocks.append((rank, static_units))
        rank += 1
        for t in frames:
            dynamic_units = [(x[t, cell], [(t, cell)], cell) for cell in range(N) if cell not in static]
            dynamic_blocks.append((rank, dynamic_units))
            rank += 1
    spatial_noise_rows = [b for b in static_blocks + dynamic_blocks if b[1]]
    noise = torch.rand(len(spatial_noise_rows), N, generator=torch.Generator().manual_seed(method.seed))
    out = []
    for row, (block_rank, units) in enumerate(spatial_noise_rows):
        n = len(units)
        m = max(1, int(n * method.cluster_ratio)) if n >= method.min_cluster_tokens else n
        features = torch.stack([u[0] for u in units]).float()
        unit_labels, *_ = reference_dpc_knn(features, m, method.k, noise[row, :n])
        for cluster in range(m):
            members = [u for u, label in zip(units, unit_labels) if label == cluster]
            mean = torch.stack([u[0] for u in members]).double().mean(0)
            points = [(t, cell) for u in members for (t, cell) in u[1]]
            position = [round(sum(P[axis][t][cell] for t, cell in points) / len(points)) for axis in range(3)]
            first_cell = min(u[2] for u in members)
            out.append(((block_rank, first_cell), mean, position, block_rank))
    out.sort(key=lambda item: item[0])
    return (torch.stack([o[1] for o in out]), [o[2] for o in out], [o[3] for o in out], lengths)


def merged_part(result: DecoderInput) -> torch.Tensor:
    visual = result.layout.visual_rows()
    return result.layout.meta[PART_META][result.layout.original[visual]]


# ----------------------------------------------------------------------------------------------------------
# Unit tests
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels,lengths", [
    ([0, 0, 1, 0, 0, 0, 2, 2], [6, 2]),
    ([0, 1, 0, 1, 2, 2, 2, 3], [8]),
    ([0, 1, 2, 3], [4]),
    ([1, 1, 0, 0, 1, 1, 2, 2], [2, 2, 2, 2]),
    ([0, 0, 0, 1, 1, 0, 0, 0], [3, 2, 3]),
    ([5], [1]),
    ([0, 0, 1, 2, 2], [3, 2]),  # equal neighbours: the lone frame joins the left run
    ([1, 0, 0, 2, 3, 3, 3], [4, 3]),  # left run measured after its own fill (3, not 2): tie -> left
])
def test_run_refinement_examples_of_the_card(labels, lengths):
    assert refine_segments(labels) == lengths


def test_keep_per_part_floors_each_part_and_breaks_ties_by_row():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.2, 0.8, 0.3, 0.7, 0.6])
    part = torch.tensor([4, 4, 4, 4, 4, 9, 9, 2, 2])  # sizes 5, 2, 2 -> floor(0.5 n) = 2, 1, 1
    kept = keep_per_part(scores, part, 0.5)
    # part 4: 0.9 (row 1), then 0.5 tie between rows 2 and 3 -> row 2; part 9: row 5; part 2: row 7
    assert kept.tolist() == [1, 2, 5, 7]
    assert keep_per_part(scores, part, 0.4).tolist() == [1, 2]  # floor(0.8) = 0 empties the two small parts


def test_static_similarity_equals_a_brute_force_loop():
    generator = torch.Generator().manual_seed(0)
    x = scene(generator, N=6, C=8, static_cells=[0, 2, 3], frames=5, wobble=0.3)
    method = tp.methods.create("prunevid", tau=0.0)
    segment_of_frame = torch.tensor([0, 0, 0, 1, 1])
    # the implementation thresholds mean_cos > tau; recover mean_cos by bisection-free probing of tau
    for tau in (-0.5, 0.0, 0.5, 0.9, 0.99):
        method.tau = tau
        static = method.static_mask(x, segment_of_frame, 2)
        for s, frames in enumerate(([0, 1, 2], [3, 4])):
            for cell in range(6):
                W = len(frames)
                total = sum(float(torch.nn.functional.cosine_similarity(x[w, cell].double(), x[t, cell].double(), dim=0))
                            for w in frames for t in frames if w != t)
                assert bool(static[s, cell]) == (total / (W * (W - 1)) > tau), (tau, s, cell)
    one_frame = method.static_mask(x[:1], torch.tensor([0]), 1)
    assert not one_frame.any() and not torch.isnan(one_frame.float()).any()  # W = 1: all dynamic, no NaN


def test_small_groups_pass_through_in_raster_order_and_15_become_7():
    method = tp.methods.create("prunevid", stage2=False)
    for rows, cols, expected in ((2, 7, 14), (3, 5, 7)):
        x = torch.randn(1, rows * cols, 16, generator=torch.Generator().manual_seed(rows))
        seq = video_sequence(x, rows, cols)
        out = seq.reduced(method.before_llm(seq))
        assert out.layout.num_visual == expected
        if expected == 14:  # one frame: no static tokens; 14 < min_cluster_tokens: unchanged, raster order
            assert torch.equal(out.embeds, seq.embeds) and torch.equal(out.positions, seq.positions)
            assert torch.equal(out.layout.cell, seq.layout.cell)


def test_tau_above_one_and_cluster_ratio_one_return_the_input_unchanged():
    generator = torch.Generator().manual_seed(1)
    x = torch.cat([scene(generator, 20, 8, list(range(20)), 4), scene(generator, 20, 8, list(range(20)), 4)])
    seq = video_sequence(x, 4, 5)
    out = seq.reduced(tp.methods.create("prunevid", tau=1.01, cluster_ratio=1.0, stage2=False).before_llm(seq))
    assert torch.equal(out.embeds, seq.embeds)
    assert torch.equal(out.positions, seq.positions)
    for name in ("kind", "group", "cell", "original"):
        assert torch.equal(getattr(out.layout, name), getattr(seq.layout, name)), name
    assert out.stats["prunevid_static_fraction"] == 0.0
    assert out.stats["prunevid_stage1_tokens"] == 8 * 20


def test_stage1_equals_the_loop_reference():
    generator = torch.Generator().manual_seed(2)
    # 8 temporal groups of a 4 x 5 grid: a hard cut after 4; in each scene 9 static cells, 11 dynamic ones
    x = torch.cat([scene(generator, 20, 12, [0, 1, 2, 5, 6, 7, 10, 11, 12], 4, wobble=0.05),
                   scene(generator, 20, 12, [3, 4, 8, 9, 13, 14, 18, 17, 19], 4, wobble=0.05)])
    seq = video_sequence(x, 4, 5)
    method = tp.methods.create("prunevid", stage2=False, min_cluster_tokens=10)
    out = seq.reduced(method.before_llm(seq))
    embeds, positions, parts, lengths = reference_stage1(method, seq)
    assert lengths == [4, 4] and out.layout.meta[SEGMENTS_META] == [[4, 4]]
    visual = out.layout.visual_rows()
    assert visual.tolist() == list(range(3, 3 + len(embeds)))  # text before and after unchanged
    torch.testing.assert_close(out.embeds[0, visual].double(), embeds, rtol=1e-6, atol=1e-6)  # float32 means
    assert out.positions[0][:, visual].T.tolist() == positions
    assert torch.equal(out.positions[0][:, :3], seq.positions[0][:, :3])
    assert torch.equal(out.positions[0][:, -4:], seq.positions[0][:, -4:])
    assert torch.equal(out.embeds[0, -4:], seq.embeds[0, -4:])
    assert merged_part(out).tolist() == parts
    # per segment: static 9 -> 9 (< 10 tokens, passed through), dynamic 11 -> int(5.5) = 5 per frame
    assert len(embeds) == 2 * (9 + 4 * 5)
    assert out.stats["prunevid_segments"] == 2
    assert out.stats["prunevid_static_fraction"] == pytest.approx(9 / 20)
    assert torch.all(out.layout.kind[visual] == VIDEO) and torch.all(out.layout.kind[:3] == TEXT)


def test_identical_frames_collapse_to_one_segment_of_static_tokens():
    x = torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(3)).expand(8, -1, -1).clone()
    seq = video_sequence(x, 4, 5, t_step=2)
    method = tp.methods.create("prunevid", stage2=False, cluster_ratio=1.0)
    out = seq.reduced(method.before_llm(seq))
    assert out.layout.meta[SEGMENTS_META] == [[8]]
    assert out.stats["prunevid_static_fraction"] == 1.0
    assert out.layout.num_visual == 20  # one static token per cell, no dynamic tokens
    visual = out.layout.visual_rows()
    # t ids of the segment: 3 + 2k, k = 0..7 -> mean 10 exactly; h, w: the cell's own
    assert out.positions[0, 0, visual].tolist() == [10] * 20
    assert out.positions[0, 1, visual].tolist() == [3 + c // 5 for c in range(20)]
    assert out.positions[0, 2, visual].tolist() == [3 + c % 5 for c in range(20)]
    torch.testing.assert_close(out.embeds[0, visual], x[0], rtol=0, atol=1e-6)  # mean of equal vectors
    # an odd step: t ids 3 + 3k -> mean 13.5 -> 14 (round half to even); 4 frames -> 3 + 3 * 1.5 = 7.5 -> 8
    for frames, t_step, expected in ((8, 3, 14), (4, 3, 8), (6, 1, 6)):
        seq = video_sequence(x[:frames], 4, 5, t_step=t_step)
        out = seq.reduced(method.before_llm(seq))
        assert out.positions[0, 0, out.layout.visual_rows()].unique().tolist() == [expected], (frames, t_step)


def test_hard_cut_gives_two_segments_at_the_cut():
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(1, 20, 8, generator=generator), torch.randn(1, 20, 8, generator=generator)
    for cut in (2, 3, 5):
        x = torch.cat([a.expand(cut, -1, -1), b.expand(8 - cut, -1, -1)])
        seq = video_sequence(x, 4, 5)
        out = seq.reduced(tp.methods.create("prunevid", stage2=False).before_llm(seq))
        assert out.layout.meta[SEGMENTS_META] == [[cut, 8 - cut]]
        assert out.stats["prunevid_segments"] == 2 and out.stats["prunevid_static_fraction"] == 1.0


def test_merged_positions_are_rounded_member_means_on_a_known_clustering():
    # one frame (no static tokens), 16 cells in 4 x 4, two exact feature values: left half vs right half
    x = torch.zeros(1, 16, 4)
    x[0, [c for c in range(16) if c % 4 < 2], 0] = 5.0
    x[0, [c for c in range(16) if c % 4 >= 2], 1] = 5.0
    seq = video_sequence(x, 4, 4, before=2)
    out = seq.reduced(tp.methods.create("prunevid", stage2=False, cluster_ratio=0.125).before_llm(seq))  # int(16/8) = 2
    visual = out.layout.visual_rows()
    assert visual.numel() == 2
    # left cluster: rows 0-3 (h = 2 + 0..3, mean 3.5 -> 4), columns 0-1 (w = 2 + 0..1, mean 2.5 -> 2); t = 2
    assert out.positions[0][:, visual].T.tolist() == [[2, 4, 2], [2, 4, 4]]
    assert out.layout.original[visual].tolist() == [2, 4]  # first members: cells 0 and 2
    assert out.layout.cell[visual].tolist() == [-1, -1]


# ----------------------------------------------------------------------------------------------------------
# On the tiny Qwen2.5-VL with a real video
# ----------------------------------------------------------------------------------------------------------
def video_sample(frames, fps=4.0, size=112, seed=0, question="which direction does the red square move ?"):
    array = np.asarray(frames, dtype=np.uint8)
    return tp.Sample(id=f"v{seed}", question=question,
                     video=tp.VideoFrames(frames=array, fps=fps, frame_indices=list(range(len(array))),
                                          total_frames=len(array)))


def random_frames(n, size=112, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, 3, size, size), dtype=np.uint8)


def test_stage1_identity_gives_the_stock_logits_exactly():
    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = vlm.prepare(video_sample(random_frames(8)))
    reference = stock_logits(vlm, inputs)
    with torch.no_grad(), tp.apply(vlm.model, "prunevid", tau=1.01, cluster_ratio=1.0, stage2=False) as session:
        logits = vlm.model(**inputs).logits
    assert torch.equal(logits, reference)  # same tokens, positions and kernels: bitwise equal
    assert session.last_report.stats["prunevid_stage1_tokens"] == inputs.layout.num_visual
    assert session.last_report.stats["prunevid_static_fraction"] == 0.0


def test_stage1_on_a_real_video_shortens_the_sequence_and_keeps_the_text():
    vlm = tiny_vlm("tiny_qwen25vl")
    frames = random_frames(8)
    frames[4:] = frames[0]  # temporal groups 2 and 3 repeat frame 0: static there
    inputs = vlm.prepare(video_sample(frames))
    captured = {}

    def spy(module, args, kwargs):
        captured.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

    layer0 = vlm.adapter.text_model(vlm.model).layers[0]
    with torch.no_grad(), tp.apply(vlm.model, "prunevid", stage2=False) as session:
        handle = layer0.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            vlm.model(**inputs)
        finally:
            handle.remove()
    report = session.last_report
    layout = inputs.layout
    n_text = layout.length - layout.num_visual
    assert report.tokens_entering_decoder == n_text + report.stats["prunevid_stage1_tokens"]
    assert report.layer_tokens == [report.tokens_entering_decoder] * 6
    assert report.stats["prunevid_stage1_tokens"] < layout.num_visual
    assert report.stats["prunevid_segments"] >= 1
    assert 0.0 <= report.stats["prunevid_static_fraction"] <= 1.0 and math.isfinite(report.overhead_ms)
    # the text before and after the video enters layer 0 unchanged (stock embeddings of its ids)
    visual = layout.visual_rows()
    before, after = int(visual[0]), layout.length - 1 - int(visual[-1])
    text_embeds = vlm.model.get_input_embeddings()(inputs["input_ids"])[0]
    hidden = captured["hidden"][0]
    assert hidden.shape[0] == report.tokens_entering_decoder
    assert torch.equal(hidden[:before], text_embeds[:before])
    assert torch.equal(hidden[-after:], text_embeds[-after:])


def test_batch_of_two_is_refused():
    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = vlm.prepare(video_sample(random_frames(4)))
    batch = {k: torch.cat([v, v]) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
             for k, v in inputs.items()}
    batch["pixel_values_videos"] = torch.cat([inputs["pixel_values_videos"]] * 2)
    batch["video_grid_thw"] = torch.cat([inputs["video_grid_thw"]] * 2)
    batch["second_per_grid_ts"] = torch.cat([inputs["second_per_grid_ts"]] * 2)
    for fields in ({"stage2_layer": 2}, {"stage1": False, "stage2_layer": 2}):
        with torch.no_grad(), tp.apply(vlm.model, "prunevid", **fields):
            with pytest.raises(ValueError, match="prunevid supports batch size 1 only"):
                vlm.model(**batch)


@pytest.mark.parametrize("fields,pattern", [
    ({"stage1": False, "stage2": False}, "stage1 and stage2 are both false"),
    ({"tau": float("nan")}, "prunevid.tau must be a finite number"),
    ({"cluster_ratio": 0}, "prunevid.cluster_ratio must be a number in \\(0, 1\\]"),
    ({"temporal_segment_ratio": 1.5}, "prunevid.temporal_segment_ratio must be a number in \\(0, 1\\]"),
    ({"stage2_keep": -0.1}, "prunevid.stage2_keep must be a number in \\(0, 1\\]"),
    ({"k": 0}, "prunevid.k must be an integer >= 1"),
    ({"min_cluster_tokens": 2.5}, "prunevid.min_cluster_tokens must be an integer >= 1"),
    ({"stage2_layer": -1}, "prunevid.stage2_layer must be an integer >= 0"),
    ({"score_attn": "eager"}, "prunevid.score_attn must be one of \\['prerope_nomask', 'standard'\\]"),
    ({"stage1": "yes"}, "prunevid.stage1 must be true or false"),
])
def test_bad_fields_are_refused(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        tp.methods.create("prunevid", **fields)


def test_stage2_layer_out_of_range_is_refused_before_model_work():
    vlm = tiny_vlm("tiny_qwen25vl")
    calls = []
    handle = vlm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="prunevid.stage2_layer=5 is out of range.*6 decoder layers.*0..4"):
            with tp.apply(vlm.model, "prunevid", stage2_layer=5):
                vlm.model(**vlm.prepare(video_sample(random_frames(4))))
    finally:
        handle.remove()
    assert calls == []
    with tp.apply(vlm.model, "prunevid", stage2_layer=5, stage2=False):  # stage 1 alone: no layer to check
        pass
