"""Opening images for the processors, with errors that name the bad file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .base import ModelInputError


def load_images(images) -> list[Image.Image]:
    """PIL images (RGB) from PIL images, paths or bytes; a corrupt or missing file raises ModelInputError."""
    loaded = []
    for item in images or []:
        if isinstance(item, Image.Image):
            loaded.append(item.convert("RGB"))
            continue
        if isinstance(item, dict) and "bytes" in item:  # datasets' Image feature, decode=False
            import io

            item = io.BytesIO(item["bytes"])
        elif isinstance(item, (str, Path)) and not Path(item).exists():
            raise ModelInputError(f"image file not found: {item}")
        try:
            with Image.open(item) as image:
                image.load()
                loaded.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ModelInputError(f"cannot read image {item if isinstance(item, (str, Path)) else '<bytes>'}: {error}") from error
    return loaded
