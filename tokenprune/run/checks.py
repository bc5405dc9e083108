"""Every check of a run's configuration that needs no model weights and no sample, run before any model work.

* ``check_model``: every ``model.*`` field (name or a user-defined model of a registered family, path, weights,
  dtype, device, attention backend, video and processor options), the checkpoint's ``config.json`` (its
  ``model_type`` against the family, its decoder depth for the methods' layer ranges), hub ids while offline;
* ``check_dataset``: the dataset's fields, benchmarks that need the hub while it is unreachable, deprecated knobs;
* ``check_methods``: each method's model-dependent fields (layer ranges, RoPE kind) against the architecture.

Each failure raises ``ConfigError`` whose message names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..data import DatasetError, available_datasets, create_dataset, dataset_class
from ..methods.base import ModelInfo
from ..models import ModelSpec, adapter_named, available_models, model_options, model_spec, register_model
from ..models.base import DTYPES, WEIGHTS
from ..models.checks import (DEVICE_MAPS, ModelCheckError, architecture_config, auto_device_map,
                             checkpoint_fingerprint, is_hub_id, model_info_from_config, plan_placement)
from ..network import hub_offline
from .distributed import torchrun_ranks

log = logging.getLogger("tokenprune")

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# model.* fields: those of conf/model/*.yaml, plus what a user's own model YAML may add
MODEL_FIELDS = {
    "name": "the model's name (conf/model/<name>.yaml)",
    "family": "a registered model family, for a model of your own",
    "architecture": "a named model whose architecture weights=random builds when model.path is not given",
    "path": "a local checkpoint directory (or a hub id while online)",
    "weights": f"one of {list(WEIGHTS)}",
    "dtype": f"one of {list(DTYPES)}",
    "device": "auto, cpu, cuda or cuda:N",
    "device_map": "null, or one model spread over the visible GPUs: auto, balanced, balanced_low_0, sequential, or a "
                  "mapping {module: device}",
    "attn_implementation": f"one of {list(ATTN_IMPLEMENTATIONS)}",
    "image": "image resolution options of the family's processor (min_pixels, max_pixels)",
    "video": "video reading options of the family (fps, nframes, min_pixels, max_pixels, ...)",
    "processor": "keyword arguments of the processor (AutoProcessor.from_pretrained)",
}


class ConfigError(ValueError):
    """A configuration refused at start-up; the message names the field and the allowed values."""


@dataclass
class CheckedModel:
    """A validated ``model`` config: normalised fields, its spec, its architecture (no weights) and identity."""

    fields: dict
    spec: ModelSpec
    config: Any  # the transformers config of the architecture
    info: ModelInfo

    @property
    def identity(self) -> dict:
        """What makes two runs' models the same model: name, family, weights, checkpoint, dtype."""
        fields = self.fields
        if fields["weights"] == "random":
            checkpoint = f"random(seed={fields.get('seed', 0)}, architecture={fields.get('path') or fields.get('architecture') or self.spec.name})"
        else:
            checkpoint = checkpoint_fingerprint(fields["path"]) or fields["path"]
        return {"name": self.spec.name, "family": self.spec.family, "weights": fields["weights"],
                "checkpoint": checkpoint, "dtype": fields["dtype"]}


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------
def check_model(model: dict, seed: int = 0) -> CheckedModel:
    """Validate every ``model.*`` field and read the architecture (``config.json``); loads no weight."""
    model = dict(model)
    unknown = sorted(set(model) - set(MODEL_FIELDS))
    if unknown:
        raise ConfigError(f"model has no field(s) {', '.join(unknown)}; its fields are: "
                          + "; ".join(f"{k} ({v})" for k, v in MODEL_FIELDS.items()))
    spec = _spec(model)
    weights = model.get("weights", "pretrained")
    _choice("model.weights", weights, WEIGHTS)
    dtype = model.get("dtype", "float32")
    _choice("model.dtype", dtype, DTYPES)
    device = _check_device(model.get("device", "auto"))
    device_map = _check_device_map(model.get("device_map"), model.get("device", "auto"))
    if device_map is not None and not isinstance(device_map, str):
        device = next((torch.device(d if isinstance(d, str) else f"cuda:{d}") for d in device_map.values()), device)
    attn = model.get("attn_implementation", "sdpa")
    _check_attention(attn, device)
    path = model.get("path")
    path = None if path in ("???", "", None) else str(path)
    if path is None:
        path = spec.default_path()
    if weights == "pretrained" and not path:
        raise ConfigError(f"model.path is required for model={spec.name} (a local checkpoint directory"
                          + (f", e.g. a copy of {spec.hub_id})" if spec.hub_id else ")")
                          + "; or weights=random for the architecture with random weights")
    try:
        options = adapter_named(spec.family).check_options(model_options(model))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    processor = model.get("processor") or {}
    if not isinstance(processor, dict):
        raise ConfigError(f"model.processor must be a mapping of processor options, got {processor!r}")
    offline = hub_offline() if path and is_hub_id(path) else None
    try:
        config = architecture_config(spec, path, weights, offline_reason=offline)
        spread = device_map if isinstance(device_map, str) else None
        if device_map is None and model.get("device", "auto") == "auto" and torchrun_ranks() is None:
            spread = auto_device_map(spec.family, config, DTYPES[dtype])  # what load_model will do
        if spread is not None:  # planned on the meta device: refused here when the GPUs are too small
            plan_placement(spec.name, spec.family, config, DTYPES[dtype], spread,
                           field=None if device_map is not None else "model.device=auto (over all visible GPUs)")
    except ModelCheckError as error:
        raise ConfigError(str(error)) from error
    fields = {**model, "name": spec.name, "family": spec.family, "path": path, "weights": weights, "dtype": dtype,
              "device": model.get("device", "auto"), "device_map": device_map, "attn_implementation": attn, **options,
              "processor": processor, "seed": seed}
    return CheckedModel(fields, spec, config, model_info_from_config(config, spec.family))


