"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``: windowed ViT + 2x2 merger + Qwen2 decoder, 3-D mRoPE)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from ..data.sample import Sample, VideoFrames
from ..engine.layout import TokenLayout, VisualSpec
from .base import Inputs, ModelAdapter, ModelInputError, register_adapter
from .images import load_images

VIDEO_OPTION_KEYS = ("fps", "nframes", "min_pixels", "max_pixels", "min_frames", "max_frames", "total_pixels")
VIDEO_MIN_TOKENS = 128  # qwen-vl-utils' default minimum of LLM tokens per frame (min_pixels = 128 x factor^2)
VIDEO_READER = "decord"  # qwen-vl-utils' reader; torchvision 0.29 has no read_video, torchcodec needs FFmpeg libraries


def check_video_options(options: dict | None) -> dict:
    """The video-reading options that are set (``model.video.*``), checked; raises ValueError naming the field."""
    options = {key: value for key, value in (options or {}).items() if key in VIDEO_OPTION_KEYS and value is not None}
    for key, value in options.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "fps":
            if not number or not value > 0:
                raise ValueError(f"model.video.fps must be a positive number (frames sampled per second), got {value!r}")
        elif not number or int(value) != value or value < (2 if key == "nframes" else 1):
            minimum = 2 if key == "nframes" else 1
            raise ValueError(f"model.video.{key} must be an integer >= {minimum}, got {value!r}")
    if "fps" in options and "nframes" in options:
        raise ValueError("model.video: give fps or nframes, not both "
                         f"(got fps={options['fps']!r}, nframes={options['nframes']!r})")
    for low, high in (("min_pixels", "max_pixels"), ("min_frames", "max_frames")):
        if low in options and high in options and options[low] > options[high]:
            raise ValueError(f"model.video.{low}={options[low]} exceeds model.video.{high}={options[high]}")
    return options


