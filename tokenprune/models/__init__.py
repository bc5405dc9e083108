"""Model families (one file each, discovered automatically) and named models."""

import importlib
import pkgutil

from .base import (VLM, Inputs, ModelAdapter, ModelInputError, ModelSpec, adapter_for, adapter_named, adapters,
                   available_models, load_model, model_options, model_spec, register_adapter, register_model)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "images"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["VLM", "Inputs", "ModelAdapter", "ModelInputError", "ModelSpec", "adapter_for", "adapter_named", "adapters",
           "available_models", "load_model", "model_options", "model_spec", "register_adapter", "register_model"]
