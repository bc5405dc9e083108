"""Methods: one file per method, each a dataclass registered by name (discovered automatically)."""

import importlib
import pkgutil

from .base import (Compose, DecoderInput, LayerPlan, LayerStep, MergedRows, Method, ModelInfo, PrefillStep, Reduction,
                   Selection, VisualSequence, available, create, method_class, register)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Compose", "DecoderInput", "LayerPlan", "LayerStep", "MergedRows", "Method", "ModelInfo", "PrefillStep",
           "Reduction", "Selection", "VisualSequence", "available",
           "create", "method_class", "register"]
