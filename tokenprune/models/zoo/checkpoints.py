"""Where the trained tiny checkpoints live inside the package."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_ROOT = Path(__file__).parent / "checkpoints"
TRAINED = {"tiny_llava": "tiny_llava", "tiny_qwen25vl": "tiny_qwen25vl"}


def packaged_checkpoint(name: str) -> str | None:
    """The packaged checkpoint directory of a trained tiny model, if it has been trained."""
    path = CHECKPOINT_ROOT / TRAINED[name]
    return str(path) if (path / "model.safetensors").exists() else None
