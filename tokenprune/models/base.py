"""Model families: load a stock VLM, prepare a sample, and tell the engine how its decoder works.

One file per family under ``tokenprune/models/`` (discovered automatically): a ``ModelAdapter`` subclass — the
engine's ``FamilySpec`` (layout, RoPE scheme, attention math, side inputs, FLOPs shape) plus loading, the
processor options and ``prepare`` — registered with ``@register_adapter``, and its named models (real
checkpoints' architectures and a tiny test architecture) registered with ``register_model``. Named models
(``conf/model/*.yaml``, ``tp.load_model``) say which family, which default checkpoint and which architecture to
build for ``weights=random``. See ``docs/adding_a_model_family.md``.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.sample import Sample
from ..engine.contract import (DynamicGeometry, FixedGeometry, ModelInfo, ModelInputError,  # noqa: F401  (re-exported)
                               TokenLayout, VisualInputs)
from ..engine.family import FamilySpec, families, family_for, family_named, register_family

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHTS = ("pretrained", "random")


class Inputs(dict):
    """Model inputs (``model(**inputs)`` / ``model.generate(**inputs)``) plus the sample's TokenLayout, its
    question text (``questions``: one per sample, for ``apply(..., questions=inputs.questions)``) and what a
    method's ``before_processor`` reported (``stats``, e.g. ``native_visual_tokens``; empty without one)."""

    layout: TokenLayout
    questions: list[str] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats: dict = {}

    def to(self, device) -> "Inputs":
        moved = Inputs({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})
        moved.layout, moved.stats = self.layout, dict(self.stats)
        moved.questions = self.questions
        return moved


class ModelAdapter(FamilySpec):
    """One model family: the engine's ``FamilySpec`` plus loading, processor options and ``prepare``."""

    tiny_model: str | None = None  # the family's tiny test architecture (a registered named model)
    option_keys: dict[str, tuple[str, ...]] = {}  # processor options per group: {"image": (...), "video": (...)}
    video_runs_per_frame: bool = False  # a video is one placeholder run per temporal step (text between them)

    @property
    def model_class(self) -> type:
        """The family's main stock class (``model_classes[0]``)."""
        return self.model_classes[0]

    def check_options(self, options: dict | None) -> dict:
        """Processor options ``{"image": {...}, "video": {...}}`` (``model.image.*``, ``model.video.*``): the ones that
        are set, checked against ``option_keys``; ValueError naming the field and the allowed keys, before any model
        work. Families check the values in their override."""
        checked = {}
        for group, values in (options or {}).items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ValueError(f"model options are grouped as {{'image': {{...}}, 'video': {{...}}}}; got "
                                 f"{group}={values!r}")
            allowed = self.option_keys.get(group, ())
            for key, value in values.items():
                if value is not None and key not in allowed:
                    known = f"its model.{group} options: {', '.join(allowed)}" if allowed else f"no model.{group} options"
                    raise ValueError(f"model.{group}.{key} is not an option of the {self.family} family ({known})")
            checked[group] = {key: value for key, value in values.items() if value is not None}
        return checked

    # -- test architecture --------------------------------------------------------------------------------
    @abstractmethod
    def tiny_config(self, layers: int = 6):
        """A tiny random architecture of this family for tests (fp32 on CPU in milliseconds)."""

    @abstractmethod
    def tiny_processor(self):
        """The processor of ``tiny_config`` (built in code: no download)."""

    # -- loading ----------------------------------------------------------------------------------------
    def load_pretrained(self, path: str, dtype: torch.dtype, attn_implementation: str, device_map: dict | None = None):
        """The checkpoint at ``path`` (on the CPU, or spread as ``device_map`` says: ``{module: device}``)."""
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(path)
        model_class = self.class_for_config(config)
        placed = {} if device_map is None else {"device_map": device_map}
        model = model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **placed)
        processor = AutoProcessor.from_pretrained(path)
        return model, processor

    def class_for_config(self, config) -> type:
        """The stock class that builds ``config`` (dense or MoE variant)."""
        for model_class in self.model_classes:
            if isinstance(config, model_class.config_class):
                return model_class
        names = ", ".join(c.config_class.__name__ for c in self.model_classes)
        raise ValueError(f"model family {self.family!r} builds {names}, not {type(config).__name__}")

    def build_random(self, config, dtype: torch.dtype, attn_implementation: str, seed: int):
        torch.manual_seed(seed)
        config._attn_implementation = attn_implementation
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
        try:
            model = self.class_for_config(config)(config)
        finally:
            torch.set_default_dtype(previous)
        model.config._attn_implementation = attn_implementation
        return model.to(dtype)

    # -- samples ----------------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, processor, model, sample: Sample, options: dict | None = None, method=None) -> Inputs:
        """Turn a sample into model inputs with the family's processor and chat template; ``method``: a method whose
        ``before_processor`` may change the images / video first (``visual_inputs``)."""

    def input_geometry(self, processor, options: dict | None = None) -> FixedGeometry | DynamicGeometry | None:
        """How the family's encoder turns pixels into LLM tokens, with the processor options applied (methods that
        change the resolution plan with it). Default: None (undefined: such methods refuse the family)."""
        return None

    def visual_inputs(self, method, processor, options: dict | None, images: list,
                      video: torch.Tensor | None = None) -> VisualInputs:
        """A sample's loaded images / video after ``method``'s ``before_processor`` hooks (a Compose: each child's in
        order); unchanged without ``method`` or hooks."""
        visuals = VisualInputs(images=list(images), video=video)
        parts = [] if method is None else [part for part in method.components() if part.uses_before_processor]
        if parts:
            visuals.geometry = self.input_geometry(processor, options)
            for part in parts:
                visuals = part.before_processor(visuals) or visuals
        return visuals

    @staticmethod
    def finish(inputs: Inputs, visuals: VisualInputs) -> Inputs:
        """Attach what ``before_processor`` reported to prepared inputs."""
        inputs.stats = dict(visuals.stats)
        return inputs

    def layout_of(self, model, inputs: dict) -> TokenLayout:
        """The TokenLayout of one prepared sample (what the engine will find at call time)."""
        captured = {"input_ids": inputs["input_ids"], **{k: inputs.get(k) for k in self.capture_keys}}
        return self.layouts(model, captured, inputs["input_ids"].device)[0]


