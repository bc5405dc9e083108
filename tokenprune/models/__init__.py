"""Model adapters (one per family) and named models."""

from . import llava, qwen25vl, zoo  # noqa: F401  (register adapters and named models)
from .base import (VLM, Inputs, ModelAdapter, ModelInputError, ModelSpec, adapter_for, adapter_named,
                   available_models, load_model, model_spec, register_model)

__all__ = ["VLM", "Inputs", "ModelAdapter", "ModelInputError", "ModelSpec", "adapter_for", "adapter_named",
           "available_models", "load_model", "model_spec", "register_model"]