def _spec(model: dict) -> ModelSpec:
    """The named model, or a model of the user's own (``family`` + ``path`` / ``architecture``), registered."""
    name, family = model.get("name"), model.get("family")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model.name must be a model name; available models: {', '.join(available_models())}")
    if family is not None:
        try:
            adapter_named(family)
        except ValueError as error:
            raise ConfigError(f"model.family={family!r}: {error}") from error
    architecture = model.get("architecture")
    if architecture is not None and architecture not in available_models():
        raise ConfigError(f"model.architecture={architecture!r} is unknown; available models: "
                          f"{', '.join(available_models())}")
    if name in available_models():
        spec = model_spec(name)
        if family is not None and family != spec.family:
            raise ConfigError(f"model.family={family!r} does not match model={name}, which is of the "
                              f"{spec.family!r} family")
        if architecture is not None:
            raise ConfigError(f"model.architecture is for models of your own; model={name} has its own")
        return spec
    if family is None:
        raise ConfigError(f"model={name!r} is unknown; available models: {', '.join(available_models())}. "
                          "To define a model of your own, give its YAML a 'family' (one of the registered families) "
                          "and a 'path' (or an 'architecture')")
    if architecture is not None and model_spec(architecture).family != family:
        raise ConfigError(f"model.architecture={architecture!r} is of the {model_spec(architecture).family!r} family, "
                          f"not {family!r}")

    def random_config():
        if architecture is None:
            raise ConfigError(f"model={name} with weights=random needs model.path (whose config.json gives the "
                              "architecture) or model.architecture (a named model)")
        return model_spec(architecture).random_config()

    return register_model(ModelSpec(name, family, None, random_config, description=f"user-defined ({family})"))


