"""Opening images for the processors, with errors that name the bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import ModelInputError

HIGH_DEPTH_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit (and 32-bit integer) grey images are scaled to 0-255 — ``Image.convert("RGB")`` would clip
    every value above 255, turning most of a 16-bit image white; float images are taken as 0-1 when they lie
    there, else as 0-255."""
    if image.mode in HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        full_scale = HIGH_DEPTH_MODES[image.mode] if values.max(initial=0) > 255 or image.mode != "I" else 255
        grey = np.clip(np.round(values * 255.0 / full_scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def load_images(images) -> list[Image.Image]:
    """PIL images (RGB) from PIL images, paths or bytes; a corrupt or missing file raises ModelInputError."""
    loaded = []
    for item in images or []:
        if isinstance(item, Image.Image):
            loaded.append(to_rgb(item))
            continue
        if isinstance(item, dict) and "bytes" in item:  # datasets' Image feature, decode=False
            import io

            item = io.BytesIO(item["bytes"])
        elif isinstance(item, (str, Path)) and not Path(item).exists():
            raise ModelInputError(f"image file not found: {item}")
        try:
            with Image.open(item) as image:
                image.load()
                loaded.append(to_rgb(image))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ModelInputError(f"cannot read image {item if isinstance(item, (str, Path)) else '<bytes>'}: {error}") from error
    return loaded