register_adapter = register_family  # a family class decorator (kept under its first name)


def model_options(model_config: dict) -> dict:
    """The processor options of a ``model`` config mapping (``model.image``, ``model.video``)."""
    return {group: dict(model_config.get(group) or {}) for group in ("image", "video")}


def adapter_for(model) -> ModelAdapter:
    """The family of a loaded model, found by its class."""
    return family_for(model)


def adapter_named(family: str) -> ModelAdapter:
    return family_named(family)


def adapters() -> list[ModelAdapter]:
    """Every registered model family (by name): what family-parametrised tests iterate."""
    return families()


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
    options: dict = field(default_factory=dict)  # processor options {"image": {...}, "video": {...}}

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device (its first device when spread over several)."""
        from ..engine.devices import module_device

        return module_device(self.model)

    @property
    def devices(self) -> list[torch.device]:
        """Every device holding the model's weights (several with ``model.device_map``)."""
        return sorted({p.device for p in self.model.parameters() if p.device.type != "meta"}, key=str)

    def prepare(self, sample: Sample, method=None) -> Inputs:
        """Model inputs of ``sample``; ``method``: a method that changes the preprocessing (``before_processor``,
        e.g. ``downsample``) prepares the images / video its way."""
        if self.processor is None:
            raise ModelInputError(f"model {self.name!r} was built without a processor; give model.path to one")
        inputs = self.adapter.prepare(self.processor, self.model, sample, self.options, method=method)
        inputs.questions = [sample.question]
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
               options: dict | None = None, device_map: str | dict | None = None) -> VLM:
    """Load a named model (``tiny_llava``, ``llava15_7b``, ``qwen25vl_7b``, ...).

    ``weights=pretrained`` loads ``path`` (a local checkpoint directory or hub id; tiny models default to
    their packaged checkpoint); ``weights=random`` builds the architecture (from ``path``'s config when
    given) with random weights, for speed and memory benchmarks. ``device_map`` (``auto``, ``balanced``,
    ``balanced_low_0``, ``sequential`` or ``{module: device}``) spreads the model over the visible GPUs with accelerate
    instead of placing it on ``device``; ``device=auto`` does so by itself (``device_map=auto``) when several GPUs are
    visible and the weights do not fit into one.
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
        from transformers import AutoConfig

        from .checks import auto_device_map, plan_placement

        config = AutoConfig.from_pretrained(path)
        if device == "auto" and device_map is None:  # several GPUs and a model too large for one: spread it
            device_map = auto_device_map(spec.family, config, torch_dtype)
        placement = None if device_map is None else plan_placement(name, spec.family, config, torch_dtype, device_map)
        model, processor = adapter.load_pretrained(path, torch_dtype, attn_implementation, device_map=placement)
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
        from .checks import auto_device_map, build_random_on_device, build_random_placed, plan_placement

        if device == "auto" and device_map is None:
            device_map = auto_device_map(spec.family, config, torch_dtype)
        if device_map is not None:  # built on the meta device, materialised block by block on its device
            placement = plan_placement(name, spec.family, config, torch_dtype, device_map)
            model = build_random_placed(name, spec.family, config, torch_dtype, attn_implementation, seed, placement)
        else:  # estimates the memory, then builds on the target device
            model = build_random_on_device(name, spec.family, config, torch_dtype, attn_implementation, seed, target)
    model = (model if device_map is not None else model.to(target)).eval()
    return VLM(name=name, model=model, processor=processor, adapter=adapter, options=options)


def _looks_like_hub_id(path: str) -> bool:
    return not os.path.isabs(path) and path.count("/") == 1 and not Path(path).exists() and not path.startswith(".")