def _choice(field_name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{field_name}={value!r} is not allowed; choose from {list(allowed)}")


def _check_device(device) -> torch.device:
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise ConfigError(f"model.device={device!r} is not allowed; choose from auto, cpu, cuda, cuda:N, mps")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={device!r} but CUDA is not available; use model.device=cpu or auto")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device={device!r} but there are {torch.cuda.device_count()} CUDA devices")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device={device!r} but MPS is not available; use model.device=cpu or auto")
    return target


def _check_device_map(device_map, device: str):
    """``model.device_map``: null, a strategy of accelerate's over the visible GPUs, or ``{module: device}``."""
    if device_map is None:
        return None
    if device != "auto":
        raise ConfigError(f"model.device_map={device_map!r} and model.device={device!r}: give one of them (the map "
                          "places the model itself)")
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError("model.device_map needs the accelerate package, which is not installed (pip install "
                          "accelerate)")
    if isinstance(device_map, str):
        _choice("model.device_map", device_map, DEVICE_MAPS)
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device_map={device_map} spreads the model over the visible GPUs, but CUDA is not "
                              "available; use model.device=cpu")
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise ConfigError(f"model.device_map must be one of {list(DEVICE_MAPS)} or a mapping {{module: device}}, "
                          f"got {device_map!r}")
    for module, target in device_map.items():
        if not isinstance(module, str):
            raise ConfigError(f"model.device_map: module names are strings, got {module!r}")
        if isinstance(target, int) and not isinstance(target, bool):
            target = f"cuda:{target}"
        if not isinstance(target, str) or not DEVICE_PATTERN.match(target) or target == "auto":
            raise ConfigError(f"model.device_map[{module!r}]={target!r} is not a device; use cpu, cuda:N or N")
        _check_device(target)
    return dict(device_map)


def _check_attention(attn, device: torch.device) -> None:
    _choice("model.attn_implementation", attn, ATTN_IMPLEMENTATIONS)
    package = FLASH_PACKAGES.get(attn)
    if package is None:
        return
    if device.type != "cuda":
        raise ConfigError(f"model.attn_implementation={attn!r} needs a CUDA device (model.device is {device}); "
                          "use sdpa or eager")
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"model.attn_implementation={attn!r} needs the {package} package, which is not installed; "
                          "install it or use sdpa")


# ---------------------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------------------
def check_dataset(fields: dict):
    """Validate the dataset's fields and build it (tables are read, no sample is decoded)."""
    fields = dict(fields)
    name = fields.pop("name", None)
    if name not in available_datasets():
        raise ConfigError(f"dataset={name!r} is unknown; available datasets: {', '.join(available_datasets())}")
    cls = dataset_class(name)
    field_names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if "hub_names" in field_names and not fields.get("path"):
        reason = hub_offline()
        if reason:
            raise ConfigError(
                f"dataset={name} needs the Hugging Face hub (dataset.path is not set), but the hub cannot be reached "
                f"({reason}). Download {getattr(cls, 'download', '') or 'the dataset'} and set dataset.path to the "
                "local copy (see docs/datasets.md)")
    try:
        return create_dataset(name, **fields)
    except (ValueError, TypeError) as error:  # DatasetError included
        raise ConfigError(f"dataset={name}: {error}") from error


def dataset_identity(dataset, fields: dict) -> dict:
    """What makes two runs' datasets the same (the exact sample ids are added from the records): the name and
    every field except where the data lives and which subset was drawn."""
    location = {"path", "hub_names", "video_dir", "cache_dir", "images_path", "limit", "seed", "n_samples"}
    settings = {k: v for k, v in fields.items() if k not in location and k != "name"}
    return {"name": dataset.name, "split": fields.get("split"), "fields": settings}


# ---------------------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------------------
def check_methods(methods: dict, info: ModelInfo) -> None:
    """Each method's model-dependent checks (layer ranges, RoPE kind) against the architecture."""
    for label, method in methods.items():
        try:
            method.validate(info)
        except ValueError as error:
            raise ConfigError(f"{label}: {error}") from error


__all__ = ["ConfigError", "CheckedModel", "DatasetError", "check_dataset", "check_methods", "check_model",
           "dataset_identity"]
