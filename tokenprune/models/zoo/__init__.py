"""Named models: the tiny architectures shipped with the package and the real checkpoints' architectures."""

from __future__ import annotations

from functools import partial

from ..base import ModelSpec, register_model
from .real import llava15_config, qwen25vl_config
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
for _size in ("7b", "13b"):
    register_model(ModelSpec(f"llava15_{_size}", "llava", f"llava-hf/llava-1.5-{_size}-hf",
                             partial(llava15_config, _size), description=f"LLaVA-1.5-{_size.upper()}"))
for _size in ("3b", "7b", "32b"):
    register_model(ModelSpec(f"qwen25vl_{_size}", "qwen25vl", f"Qwen/Qwen2.5-VL-{_size.upper()}-Instruct",
                             partial(qwen25vl_config, _size), description=f"Qwen2.5-VL-{_size.upper()}-Instruct"))