@register_adapter
class Qwen25VLAdapter(ModelAdapter):
    family = "qwen25vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    rope = "mrope"
    visual_input_keys = ("image_grid_thw", "video_grid_thw", "position_ids")

    def check_options(self, options: dict | None) -> dict:
        return check_video_options(options)

    def vision_model(self, model):
        return model.model.visual

    def visual_specs(self, model, captured: dict | None) -> list[VisualSpec]:
        config = model.config
        merge = config.vision_config.spatial_merge_size
        input_ids = captured["input_ids"]
        has_image = bool((input_ids == config.image_token_id).any())
        has_video = bool((input_ids == config.video_token_id).any())
        if (has_image and captured.get("image_grid_thw") is None) or (has_video and captured.get("video_grid_thw") is None):
            # generate() encodes the pixels first and passes mm_encoder_outputs without the grids
            return self._specs_from_positions(config, input_ids, captured.get("position_ids"))
        image_grids = _grid_iterator(captured.get("image_grid_thw"), merge)
        video_grids = _grid_iterator(captured.get("video_grid_thw"), merge)
        specs = []
        for row in input_ids:
            specs.append(VisualSpec(
                image_token_id=config.image_token_id,
                video_token_id=config.video_token_id,
                image_grids=_take_grids(image_grids, int((row == config.image_token_id).sum()), "image"),
                video_grids=_take_grids(video_grids, int((row == config.video_token_id).sum()), "video"),
            ))
        return specs

    @staticmethod
    def _specs_from_positions(config, input_ids, position_ids) -> list[VisualSpec]:
        """Grids from the stock 3-D positions: each run of pads is one image / video; rows and columns are the
        spans of its h and w positions."""
        if position_ids is None or position_ids.dim() != 3:
            raise ModelInputError("Qwen2.5-VL call without image_grid_thw / video_grid_thw and without 3-D "
                                  "position_ids: tokenprune cannot find the visual grids")
        thw = position_ids[-3:]  # [3, B, L]
        specs = []
        for b, row in enumerate(input_ids):
            grids = {}
            for token_id in (config.image_token_id, config.video_token_id):
                runs = []
                is_pad = (row == token_id).tolist()
                start = None
                for i, flag in enumerate(is_pad + [False]):
                    if flag and start is None:
                        start = i
                    elif not flag and start is not None:
                        h, w = thw[1, b, start:i], thw[2, b, start:i]
                        rows, cols = int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1
                        runs.append(((i - start) // (rows * cols), rows, cols))
                        start = None
                grids[token_id] = tuple(runs)
            specs.append(VisualSpec(image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                                    image_grids=grids[config.image_token_id], video_grids=grids[config.video_token_id]))
        return specs

    def after_shortened_prefill(self, model, position_offset: int) -> None:
        # A manual decode forward computes positions as cache length + rope_deltas; the layer-0 cache is
        # shorter than the prompt by position_offset, so the deltas grow by as much.
        outer = self.outer_model(model)
        if getattr(outer, "rope_deltas", None) is not None:
            outer.rope_deltas = outer.rope_deltas + position_offset

    def prepare(self, processor, model, sample: Sample, options: dict | None = None) -> Inputs:
        options = check_video_options(options)
        content: list[dict] = []
        kwargs: dict = {}
        frame_size = None
        if sample.video is not None:
            if sample.images:
                raise ModelInputError("a sample has either images or a video, not both")
            vision = model.config.vision_config
            factor = vision.patch_size * vision.spatial_merge_size  # px per LLM token side
            video, metadata, video_item = self._load_video(sample.video, options, factor)
            frame_size = (len(video), *video.shape[-2:])
            content.append(video_item)
            # the frames are already resized to the patch grid: a second resize by the processor would change them
            kwargs.update(videos=[video], video_metadata=[metadata], do_resize=False, do_sample_frames=False)
        images = load_images(sample.images)
        content += [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": sample.question})  # visual inputs before the question
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        if images:
            kwargs["images"] = images
        encoded = processor(text=[text], return_tensors="pt", **kwargs)
        if frame_size is not None:
            _check_video_grid(encoded["video_grid_thw"][0].tolist(), frame_size, model.config.vision_config, sample)
        inputs = Inputs(encoded)
        spec = self.visual_specs(model, dict(inputs))[0]
        inputs.layout = TokenLayout.from_input_ids(inputs["input_ids"][0], spec)
        return inputs

    def training_video_inputs(self, samples: list[Sample], options: dict | None = None) -> dict:
        """Processor kwargs for a batch of video samples (one video each), as ``prepare`` passes them."""
        loaded = [self._load_video(s.video, check_video_options(options)) for s in samples]
        return {"videos": [frames for frames, _, _ in loaded], "video_metadata": [meta for _, meta, _ in loaded],
                "do_resize": False, "do_sample_frames": False}

    @staticmethod
    def _load_video(video, options: dict, factor: int = 28):
        """Frames ``[n, 3, H, W]`` (float 0-255, H and W multiples of ``factor`` = patch x merge) + metadata for the
        processor, from a file (qwen-vl-utils with the decord reader) or already decoded ``VideoFrames``."""
        if isinstance(video, VideoFrames):
            frames = torch.as_tensor(np.asarray(video.frames)).float()
            if frames.dim() != 4 or frames.shape[1] != 3:
                raise ModelInputError(f"VideoFrames.frames must be [n, 3, H, W], got {tuple(frames.shape)}")
            height, width = frames.shape[-2:]
            if height % factor or width % factor:
                raise ModelInputError(f"video frames must be multiples of {factor} px (patch x merge), "
                                      f"got {height}x{width}")
            metadata = {"fps": video.fps, "frames_indices": list(video.frame_indices),
                        "total_num_frames": video.total_frames}
            return frames, metadata, {"type": "video"}
        path = str(video)
        if not path.startswith(("http://", "https://")) and not Path(path.removeprefix("file://")).is_file():
            raise ModelInputError(f"video file not found: {path}")
        minimum = VIDEO_MIN_TOKENS * factor * factor  # qwen-vl-utils' default min_pixels
        if options.get("max_pixels", minimum) < options.get("min_pixels", minimum):
            raise ValueError(f"model.video.max_pixels={options['max_pixels']} is below the default min_pixels "
                             f"({VIDEO_MIN_TOKENS} tokens = {minimum} px for this model): "
                             "set model.video.min_pixels too")
        item = {"type": "video", "video": path, **options}
        process_vision_info = _qwen_vl_utils()
        try:  # qwen-vl-utils resizes to multiples of image_patch_size x 2 (its fixed spatial merge)
            _, videos, _ = process_vision_info([{"role": "user", "content": [item]}], return_video_kwargs=True,
                                               return_video_metadata=True, image_patch_size=factor // 2)
        except Exception as error:  # decoders raise many types for a corrupt file
            raise ModelInputError(f"cannot read video {path}: {_first_cause(error)}") from error
        frames, metadata = videos[0]
        return frames, metadata, {"type": "video"}


def _qwen_vl_utils():
    """qwen-vl-utils' ``process_vision_info`` with the decord reader (the reader is chosen once, at import)."""
    if not os.environ.get("FORCE_QWENVL_VIDEO_READER"):  # unset, or empty (which it would take as a reader name)
        os.environ["FORCE_QWENVL_VIDEO_READER"] = VIDEO_READER
    from qwen_vl_utils import process_vision_info, vision_process

    if vision_process.get_video_reader_backend() != os.environ["FORCE_QWENVL_VIDEO_READER"]:
        raise RuntimeError("qwen_vl_utils was imported before tokenprune set FORCE_QWENVL_VIDEO_READER="
                           f"{VIDEO_READER}; set it in the environment before importing qwen_vl_utils")
    return process_vision_info


def _first_cause(error: BaseException) -> str:
    """The reader's own error: qwen-vl-utils retries a failed read with torchvision, whose error (torchvision 0.29
    has no ``read_video``) would hide the real reason; that reason is the first exception of the chain."""
    while error.__context__ is not None:
        error = error.__context__
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def _check_video_grid(grid: list[int], frame_size: tuple[int, int, int], vision, sample: Sample) -> None:
    """The processor must keep the frames as read: grid = (ceil(n / 2), H / patch, W / patch)."""
    frames, height, width = frame_size
    expected = [-(-frames // vision.temporal_patch_size), height // vision.patch_size, width // vision.patch_size]
    if grid != expected:
        raise ModelInputError(f"video of sample {sample.id}: the processor produced grid {grid} for {frames} frames "
                              f"of {height}x{width} px, expected {expected} (was it resized twice?)")


def _grid_iterator(grid_thw, merge: int):
    if grid_thw is None:
        return iter(())
    return iter([(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()])


def _take_grids(grids, token_count: int, kind: str) -> tuple[tuple[int, int, int], ...]:
    taken, total = [], 0
    while total < token_count:
        grid = next(grids, None)
        if grid is None:
            raise ModelInputError(f"{token_count} {kind} tokens in input_ids but too few {kind} grids")
        taken.append(grid)
        total += grid[0] * grid[1] * grid[2]
    if total != token_count:
        raise ModelInputError(f"{kind} grids {taken} need {total} tokens, input_ids has {token_count}")
    return tuple(taken)
