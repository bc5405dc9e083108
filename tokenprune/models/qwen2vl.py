"""Qwen2-VL (``Qwen2VLForConditionalGeneration``: ViT + 2x2 merger + Qwen2 decoder with 3-D mRoPE).

The worked example of ``docs/adding_a_model_family.md``. Beyond the Llama-style defaults of ``FamilySpec`` this
family provides:

* layout: one ``(t, rows, cols)`` grid per image / video from ``image_grid_thw`` / ``video_grid_thw`` (a 2x2 merge:
  rows = h / 2); inside ``generate`` the grids are gone and are read off the stock 3-D positions instead;
* RoPE: positions ``[B, 3, L]`` (t, h, w), tables from the model's own ``rotary_emb``, the stock loop fed
  ``[4, B, L]`` positions (a contiguous text row first), decode positions from ``rope_deltas`` (bumped after a
  pre-LLM reduction), no contiguous re-indexing (the official code defines it for 1-D RoPE only);
* processor options ``model.image.{min,max}_pixels`` and ``model.video.*`` (videos read by qwen-vl-utils);
* named models ``qwen2vl_2b`` / ``qwen2vl_7b`` and the tiny test architecture ``tiny_qwen2vl``.

Qwen2.5-VL (``qwen25vl.py``) and Qwen3-VL (``qwen3vl.py``) extend this class.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from ..data.sample import Sample, VideoFrames
from ..engine.contract import ModelInputError, VisualSpec
from .base import Inputs, ModelAdapter, ModelSpec, register_adapter, register_model
from .images import load_images
from .zoo.tiny import tiny_qwen_ids, tiny_qwen_processor, tiny_qwen_text

IMAGE_OPTION_KEYS = ("min_pixels", "max_pixels")
VIDEO_OPTION_KEYS = ("fps", "nframes", "min_pixels", "max_pixels", "min_frames", "max_frames", "total_pixels")
VIDEO_MIN_TOKENS = 128  # qwen-vl-utils' default minimum of LLM tokens per frame (min_pixels = 128 x factor^2)
VIDEO_READER = "decord"  # qwen-vl-utils' reader; torchvision 0.29 has no read_video, torchcodec needs FFmpeg libraries


# ---------------------------------------------------------------------------------------------------------
# Processor options (validated before any model work)
# ---------------------------------------------------------------------------------------------------------
def _check_integer(group: str, key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise ValueError(f"model.{group}.{key} must be an integer >= {minimum}, got {value!r}")


def check_video_options(options: dict | None) -> dict:
    """The video-reading options that are set (``model.video.*``), checked; raises ValueError naming the field."""
    options = {key: value for key, value in (options or {}).items() if key in VIDEO_OPTION_KEYS and value is not None}
    for key, value in options.items():
        if key == "fps":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"model.video.fps must be a positive number (frames sampled per second), got {value!r}")
        else:
            _check_integer("video", key, value, 2 if key == "nframes" else 1)
    if "fps" in options and "nframes" in options:
        raise ValueError("model.video: give fps or nframes, not both "
                         f"(got fps={options['fps']!r}, nframes={options['nframes']!r})")
    for low, high in (("min_pixels", "max_pixels"), ("min_frames", "max_frames")):
        if low in options and high in options and options[low] > options[high]:
            raise ValueError(f"model.video.{low}={options[low]} exceeds model.video.{high}={options[high]}")
    return options


def check_image_options(options: dict | None) -> dict:
    """The image resolution bounds that are set (``model.image.min_pixels`` / ``max_pixels``, in pixels; unset: the
    processor's own), checked; raises ValueError naming the field."""
    options = {key: value for key, value in (options or {}).items() if value is not None}
    for key, value in options.items():
        _check_integer("image", key, value, 1)
    if "min_pixels" in options and "max_pixels" in options and options["min_pixels"] > options["max_pixels"]:
        raise ValueError(f"model.image.min_pixels={options['min_pixels']} exceeds "
                         f"model.image.max_pixels={options['max_pixels']}")
    return options


# ---------------------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------------------
@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2vl"
    model_classes = (Qwen2VLForConditionalGeneration,)
    tiny_model = "tiny_qwen2vl"
    capture_keys = ("image_grid_thw", "video_grid_thw", "position_ids")
    rope_name = "mrope"  # 3-D (t, h, w)
    reindex_positions = False  # PDrop's re-indexing is official on 1-D RoPE only
    video = True
    option_keys = {"image": IMAGE_OPTION_KEYS, "video": VIDEO_OPTION_KEYS}

    def vision_model(self, model):
        return model.model.visual

    # -- RoPE: 3-D positions [B, 3, L] ---------------------------------------------------------------------
    def positions(self, position_ids, batch: int, length: int, past: int, device) -> torch.Tensor:
        if position_ids is None:
            return (torch.arange(length, device=device) + past)[None, None].expand(batch, 3, -1)
        if position_ids.dim() == 2:
            return position_ids.expand(batch, -1)[:, None].expand(-1, 3, -1)
        return position_ids[-3:].permute(1, 0, 2).expand(batch, -1, -1)  # [3 or 4, B, L]: the text row dropped

    def rotary(self, text_model, hidden: torch.Tensor, positions: torch.Tensor):
        return text_model.rotary_emb(hidden, positions.permute(1, 0, 2))

    def stock_position_ids(self, positions: torch.Tensor, contiguous: torch.Tensor) -> torch.Tensor:
        return torch.cat([contiguous[None], positions.permute(1, 0, 2)], dim=0)  # [4, B, L]: text row, then t, h, w

    def decode_position_ids(self, position_ids, batch: int, length: int, past: int, offset: int, device):
        return None  # the outer model continues from rope_deltas (see after_shortened_prefill)

    def after_shortened_prefill(self, model, position_offset: int) -> None:
        # A manual decode forward computes positions as cache length + rope_deltas; the layer-0 cache is
        # shorter than the prompt by position_offset, so the deltas grow by as much.
        outer = self.outer_model(model)
        if getattr(outer, "rope_deltas", None) is not None:
            outer.rope_deltas = outer.rope_deltas + position_offset

    # -- layout ---------------------------------------------------------------------------------------------
    def visual_specs(self, model, captured: dict) -> list[VisualSpec]:
        config = model.config
        merge = config.vision_config.spatial_merge_size
        input_ids = captured["input_ids"]
        has_image = bool((input_ids == config.image_token_id).any())
        has_video = bool((input_ids == config.video_token_id).any())
        if (has_image and captured.get("image_grid_thw") is None) or (has_video and captured.get("video_grid_thw") is None):
            # generate() encodes the pixels first and passes mm_encoder_outputs without the grids
            return self.specs_from_positions(model, captured)
        image_grids = _grid_iterator(captured.get("image_grid_thw"), merge)
        video_grids = _grid_iterator(captured.get("video_grid_thw"), merge)
        return [VisualSpec(image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                           image_grids=_take_grids(image_grids, int((row == config.image_token_id).sum()), "image"),
                           video_grids=_take_grids(video_grids, int((row == config.video_token_id).sum()), "video"))
                for row in input_ids]

    def specs_from_positions(self, model, captured: dict) -> list[VisualSpec]:
        """Grids from the stock 3-D positions: each run of placeholders is one image / video (``group_runs`` may
        join runs); rows and columns are the spans of its h and w positions, t = tokens / (rows x cols)."""
        config = model.config
        position_ids = captured.get("position_ids")
        if position_ids is None or position_ids.dim() != 3:
            raise ModelInputError(f"{self.family} call without image_grid_thw / video_grid_thw and without 3-D "
                                  "position_ids: tokenprune cannot find the visual grids")
        thw = position_ids[-3:]  # [3, B, L]
        specs = []
        for b, row in enumerate(captured["input_ids"]):
            grids = {}
            for token_id in (config.image_token_id, config.video_token_id):
                runs = []
                for start, stop in _runs_of(row == token_id):
                    h, w = thw[1, b, start:stop], thw[2, b, start:stop]
                    runs.append((stop - start, int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1))
                grids[token_id] = self.group_runs(runs, token_id == config.video_token_id, captured)
            specs.append(VisualSpec(image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                                    image_grids=grids[config.image_token_id], video_grids=grids[config.video_token_id]))
        return specs

    def group_runs(self, runs: list[tuple[int, int, int]], video: bool, captured: dict) -> tuple:
        """``(tokens, rows, cols)`` per placeholder run → ``(t, rows, cols)`` grids (here: one run per input)."""
        return tuple((tokens // (rows * cols), rows, cols) for tokens, rows, cols in runs)

    # -- processor options ------------------------------------------------------------------------------------
    def check_options(self, options: dict | None) -> dict:
        checked = super().check_options(options)
        return {"image": check_image_options(checked.get("image")), "video": check_video_options(checked.get("video"))}

    def image_kwargs(self, processor, options: dict) -> dict:
        """Processor kwargs for the image resolution bounds (unset: the processor's own), checked against them."""
        image = options.get("image") or {}
        if not image:
            return {}
        size = processor.image_processor.size
        low, high = image.get("min_pixels", size["shortest_edge"]), image.get("max_pixels", size["longest_edge"])
        if low > high:  # one bound given, in conflict with the processor's other one
            given, other, edge = (("max_pixels", "min_pixels", "shortest_edge") if "max_pixels" in image
                                  else ("min_pixels", "max_pixels", "longest_edge"))
            raise ValueError(f"model.image.{given}={image[given]} conflicts with the processor's {other} "
                             f"({size[edge]}): set model.image.{other} too")
        return {"images_kwargs": {"size": {"shortest_edge": low, "longest_edge": high}}}

    # -- samples ----------------------------------------------------------------------------------------------
    def prepare(self, processor, model, sample: Sample, options: dict | None = None) -> Inputs:
        options = self.check_options(options)
        content: list[dict] = []
        kwargs: dict = {}
        frame_size = None
        vision = model.config.vision_config
        if sample.video is not None:
            if sample.images:
                raise ModelInputError("a sample has either images or a video, not both")
            factor = vision.patch_size * vision.spatial_merge_size  # px per LLM token side
            video, metadata, video_item = self._load_video(sample.video, options["video"], factor)
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
            kwargs.update(self.image_kwargs(processor, options))
        encoded = processor(text=[text], return_tensors="pt", **kwargs)
        if frame_size is not None:
            _check_video_grid(encoded["video_grid_thw"][0].tolist(), frame_size, vision, sample)
        inputs = Inputs(encoded)
        inputs.layout = self.layout_of(model, inputs)
        return inputs

    def training_video_inputs(self, samples: list[Sample], video_options: dict | None = None) -> dict:
        """Processor kwargs for a batch of video samples (one video each), as ``prepare`` passes them."""
        loaded = [self._load_video(s.video, check_video_options(video_options)) for s in samples]
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

    # -- test architecture --------------------------------------------------------------------------------------
    def tiny_config(self, layers: int = 6):
        return tiny_qwen2vl_config(layers=layers)

    def tiny_processor(self):
        from transformers import Qwen2VLProcessor

        return tiny_qwen_processor(Qwen2VLProcessor)


# ---------------------------------------------------------------------------------------------------------
# Architectures: the published checkpoints (weights=random) and the tiny test architecture
# ---------------------------------------------------------------------------------------------------------
def qwen2vl_config(size: str) -> Qwen2VLConfig:
    """Qwen2-VL-{2B,7B}-Instruct, from the published config.json files."""
    text = {
        "2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    }[size]
    return Qwen2VLConfig(
        text_config=dict(**text, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=text["hidden_size"], mlp_ratio=4, num_heads=16,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def tiny_qwen2vl_config(layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                        vision_hidden: int = 32, vision_depth: int = 2, vision_heads: int = 2, patch_size: int = 14,
                        rope_theta: float = 10000.0) -> Qwen2VLConfig:
    """A tiny random Qwen2-VL (168 x 168 px image → 6 x 6 = 36 visual tokens with ``tiny_processor``)."""
    return Qwen2VLConfig(
        text_config=tiny_qwen_text(layers, hidden, heads, kv_heads, intermediate, rope_theta),
        vision_config=dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2,
                           num_heads=vision_heads, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2),
        **tiny_qwen_ids(),
    )


for _size in ("2b", "7b"):
    register_model(ModelSpec(f"qwen2vl_{_size}", "qwen2vl", f"Qwen/Qwen2-VL-{_size.upper()}-Instruct",
                             partial(qwen2vl_config, _size), description=f"Qwen2-VL-{_size.upper()}-Instruct"))
register_model(ModelSpec("tiny_qwen2vl", "qwen2vl", None, tiny_qwen2vl_config,
                         random_processor=lambda: Qwen2VLAdapter().tiny_processor(),
                         description="tiny Qwen2-VL test architecture (random weights, built in code)"))


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
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


def _runs_of(flags: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, stop)`` of each maximal run of True in ``flags`` ``[L]``."""
    padded = torch.nn.functional.pad(flags.long(), (1, 1))
    edges = (padded[1:] - padded[:-1]).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


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
