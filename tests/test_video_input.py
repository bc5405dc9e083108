"""The Qwen2.5-VL video path (card ``qwen_video_input.md``): real mp4 files decoded by qwen-vl-utils with decord,
processor calls without a second resize, grids, ``second_per_grid_ts``, 3-D positions, per-frame layout groups,
option checks, and corrupt / unreadable videos (done-when 7).

Expected numbers are worked out by hand in the comments from qwen-vl-utils' rules (``smart_nframes``,
``smart_resize``) and transformers' ``get_rope_index``.
"""

import json

import numpy as np
import pytest
import torch

import tokenprune as tp
from conftest import tiny_vlm
from tokenprune.data.synthetic import SyntheticVideoQA
from tokenprune.engine.contract import VIDEO
from tokenprune.models import ModelInputError
from tokenprune.models.qwen25vl import Qwen25VLAdapter, check_video_options

FACTOR = 28  # the test architecture: patch 14 x merge 2


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 16-frame, 4 fps, 112 x 112 synthetic video written as a real H.264 mp4, and its source frames."""
    cache = tmp_path_factory.mktemp("videos")
    dataset = SyntheticVideoQA(limit=1, frames=16, fps=4.0, format="mp4", cache_dir=str(cache))
    frames = SyntheticVideoQA(limit=1, frames=16, fps=4.0, format="frames")[0].video.frames  # [16, 3, H, W]
    return dataset[0], frames


def prepare(vlm, sample, **options):
    vlm_options, vlm.options = vlm.options, {"video": options}
    try:
        return vlm.prepare(sample)
    finally:
        vlm.options = vlm_options


def positions(vlm, inputs):
    return vlm.adapter.outer_model(vlm.model).get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"])[0][:, 0]  # [3, L]


@pytest.mark.parametrize("options,indices,side,spgt", [
    # fps 2 (qwen-vl-utils' default): n = 16 / 4 fps x 2 = 8 frames, linspace(0, 15, 8).round();
    # 112 x 112 is below min_pixels = 128 x 28^2: scaled by sqrt(100352 / 12544) = 2.83 -> ceil(11.3) x 28 = 336;
    # sampled fps = 8 / 16 x 4 = 2 -> second_per_grid_ts = 2 / 2 = 1.0
    ({}, [0, 2, 4, 6, 9, 11, 13, 15], 336, 1.0),
    # nframes 4: linspace(0, 15, 4).round() = [0, 5, 10, 15]; min = max = 112^2 keeps 112; sampled fps 1 -> 2.0
    ({"nframes": 4, "min_pixels": 112 * 112, "max_pixels": 112 * 112}, [0, 5, 10, 15], 112, 2.0),
    # fps 4: all 16 frames; sampled fps 4 -> 0.5
    ({"fps": 4.0, "min_pixels": 3136, "max_pixels": 112 * 112}, list(range(16)), 112, 0.5),
])
def test_mp4_frames_grid_and_time_steps(clip, options, indices, side, spgt):
    sample, source = clip
    vlm = tiny_vlm("tiny_qwen25vl")
    frames, metadata, _ = Qwen25VLAdapter._load_video(sample.video, check_video_options(options), FACTOR)
    assert metadata["frames_indices"] == indices and metadata["video_backend"] == "decord"
    assert metadata["total_num_frames"] == 16 and metadata["fps"] == pytest.approx(4.0)
    n = len(indices)
    assert tuple(frames.shape) == (n, 3, side, side)
    if side == 112:  # not resized: the decoded frames are the synthetic frames (lossy H.264, crf 12)
        error = (frames - torch.as_tensor(source[indices]).float()).abs().mean()
        assert float(error) < 4.0

    inputs = prepare(vlm, sample, **options)
    grid = [n // 2, side // 14, side // 14]
    assert inputs["video_grid_thw"].tolist() == [grid]  # the processor kept the frames (no second resize)
    merged = side // FACTOR
    pads = int((inputs["input_ids"] == vlm.model.config.video_token_id).sum())
    assert pads == grid[0] * grid[1] * grid[2] // 4 == n // 2 * merged * merged
    assert float(inputs["second_per_grid_ts"][0]) == pytest.approx(spgt)
    assert abs(float(inputs["second_per_grid_ts"][0]) - 2 / 24) > 0.01  # never the fps-less 24 fps fallback

    layout = inputs.layout
    assert len(layout.groups) == n // 2
    assert all(g.kind == VIDEO and (g.rows, g.cols) == (merged, merged) and g.frame == i
               for i, g in enumerate(layout.groups))
    rows = layout.visual_rows()
    assert torch.equal(layout.group[rows], torch.arange(n // 2).repeat_interleave(merged * merged))
    # 3-D positions: t = s + floor(k * tokens_per_second * second_per_grid_ts), h = s + r, w = s + c
    thw = positions(vlm, inputs)[:, rows].view(3, n // 2, merged, merged)
    s = int(rows[0])  # all text before the video is 1-D, so the video starts at its row index
    k = torch.arange(n // 2).view(-1, 1, 1)
    step = vlm.model.config.vision_config.tokens_per_second * spgt
    assert torch.equal(thw[0], (s + torch.floor(k * step).long()).expand(-1, merged, merged))
    assert torch.equal(thw[1], (s + torch.arange(merged).view(1, -1, 1)).expand(n // 2, -1, merged))
    assert torch.equal(thw[2], (s + torch.arange(merged).view(1, 1, -1)).expand(n // 2, merged, -1))


def test_decoded_frames_path_matches_the_mp4_path(clip):
    """The same 4 frames given as VideoFrames (fps / indices metadata) give the same grid, step and layout."""
    sample, source = clip
    vlm = tiny_vlm("tiny_qwen25vl")
    from_file = prepare(vlm, sample, nframes=4, min_pixels=112 * 112, max_pixels=112 * 112)
    decoded = tp.Sample(id="f", question=sample.question, video=tp.VideoFrames(
        frames=source[[0, 5, 10, 15]], fps=4.0, frame_indices=[0, 5, 10, 15], total_frames=16))
    from_frames = prepare(vlm, decoded)
    for key in ("input_ids", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids"):
        assert torch.equal(from_file[key], from_frames[key]), key
    assert torch.equal(positions(vlm, from_file), positions(vlm, from_frames))


def test_processor_resizing_would_change_the_grid(clip):
    """Why do_resize=False: 336 px frames are above the tiny processor's max_pixels (168^2), so a second resize
    would shrink them to 168 px (grid 12 x 12 instead of 24 x 24)."""
    sample, _ = clip
    vlm = tiny_vlm("tiny_qwen25vl")
    frames, metadata, _ = Qwen25VLAdapter._load_video(sample.video, {}, FACTOR)
    text = "<|vision_start|> <|video_pad|> <|vision_end|> what ?"
    resized = vlm.processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                            return_tensors="pt")
    assert resized["video_grid_thw"].tolist() == [[4, 12, 12]]
    kept = vlm.processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                         do_resize=False, return_tensors="pt")
    assert kept["video_grid_thw"].tolist() == [[4, 24, 24]]


@pytest.mark.parametrize("content,pattern", [
    (b"\x00garbage" * 100, "cannot read video .*bad.mp4: RuntimeError: Error reading"),
    (b"", "cannot read video .*bad.mp4"),
    ("truncated", "cannot read video .*bad.mp4: DECORDError"),
])
def test_corrupt_video_raises_a_model_input_error_naming_the_file(clip, tmp_path, content, pattern):
    sample, _ = clip
    path = tmp_path / "bad.mp4"
    if content == "truncated":
        data = open(sample.video, "rb").read()
        content = data[: int(len(data) * 0.9)]  # the moov atom survives, the last frames do not
    path.write_bytes(content)
    vlm = tiny_vlm("tiny_qwen25vl")
    with pytest.raises(ModelInputError, match=pattern):
        vlm.prepare(tp.Sample(id="bad", question="what ?", video=str(path)))


def test_missing_video_and_bad_frames_raise_model_input_errors(tmp_path):
    vlm = tiny_vlm("tiny_qwen25vl")
    with pytest.raises(ModelInputError, match="video file not found: .*missing.mp4"):
        vlm.prepare(tp.Sample(id="m", question="what ?", video=str(tmp_path / "missing.mp4")))
    with pytest.raises(ModelInputError, match="video file not found"):
        vlm.prepare(tp.Sample(id="d", question="what ?", video=str(tmp_path)))  # a directory
    odd = tp.VideoFrames(frames=np.zeros((4, 3, 100, 112), dtype=np.uint8), fps=4.0, frame_indices=[0, 1, 2, 3],
                         total_frames=4)
    with pytest.raises(ModelInputError, match="multiples of 28 px .* got 100x112"):
        vlm.prepare(tp.Sample(id="o", question="what ?", video=odd))
    flat = tp.VideoFrames(frames=np.zeros((4, 112, 112), dtype=np.uint8), fps=4.0, frame_indices=[0, 1, 2, 3],
                          total_frames=4)
    with pytest.raises(ModelInputError, match="must be \\[n, 3, H, W\\]"):
        vlm.prepare(tp.Sample(id="f", question="what ?", video=flat))


def test_too_many_frames_reports_the_readers_reason(clip):
    sample, _ = clip
    vlm = tiny_vlm("tiny_qwen25vl")
    with pytest.raises(ModelInputError, match="nframes should in interval \\[2, 16\\], but got 40"):
        prepare(vlm, sample, nframes=40)


@pytest.mark.parametrize("options,pattern", [
    ({"fps": 2.0, "nframes": 8}, "give fps or nframes, not both"),
    ({"fps": 0}, "model.video.fps must be a positive number"),
    ({"nframes": 1}, "model.video.nframes must be an integer >= 2"),
    ({"nframes": 2.5}, "model.video.nframes must be an integer >= 2"),
    ({"min_pixels": "big"}, "model.video.min_pixels must be an integer >= 1"),
    ({"min_pixels": 50176, "max_pixels": 12544}, "model.video.min_pixels=50176 exceeds model.video.max_pixels=12544"),
    ({"max_pixels": 224 * 224}, "max_pixels=50176 is below the default min_pixels .*100352.*set model.video.min_pixels"),
])
def test_bad_video_options_are_refused_before_decoding(clip, options, pattern):
    sample, _ = clip
    vlm = tiny_vlm("tiny_qwen25vl")
    with pytest.raises(ValueError, match=pattern):
        prepare(vlm, sample, **options)


def test_runner_records_an_unreadable_video_as_an_error_and_goes_on(clip, tmp_path):
    """Done-when 7 through the runner: a corrupt and a missing video are recorded with their errors; the good
    video is run with PruneVid and scored."""
    from hydra import compose, initialize_config_module

    from tokenprune.run.results import read_records
    from tokenprune.run.runner import run_benchmark

    sample, _ = clip
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    rows = [{"id": "good", "question": sample.question, "answer": sample.answer, "video": sample.video},
            {"id": "corrupt", "question": "what ?", "answer": "left", "video": "corrupt.mp4"},
            {"id": "missing", "question": "what ?", "answer": "left", "video": "missing.mp4"}]
    data = tmp_path / "videos.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = tmp_path / "out"
    with initialize_config_module("tokenprune.conf", version_base=None):
        cfg = compose("config", overrides=[
            f"run.output_dir={out}", "run.progress=false", "run.max_new_tokens=2", "run.paired=false",
            "model=tiny_qwen25vl",
            "model.video.nframes=4", "model.video.min_pixels=12544", "model.video.max_pixels=12544",
            "dataset=jsonl", f"dataset.path={data}", "method=prunevid", "method.stage2_layer=2"])
    run_benchmark(cfg)
    records = {record["id"]: record for record in read_records(out)}
    assert sorted(records) == ["corrupt", "good", "missing"]
    assert "cannot read video" in records["corrupt"]["error"] and "corrupt.mp4" in records["corrupt"]["error"]
    assert records["corrupt"]["runs"] == {}
    assert "video file not found" in records["missing"]["error"] and records["missing"]["runs"] == {}
    good = records["good"]
    assert good["error"] is None
    run = good["runs"]["prunevid(stage2_layer=2)"]
    assert run["error"] is None and run["score"] in (0.0, 1.0)
    stats = run["method_stats"]  # 4 frames at 112 px on the tiny model (patch 7): 2 groups of 8 x 8 tokens
    assert run["visual_tokens_original"] == 128 and stats["prunevid_stage1_tokens"] <= 128
    assert stats["prunevid_stage2_tokens"] < stats["prunevid_stage1_tokens"]
