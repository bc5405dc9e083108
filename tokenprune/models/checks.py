"""Checks of a model that need no weights: its architecture from ``config.json`` (or the named architecture),
whether the checkpoint is of the chosen family, what its decoder looks like to a method, and the memory that
``weights=random`` needs before anything is allocated.

    config = architecture_config(spec, path="/models/llava-1.5-7b-hf", weights="pretrained")  # reads config.json
    info = model_info_from_config(config, spec.family)          # ModelInfo: layers, RoPE kind, hidden size
    method.validate(info)                                        # layer ranges, before loading any weight
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from ..engine.contract import ModelInfo
from .base import ModelSpec, _looks_like_hub_id, adapter_named

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ModelCheckError(ValueError):
    """A model that cannot be used as configured; the message names the field and what is allowed."""


def expected_model_types(family: str) -> list[str]:
    """The ``model_type`` values of ``config.json`` that a family's stock classes load (``llava``, ``qwen2_5_vl``)."""
    return list(dict.fromkeys(c.config_class.model_type for c in adapter_named(family).model_classes))


def is_hub_id(path: str) -> bool:
    return _looks_like_hub_id(str(path))


def architecture_config(spec: ModelSpec, path: str | None, weights: str, offline_reason: str | None = None):
    """The model's transformers config, read without any weight: ``path``'s ``config.json`` (a local directory,
    or a hub id when the hub is reachable or the file is cached), else the named architecture.

    ``offline_reason``: why the hub cannot be reached (None: reachable). Raises ModelCheckError naming the field.
    """
    if not path:
        return spec.random_config()
    from transformers import AutoConfig

    family_type = expected_model_types(spec.family)[0]
    if is_hub_id(path):
        cached = _cached_hub_file(path, "config.json")
        if offline_reason and cached is None:
            raise ModelCheckError(
                f"model.path={path!r} is a Hugging Face hub id, but the hub cannot be reached ({offline_reason}) and "
                f"no copy is in the local cache: download it first (huggingface-cli download {path} --local-dir "
                f"<dir>) and set model.path=<dir>")
        model_type = json.loads(Path(cached).read_text()).get("model_type") if cached else None
    else:
        directory = Path(path)
        if not directory.is_dir():
            raise ModelCheckError(f"model.path={path!r} does not exist (model={spec.name}); give a local checkpoint "
                                  "directory (holding config.json)")
        file = directory / "config.json"
        if not file.is_file():
            raise ModelCheckError(f"model.path={path!r} has no config.json: it is not a transformers checkpoint "
                                  "directory")
        try:
            model_type = json.loads(file.read_text()).get("model_type")
        except json.JSONDecodeError as error:
            raise ModelCheckError(f"model.path={path!r}: config.json is not valid JSON ({error})") from error
    if model_type is not None:
        check_model_type(model_type, spec, path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=bool(offline_reason))
    except (OSError, ValueError, KeyError) as error:
        raise ModelCheckError(f"model.path={path!r}: transformers cannot read its config.json ({error})") from error
    check_model_type(getattr(config, "model_type", None) or family_type, spec, path)
    return config


def check_model_type(model_type: str, spec: ModelSpec, path: str) -> None:
    expected = expected_model_types(spec.family)
    if model_type not in expected:
        loads = " or ".join(repr(t) for t in expected)
        raise ModelCheckError(
            f"model.path={path!r} holds a {model_type!r} checkpoint (config.json model_type), but model={spec.name} "
            f"is of the {spec.family!r} family, which loads {loads} checkpoints; choose a model of the "
            "checkpoint's family or the matching checkpoint")


def _cached_hub_file(repo_id: str, filename: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def model_info_from_config(config, family: str) -> ModelInfo:
    """What a method may check its fields against (``Method.validate``), from a config alone."""
    adapter = adapter_named(family)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelInfo(num_layers=text.num_hidden_layers, rope=adapter.rope_name, hidden_size=text.hidden_size,
                     family=family, reindex_positions=adapter.reindex_positions)


def checkpoint_fingerprint(path: str | None) -> str | None:
    """A short hash of a local checkpoint: its ``config.json`` and the names and sizes of its weight files (reading
    gigabytes of weights would take minutes). The same checkpoint copied elsewhere has the same fingerprint."""
    if not path or not Path(path).is_dir():
        return None
    directory = Path(path)
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for file in sorted(directory.iterdir()):
        if file.suffix in WEIGHT_SUFFIXES and file.is_file():
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# weights=random: estimate first, then build on the target device
# ---------------------------------------------------------------------------------------------------------
def estimate_weight_bytes(family: str, config, dtype: torch.dtype) -> int:
    """Bytes of the parameters and buffers of the architecture in ``dtype``, counted on the meta device (nothing
    is allocated; a 7B model takes well under a second)."""
    model_class = adapter_named(family).class_for_config(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        with torch.device("meta"):
            model = model_class(copy.deepcopy(config))
    finally:
        torch.set_default_dtype(previous)
    total = sum(p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size()) for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (CUDA: free device memory; CPU: the kernel's MemAvailable), or
    None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_random_fits(name: str, family: str, config, dtype: torch.dtype, device: torch.device) -> int:
    """The estimate of ``weights=random``; raises ModelCheckError with it when ``device`` has not that much free."""
    need = estimate_weight_bytes(family, config, dtype)
    free = available_bytes(device)
    if free is not None and need > free:
        raise ModelCheckError(
            f"model.weights=random: {name} in {str(dtype).removeprefix('torch.')} needs about {need / 2**30:.1f} GiB "
            f"for its weights, and {device} has {free / 2**30:.1f} GiB free; choose a smaller model or dtype, or "
            "another model.device")
    return need


def build_random_on_device(name: str, family: str, config, dtype: torch.dtype, attn_implementation: str, seed: int,
                           device: torch.device):
    """The architecture with seeded random weights, created directly on ``device`` (a 7B model is never built in
    host memory first), after checking that it fits there."""
    check_random_fits(name, family, config, dtype, device)
    with torch.device(device):
        return adapter_named(family).build_random(config, dtype, attn_implementation, seed)

