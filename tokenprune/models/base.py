"""Model adapters: load a stock VLM, prepare a sample, locate visual tokens, expose the text decoder.

One adapter per model family (``LlavaForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``),
registered by family name and model class; named models (``conf/model/*.yaml``, ``tp.load_model``) say
which family, which default checkpoint and which architecture to build for ``weights=random``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.sample import Sample
from ..engine.layout import TokenLayout, VisualSpec
from ..methods.base import ModelInfo

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHTS = ("pretrained", "random")


class ModelInputError(ValueError):
    """A sample the adapter cannot turn into model inputs (corrupt image, unreadable video, ...)."""


class Inputs(dict):
    """Model inputs (``model(**inputs)`` / ``model.generate(**inputs)``) plus the sample's TokenLayout."""

    layout: TokenLayout

    def to(self, device) -> "Inputs":
        moved = Inputs({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})
        moved.layout = self.layout
        return moved


class ModelAdapter(ABC):
    """What the engine and the runner need to know about one model family."""

    family: str = ""
    model_class: type = None  # the stock transformers class
    rope: str = "1d"  # "1d" or "mrope"
    visual_input_keys: tuple[str, ...] = ()  # kwargs of the outer model that describe the visual grids

    # -- model structure --------------------------------------------------------------------------------
    def outer_model(self, model):
        """The module that receives ``input_ids`` and calls the text decoder (``model.model``)."""
        return model.model

    def text_model(self, model):
        """The text decoder (a Llama / Qwen2 / Qwen2.5-VL text model with ``.layers``)."""
        return model.model.language_model

    @abstractmethod
    def vision_model(self, model):
        """The vision encoder (timed separately: it dominates time-to-first-token on Qwen2.5-VL)."""

    def text_config(self, model):
        return self.text_model(model).config

    def model_info(self, model) -> ModelInfo:
        config = self.text_config(model)
        return ModelInfo(num_layers=config.num_hidden_layers, rope=self.rope, hidden_size=config.hidden_size,
                         family=self.family)

    @abstractmethod
    def visual_specs(self, model, captured: dict | None) -> list[VisualSpec]:
        """One VisualSpec per sample of the current call (``captured``: the outer model's inputs)."""

    def check_options(self, options: dict | None) -> dict:
        """Preprocessing options (``model.video.*``) that are set, checked; ValueError naming the field."""
        return {key: value for key, value in (options or {}).items() if value is not None}

    def after_shortened_prefill(self, model, position_offset: int) -> None:
        """Called when a prefill shortened the layer-0 cache (pre-LLM merging), so that a manual decode
        forward without ``position_ids`` still continues from the unpruned prompt length."""

    # -- loading ----------------------------------------------------------------------------------------
    def load_pretrained(self, path: str, dtype: torch.dtype, attn_implementation: str):
        from transformers import AutoProcessor

        model = self.model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
        processor = AutoProcessor.from_pretrained(path)
        return model, processor

    def build_random(self, config, dtype: torch.dtype, attn_implementation: str, seed: int):
        torch.manual_seed(seed)
        config._attn_implementation = attn_implementation
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
        try:
            model = self.model_class(config)
        finally:
            torch.set_default_dtype(previous)
        model.config._attn_implementation = attn_implementation
        return model.to(dtype)

    # -- samples ----------------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, processor, model, sample: Sample, options: dict | None = None) -> Inputs:
        """Turn a sample into model inputs with the family's processor and chat template."""


_ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(adapter_class: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS[adapter_class.family] = adapter_class()
    return adapter_class


def adapter_for(model) -> ModelAdapter:
    """The adapter of a loaded model, found by its class."""
    for adapter in _ADAPTERS.values():
        if isinstance(model, adapter.model_class):
            return adapter
    supported = ", ".join(a.model_class.__name__ for a in _ADAPTERS.values())
    raise TypeError(f"tokenprune has no adapter for {type(model).__name__}; supported: {supported}")


def adapter_named(family: str) -> ModelAdapter:
    if family not in _ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; available: {', '.join(sorted(_ADAPTERS))}")
    return _ADAPTERS[family]


# ---------------------------------------------------------------------------------------------------------
# Named models
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A named model: its family, where its weights usually live, and its architecture for weights=random."""

    name: str
    family: str
    hub_id: str | None  # suggested checkpoint (users pass a local path; nothing downloads implicitly)
    random_config: Callable[[], Any]  # the architecture, for weights=random without a path
    default_path: Callable[[], str | None] = lambda: None  # a packaged checkpoint (tiny trained models)
    random_processor: Callable[[], Any] | None = None  # a processor built in code (tiny models)
    description: str = ""


_SPECS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    _SPECS[spec.name] = spec
    return spec


def available_models() -> list[str]:
    return sorted(_SPECS)


def model_spec(name: str) -> ModelSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
    return _SPECS[name]


@dataclass
class VLM:
    """A loaded model with its processor and adapter."""

    name: str
    model: Any
    processor: Any
    adapter: ModelAdapter
    options: dict = field(default_factory=dict)  # preprocessing options (video fps / nframes / pixels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(self, sample: Sample) -> Inputs:
        if self.processor is None:
            raise ModelInputError(f"model {self.name!r} was built without a processor; give model.path to one")
        inputs = self.adapter.prepare(self.processor, self.model, sample, self.options)
        return inputs.to(self.device)

    def info(self) -> ModelInfo:
        return self.adapter.model_info(self.model)

    def decode(self, token_ids) -> str:
        return self.processor.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device={device!r} but CUDA is not available; use device=cpu or auto")
    return torch.device(device)


def load_model(name: str, path: str | None = None, weights: str = "pretrained", dtype: str = "float32",
               device: str = "auto", attn_implementation: str = "sdpa", seed: int = 0,
               options: dict | None = None) -> VLM:
    """Load a named model (``tiny_llava``, ``llava15_7b``, ``qwen25vl_7b``, ...).

    ``weights=pretrained`` loads ``path`` (a local checkpoint directory or hub id; tiny models default to
    their packaged checkpoint); ``weights=random`` builds the architecture (from ``path``'s config when
    given) with random weights, for speed and memory benchmarks.
    """
    spec = model_spec(name)
    adapter = adapter_named(spec.family)
    if weights not in WEIGHTS:
        raise ValueError(f"model.weights must be one of {list(WEIGHTS)}, got {weights!r}")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if attn_implementation not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"):
        raise ValueError("model.attn_implementation must be one of ['sdpa', 'eager', 'flash_attention_2', "
                         f"'flash_attention_3'], got {attn_implementation!r}")
    options = adapter.check_options(options)
    torch_dtype = DTYPES[dtype]
    target = resolve_device(device)
    path = path or spec.default_path()
    if weights == "pretrained":
        if not path:
            hint = f" (e.g. a local copy of {spec.hub_id})" if spec.hub_id else ""
            raise ValueError(f"model.path is required for model={name} with weights=pretrained{hint}")
        if not _looks_like_hub_id(path) and not Path(path).is_dir():
            raise FileNotFoundError(f"model.path={path!r} does not exist (model={name})")
        model, processor = adapter.load_pretrained(path, torch_dtype, attn_implementation)
    else:
        if path:
            from transformers import AutoConfig, AutoProcessor

            config = AutoConfig.from_pretrained(path)
            try:
                processor = AutoProcessor.from_pretrained(path)
            except (OSError, ValueError):
                processor = None
        else:
            config = spec.random_config()
            processor = spec.random_processor() if spec.random_processor else None
        model = adapter.build_random(config, torch_dtype, attn_implementation, seed)
    model = model.to(target).eval()
    return VLM(name=name, model=model, processor=processor, adapter=adapter, options=options)


def _looks_like_hub_id(path: str) -> bool:
    return not os.path.isabs(path) and path.count("/") == 1 and not Path(path).exists() and not path.startswith(".")
