"""The tiny models trained here on the synthetic tasks, shipped with the package (checkpoints + README each).

Their families' files (``models/llava.py``, ``models/qwen25vl.py``) hold the real checkpoints' architectures."""

from __future__ import annotations

from functools import partial

from ..base import ModelSpec, register_model
from .checkpoints import packaged_checkpoint
from .tiny import trained_llava_config, trained_llava_processor, trained_qwen25vl_config, trained_qwen25vl_processor

register_model(ModelSpec("tiny_llava", "llava", None, trained_llava_config,
                         default_path=partial(packaged_checkpoint, "tiny_llava"),
                         random_processor=trained_llava_processor,
                         description="tiny LLaVA (CLIP + Llama) trained on the synthetic tasks (package checkpoint)"))
register_model(ModelSpec("tiny_qwen25vl", "qwen25vl", None, trained_qwen25vl_config,
                         default_path=partial(packaged_checkpoint, "tiny_qwen25vl"),
                         random_processor=trained_qwen25vl_processor,
                         description="tiny Qwen2.5-VL (windowed ViT + Qwen2, mRoPE) trained on the synthetic tasks"))
