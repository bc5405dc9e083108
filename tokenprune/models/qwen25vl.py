"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``: windowed ViT + 2x2 merger + Qwen2 decoder, 3-D mRoPE)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from ..data.sample import Sample, VideoFrames
from ..engine.layout import TokenLayout, VisualSpec
from .base import Inputs, ModelAdapter, ModelInputError, register_adapter
from .images import load_images

VIDEO_OPTION_KEYS = ("fps", "nframes", "min_pixels", "max_pixels", "min_frames", "max_frames", "total_pixels")


@register_adapter
class Qwen25VLAdapter(ModelAdapter):
    family = "qwen25vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    rope = "mrope"
    visual_input_keys = ("image_grid_thw", "video_grid_thw", "position_ids")

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
        options = dict(options or {})
        content: list[dict] = []
        kwargs: dict = {}
        if sample.video is not None:
            if sample.images:
                raise ModelInputError("a sample has either images or a video, not both")
            video, metadata, video_item = self._load_video(sample.video, options)
            content.append(video_item)
            kwargs.update(videos=[video], video_metadata=[metadata], do_resize=False, do_sample_frames=False)
        images = load_images(sample.images)
        content += [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": sample.question})  # visual inputs before the question
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        if images:
            kwargs["images"] = images
        encoded = processor(text=[text], return_tensors="pt", **kwargs)
        inputs = Inputs(encoded)
        spec = self.visual_specs(model, dict(inputs))[0]
        inputs.layout = TokenLayout.from_input_ids(inputs["input_ids"][0], spec)
        return inputs

    def training_video_inputs(self, samples: list[Sample], options: dict | None = None) -> dict:
        """Processor kwargs for a batch of video samples (one video each), as ``prepare`` passes them."""
        loaded = [self._load_video(s.video, dict(options or {})) for s in samples]
        return {"videos": [frames for frames, _, _ in loaded], "video_metadata": [meta for _, meta, _ in loaded],
                "do_resize": False, "do_sample_frames": False}

    @staticmethod
    def _load_video(video, options: dict):
        """Frames + metadata for the processor, from a file (qwen-vl-utils, decord) or decoded frames."""
        if isinstance(video, VideoFrames):
            frames = torch.as_tensor(video.frames).float()
            height, width = frames.shape[-2:]
            if height % 28 or width % 28:
                raise ModelInputError(f"video frames must be multiples of 28 px, got {height}x{width}")
            metadata = {"fps": video.fps, "frames_indices": list(video.frame_indices),
                        "total_num_frames": video.total_frames}
            return frames, metadata, {"type": "video"}
        path = str(video)
        if not path.startswith(("http://", "https://")) and not Path(path.removeprefix("file://")).exists():
            raise ModelInputError(f"video file not found: {path}")
        item = {"type": "video", "video": path}
        item.update({k: options[k] for k in VIDEO_OPTION_KEYS if options.get(k) is not None})
        if "fps" in item and "nframes" in item:
            raise ModelInputError("give video fps or nframes, not both")
        os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
        from qwen_vl_utils import process_vision_info

        try:
            _, videos, _ = process_vision_info([{"role": "user", "content": [item]}], return_video_kwargs=True,
                                               return_video_metadata=True)
        except Exception as error:  # decoders raise many types for a corrupt file
            raise ModelInputError(f"cannot read video {path}: {type(error).__name__}: {error}") from error
        frames, metadata = videos[0]
        return frames, metadata, {"type": "video"}


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
