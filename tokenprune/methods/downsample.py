"""Downsampling baseline: shrink each image before the vision encoder so that it emits about ``budget`` tokens.

Card: ``shared/methods/downsample.md`` (a). Unlike every other method it changes the preprocessing, not the
decoder: the model sees a smaller input, with stock positions, masks and caches (and a cheaper vision encoder).

``match="tokens"`` (default; grid-exact). With f = ``budget_fraction(N, budget)`` of the sample's unreduced
visual tokens N (one f for every image; frames of a video share one grid):

* **fixed input** (LLaVA-1.5: CLIP at 336 px, 14 px patches, a 24×24 grid): resizing the file changes nothing
  (the processor scales it back), so ``llava_mode="vit"`` runs CLIP at ``s = 14·g`` px with
  ``g = max(1, round(24·sqrt(f)))``: the processor's ``size.shortest_edge = s`` and ``crop_size = s×s`` give g²
  placeholders, and the model needs ``interpolate_pos_encoding=True`` (CLIP's position table interpolated:
  out of distribution, flagged). 192/144/128/64 tokens → g = 14/12/11/8 (196/144/121/64 tokens).
  ``llava_mode="blur"`` shrinks the image by g/24 and lets the processor scale it back (576 tokens; filtering only).
* **dynamic resolution** (Qwen2.5-VL: 28 px per token side = 14 px patches × 2 merge, min/max pixels): from the
  processor's own grid (gh, gw) (``smart_resize``) take ``(th, tw) = (max(1, round(gh·sqrt(f))), ...)``, resize
  the image to (28·th, 28·tw) (bicubic, antialiased) and call the processor with ``do_resize=False``: exactly
  th·tw tokens. Video frames (already sized to the grid): the same, one (th, tw) for every frame.

``f = 1`` (or a grid that does not change) plans no change at all: the baseline inputs, bit for bit.

``match="vtc"`` reproduces VTC-Bench's official pipeline (Qwen): each image → ``(w // k, h // k)`` bicubic with
``k = round(1/sqrt(budget))`` (budget must be 1/k²), a JPEG round trip at ``jpeg_quality`` (even at k = 1),
qwen-vl-utils' ``smart_resize`` (4 to 16384 tokens), then the processor as usual. Videos are not resized (official).

Wiring: the ``before_processor`` hook (the family's ``prepare`` consults it: ``vlm.prepare(sample, method)``; the
runner prepares each sample again for such a method). The family gives the geometry (``input_geometry``); a family
without one is refused. While ``downsample`` is applied, a fixed-geometry encoder runs with the family's
``resized_vision_kwargs`` (CLIP: interpolated position table; exact at the native size). Under dynamic resolution,
when some images shrink and others keep their grid, the latter are resized to their native grid by tokenprune too
(the processor runs with ``do_resize=False`` for all): same token counts, pixels resampled by PIL.
Reported (``Inputs.stats``): ``native_visual_tokens`` (N of the unchanged input) and ``downsample_visual_tokens``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from ..engine.contract import DynamicGeometry, FixedGeometry
from ._budget import budget_fraction, check_budget
from .base import Method, ModelInfo, VisualInputs, check_choice, register


# ----------------------------------------------------------------------------------------------------------
# Family geometry: the contract's FixedGeometry / DynamicGeometry, given by the family file (``input_geometry``)
# ----------------------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen2-VL processor's size rule: multiples of ``factor``, pixels within bounds, aspect kept."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as stock

    return stock(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def native_grid(geometry, size: tuple[int, int], resized: bool = True) -> tuple[int, int]:
    """The LLM-token grid (rows, cols) the unchanged pipeline gives an image of ``size`` = (height, width) px.

    ``resized=False``: video frames already sized to multiples of the factor (the processor does not resize them).
    """
    if isinstance(geometry, FixedGeometry):
        return geometry.side, geometry.side
    height, width = size
    if resized:
        height, width = smart_resize(height, width, geometry.factor, geometry.min_pixels, geometry.max_pixels)
    elif height % geometry.factor or width % geometry.factor:
        raise ValueError(f"downsample: frames of {height}x{width} px are not multiples of {geometry.factor} px")
    return height // geometry.factor, width // geometry.factor


def scaled_grid(grid: tuple[int, int], fraction: float) -> tuple[int, int]:
    """``(max(1, round(rows·sqrt(f))), max(1, round(cols·sqrt(f))))``, never above the native grid."""
    scale = math.sqrt(fraction)
    return tuple(max(1, min(n, round(n * scale))) for n in grid)


# ----------------------------------------------------------------------------------------------------------
# Plans: what to do to one image so that the encoder emits the budget
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ImagePlan:
    """The change to one image / video. ``tokens``: LLM tokens it will emit (per temporal group for a video);
    ``grid``: (rows, cols) of those tokens; ``resize``: (height, width) px to resize to before the processor
    (None: untouched); ``processor_kwargs`` / ``model_kwargs``: extra arguments of the processor / model call."""

    tokens: int
    grid: tuple[int, int]
    native_tokens: int
    resize: tuple[int, int] | None = None
    processor_kwargs: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return self.resize is None and not self.processor_kwargs and not self.model_kwargs


def plan_image(geometry, size: tuple[int, int], fraction: float, llava_mode: str = "vit",
               resized: bool = True) -> ImagePlan:
    """The plan for one image of ``size`` = (height, width) px at token ``fraction`` (``match="tokens"``).

    resized=False: a video's frames, already multiples of the factor (``native_grid``).
    """
    grid = native_grid(geometry, size, resized)
    native = grid[0] * grid[1]
    if isinstance(geometry, FixedGeometry):
        g = scaled_grid(grid, fraction)[0]
        if g == geometry.side:
            return ImagePlan(native, grid, native)
        if llava_mode == "blur":  # shrink the content; the processor scales it back to the fixed input
            height, width = size
            return ImagePlan(native, grid, native,
                             resize=(max(1, round(height * g / geometry.side)), max(1, round(width * g / geometry.side))))
        side = geometry.patch_size * g
        return ImagePlan(g * g, (g, g), native,
                         processor_kwargs={"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}},
                         model_kwargs={"interpolate_pos_encoding": True})
    target = scaled_grid(grid, fraction)
    if target == grid:
        return ImagePlan(native, grid, native)
    return ImagePlan(target[0] * target[1], target, native,
                     resize=(geometry.factor * target[0], geometry.factor * target[1]),
                     processor_kwargs={"do_resize": False})


def plan_sample(geometry, sizes: list[tuple[int, int]], budget: int | float, llava_mode: str = "vit",
                resized: bool = True, extra_tokens: int = 0) -> list[ImagePlan]:
    """Plans for every image of a sample: one fraction ``budget_fraction(N, budget)``, N = their native tokens
    (+ ``extra_tokens``: another input's, e.g. a video's, that shares the fraction). Under dynamic resolution, once
    one image is resized for ``do_resize=False``, every other image is resized to its native grid as well."""
    native = sum(a * b for a, b in (native_grid(geometry, size, resized) for size in sizes)) + extra_tokens
    fraction = budget_fraction(native, budget)
    plans = [plan_image(geometry, size, fraction, llava_mode, resized) for size in sizes]
    if isinstance(geometry, DynamicGeometry) and any(not plan.is_identity for plan in plans):
        for plan in plans:
            if plan.is_identity:
                plan.resize = (geometry.factor * plan.grid[0], geometry.factor * plan.grid[1])
                plan.processor_kwargs = {"do_resize": False}
    return plans


def resize_image(image: Image.Image, plan: ImagePlan) -> Image.Image:
    """Apply a plan's resize to a PIL image (bicubic; PIL antialiases when shrinking)."""
    if plan.resize is None:
        return image
    height, width = plan.resize
    return image.resize((width, height), Image.Resampling.BICUBIC)


