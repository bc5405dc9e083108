"""Models and synthetic prompts for ``benchmarks/speed.py``: N visual tokens plus a short text prompt.

A prompt is built without a processor: ``input_ids`` hold a short system-like prefix, one run of image (or
video) placeholder tokens per image (video), and a short question. The vision encoder runs once per prompt on
random pixels of the matching shape (that call is timed separately); its output is handed to the outer model
as ``mm_encoder_outputs``, exactly as ``generate`` does, so that the timed decoder prefills never re-run it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokenprune as tp

PREFIX_TOKENS, QUESTION_TOKENS = 14, 20  # text before the visual tokens (system prompt) and after them (question)
TIMESTAMP_TOKENS = 5  # "<t seconds>" before each temporal step of a per-step video (Qwen3-VL)


def load_random_model(name: str, device: str, dtype: str):
    """``tp.load_model(name, weights="random")``, with the weights created directly on ``device``.

    Building a 7B model on the CPU and copying it over takes minutes; under ``torch.device(device)`` the
    random initialisation runs on the GPU.
    """
    with torch.device(device):
        return tp.load_model(name, weights="random", dtype=dtype, device=device, attn_implementation="sdpa")


def supports_video(vlm) -> bool:
    return vlm.adapter.video


def fixed_image_grid(vlm) -> bool:
    """Families whose every image is one fixed grid (LLaVA-1.5: resized to the vision tower's input)."""
    return hasattr(vlm.adapter, "tokens_per_image")


def grid_for(tokens: int) -> tuple[int, int]:
    """Rows x columns with ``rows * cols == tokens``, as square as possible (1196 -> 26 x 46, a 720p image)."""
    rows = int(tokens**0.5)
    while tokens % rows:
        rows -= 1
    return rows, tokens // rows


@dataclass
class Prompt:
    """One synthetic prompt: decoder inputs (without the vision output) and the vision encoder's inputs."""

    kind: str  # "image" | "video"
    visual: int  # N: visual tokens entering the decoder unpruned
    grids: list[tuple[int, int, int]]  # (t, rows, cols) in LLM tokens per image / video
    input_ids: torch.Tensor  # [1, L]
    grid_inputs: dict = field(default_factory=dict)  # image_grid_thw / video_grid_thw / mm_token_type_ids (Qwen)
    pixel_inputs: dict = field(default_factory=dict)  # what the vision encoder call takes

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def decoder_inputs(self, encoded) -> dict:
        """Keyword arguments of the outer model for a decoder-only prefill (``encoded``: the vision output)."""
        return {"input_ids": self.input_ids, "mm_encoder_outputs": {self.kind: encoded}, **self.grid_inputs}


def visual_grids(vlm, visual: int, kind: str, frames: int) -> list[tuple[int, int, int]]:
    """Grids giving (about) ``visual`` tokens: the Qwen-VL families one image (or one video of ``frames`` temporal
    steps) of any size; LLaVA-1.5 a number of fixed-size images (N is rounded to a multiple of the tokens per
    image)."""
    if fixed_image_grid(vlm):
        per_image, rows, cols = vlm.adapter.tokens_per_image(vlm.model.config)
        return [(1, rows, cols)] * max(1, round(visual / per_image))
    if kind == "video":
        per_frame = max(1, round(visual / frames))
        return [(frames, *grid_for(per_frame))]
    return [(1, *grid_for(visual))]


def build_prompt(vlm, visual: int, kind: str = "image", frames: int = 8, seed: int = 0) -> Prompt:
    """A prompt with (about) ``visual`` visual tokens on ``vlm``'s device (see ``visual_grids``)."""
    if kind == "video" and not supports_video(vlm):
        raise ValueError(f"{vlm.name} takes no video input")
    config = vlm.model.config
    device = vlm.device
    grids = visual_grids(vlm, visual, kind, frames)
    generator = torch.Generator().manual_seed(seed)
    special = {getattr(config, key, None) for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                      "vision_end_token_id", "pad_token_id", "eos_token_id")}
    text_ids = [i for i in range(3, min(1000, vlm.adapter.text_config(vlm.model).vocab_size)) if i not in special]

    def text(count: int) -> torch.Tensor:
        return torch.tensor(text_ids)[torch.randint(len(text_ids), (count,), generator=generator)]

    placeholder = config.video_token_id if kind == "video" else config.image_token_id
    pieces = [text(PREFIX_TOKENS)]
    wrap = getattr(config, "vision_start_token_id", None) is not None  # <|vision_start|> run <|vision_end|>
    for t, rows, cols in grids:
        # a video whose temporal steps are separate runs (Qwen3-VL): a timestamp and the wrapper around each step
        steps = [(1, rows, cols)] * t if kind == "video" and vlm.adapter.video_runs_per_frame else [(t, rows, cols)]
        for index, (steps_t, _, _) in enumerate(steps):
            run = torch.full((steps_t * rows * cols,), placeholder)
            if wrap:
                start, end = torch.tensor([config.vision_start_token_id]), torch.tensor([config.vision_end_token_id])
                run = torch.cat([start, run, end])
            if len(steps) > 1:
                run = torch.cat([text(TIMESTAMP_TOKENS), run])
            pieces.append(run)
    pieces.append(text(QUESTION_TOKENS))
    input_ids = torch.cat(pieces)[None].to(device)
    visual_count = sum(t * rows * cols for t, rows, cols in grids)
    return Prompt(kind, visual_count, grids, input_ids, *_encoder_inputs(vlm, grids, kind, input_ids, generator))


def _encoder_inputs(vlm, grids, kind: str, input_ids: torch.Tensor, generator) -> tuple[dict, dict]:
    """(grid inputs of the decoder call, vision encoder inputs) with random pixels of the right shape."""
    config = vlm.model.config
    vision = config.vision_config
    device, dtype = vlm.device, next(vlm.model.parameters()).dtype
    if fixed_image_grid(vlm):
        pixels = torch.randn(len(grids), 3, vision.image_size, vision.image_size, generator=generator)
        return {}, {"pixel_values": pixels.to(device, dtype)}
    merge = vision.spatial_merge_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    thw = torch.tensor([[t, rows * merge, cols * merge] for t, rows, cols in grids], device=device)  # in patches
    patches = sum(t * rows * cols for t, rows, cols in grids) * merge**2
    pixels = torch.randn(patches, patch_dim, generator=generator).to(device, dtype)
    token_type = 2 if kind == "video" else 1
    placeholder = config.video_token_id if kind == "video" else config.image_token_id
    mm_token_type_ids = (input_ids == placeholder).int() * token_type
    if kind == "video":
        return ({"video_grid_thw": thw, "mm_token_type_ids": mm_token_type_ids},
                {"pixel_values_videos": pixels, "video_grid_thw": thw})
    return ({"image_grid_thw": thw, "mm_token_type_ids": mm_token_type_ids},
            {"pixel_values": pixels, "image_grid_thw": thw})


def encode(vlm, prompt: Prompt):
    """Run the vision encoder (with the projector / merger) on the prompt's pixels; the outer model's own call."""
    outer = vlm.adapter.outer_model(vlm.model)
    if prompt.kind == "video":
        return outer.get_video_features(**prompt.pixel_inputs, return_dict=True)
    return outer.get_image_features(**prompt.pixel_inputs, return_dict=True)