def resize_frames(frames: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
    """Apply a plan's resize to video frames ``[n, 3, H, W]`` (float 0-255; bicubic, antialiased, clamped)."""
    if plan.resize is None:
        return frames
    resized = F.interpolate(frames.float(), size=plan.resize, mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0, 255).to(frames.dtype)


# ----------------------------------------------------------------------------------------------------------
# VTC-Bench's official pipeline (Qwen)
# ----------------------------------------------------------------------------------------------------------
def vtc_factor(budget: float) -> int:
    """k with ``budget == 1/k²`` (VTC levels 1, 2, 3, 4, 5, 10 ↔ 1, .25, .1111, .0625, .04, .01)."""
    k = round(1 / math.sqrt(budget))
    if k < 1 or not math.isclose(1 / (k * k), budget, rel_tol=1e-3):
        raise ValueError(f"downsample.budget={budget!r} is not 1/k^2 for an integer k, which match='vtc' needs "
                         "(e.g. 1.0, 0.25, 0.1111, 0.0625, 0.04, 0.01)")
    return k


def vtc_image(image: Image.Image, k: int, patch_size: int = 14, jpeg_quality: int = 75) -> Image.Image:
    """VTC-Bench's image: ``(w // k, h // k)`` bicubic, JPEG at ``jpeg_quality``, then qwen-vl-utils' resize."""
    from qwen_vl_utils import fetch_image

    width, height = image.size
    small = image.convert("RGB").resize((max(1, width // k), max(1, height // k)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=jpeg_quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return fetch_image({"image": decoded.convert("RGB")}, image_patch_size=patch_size)


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------
@register("downsample")
@dataclass
class Downsample(Method):
    """Downsample every image to about ``budget`` of its tokens; see the module docstring."""

    budget: int | float = 0.25  # status/budget.md; VTC-Bench's k = 2
    match: str = "tokens"  # tokens (grid-exact) | vtc (VTC-Bench's official pipeline, Qwen only)
    llava_mode: str = "vit"  # vit (CLIP at 14·g px, g² tokens) | blur (shrink and scale back; 576 tokens)
    jpeg_quality: int = 75  # match='vtc' only (PIL's default)

    def __post_init__(self):
        check_budget(self.name, self.budget, allow_none=False)
        check_choice(self.name, "match", self.match, ("tokens", "vtc"))
        check_choice(self.name, "llava_mode", self.llava_mode, ("vit", "blur"))
        quality = self.jpeg_quality
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise ValueError(f"{self.name}.jpeg_quality must be an integer in [1, 95], got {quality!r}")
        if self.match == "vtc":
            if not isinstance(self.budget, float):
                raise ValueError(f"{self.name}.budget must be a fraction 1/k^2 with match='vtc', got {self.budget!r}")
            vtc_factor(self.budget)

    def validate(self, model: ModelInfo) -> None:
        if self.match == "vtc" and model.rope != "mrope":
            raise ValueError(f"{self.name}.match='vtc' is VTC-Bench's Qwen pipeline (dynamic resolution); this model "
                             f"({model.family or model.rope}) has a fixed input: use match='tokens'")

    # -- hook ------------------------------------------------------------------------------------------------
    def before_processor(self, visuals: VisualInputs) -> VisualInputs:
        geometry = visuals.geometry
        if geometry is None:
            raise ValueError(f"{self.name} is not defined for this model family: its family file gives no input "
                             "geometry (input_geometry)")
        images, video = visuals.images, visuals.video
        sizes = [(image.height, image.width) for image in images]
        native = sum(a * b for a, b in (native_grid(geometry, size) for size in sizes))
        if video is not None:
            if not isinstance(geometry, DynamicGeometry):
                raise ValueError(f"{self.name}: video input needs a dynamic-resolution family")
            steps = -(-video.shape[0] // geometry.temporal_patch_size)
            frame_grid = native_grid(geometry, tuple(video.shape[-2:]), resized=False)
            video_native = steps * frame_grid[0] * frame_grid[1]
        else:
            steps, video_native = 0, 0
        stats = {"native_visual_tokens": native + video_native}
        if self.match == "vtc":  # VTC-Bench: images only, no count known before the processor
            k = vtc_factor(self.budget)
            images = [vtc_image(image, k, geometry.patch_size, self.jpeg_quality) for image in images]
            return VisualInputs(images, video, geometry, dict(visuals.processor_kwargs), {**visuals.stats, **stats})
        plans = plan_sample(geometry, sizes, self.budget, self.llava_mode, extra_tokens=video_native)
        kwargs = dict(visuals.processor_kwargs)
        for plan in plans:
            kwargs.update(plan.processor_kwargs)
        images = [resize_image(image, plan) for image, plan in zip(images, plans)]
        tokens = sum(plan.tokens for plan in plans)
        if video is not None:
            fraction = budget_fraction(native + video_native, self.budget)
            frame_plan = plan_image(geometry, tuple(video.shape[-2:]), fraction, resized=False)
            video = resize_frames(video, frame_plan)
            tokens += steps * frame_plan.tokens
        stats["downsample_visual_tokens"] = tokens
        return VisualInputs(images, video, geometry, kwargs, {**visuals.stats, **stats})
