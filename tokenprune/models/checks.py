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
        return proc_kib_bytes("/proc/meminfo", "MemAvailable")
    return None


def proc_kib_bytes(path: str, key: str) -> int | None:
    """Bytes of a ``key: <n> kB`` line of a /proc file (``/proc/meminfo``, ``/proc/self/status``), or None."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(f"{key}:"):
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



# ---------------------------------------------------------------------------------------------------------
# model.device_map: one model spread over the visible GPUs (accelerate), planned on the meta device
# ---------------------------------------------------------------------------------------------------------
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
GPU_HEADROOM = 0.9  # fraction of each GPU's free memory the weights may take (the rest: activations, KV cache)


def meta_model(family: str, config, dtype: torch.dtype):
    """The architecture on the meta device: every parameter and buffer shaped, nothing allocated or initialised."""
    model_class = adapter_named(family).class_for_config(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        with torch.device("meta"):
            return model_class(copy.deepcopy(config))
    finally:
        torch.set_default_dtype(previous)


def gpu_budget() -> dict[int, int]:
    """Bytes each visible GPU may give the weights (``GPU_HEADROOM`` of its free memory)."""
    return {index: int(torch.cuda.mem_get_info(index)[0] * GPU_HEADROOM) for index in range(torch.cuda.device_count())}


def plan_placement(name: str, family: str, config, dtype: torch.dtype, device_map, budget: dict | None = None,
                   field: str | None = None) -> dict:
    """The device of every block of the model (``{module name: device}``) for ``model.device_map``: a mapping of your
    own is returned as given; ``auto`` / ``balanced`` (spread evenly), ``balanced_low_0`` (keep GPU 0 lighter for the
    generation) and ``sequential`` (fill GPU 0 first) are planned by accelerate on the meta device over ``budget``
    (default: ``gpu_budget()``), decoder layers never split. ModelCheckError, with the estimate, when the model does
    not fit on the GPUs (nothing is offloaded to the CPU or disk: the engine needs every layer's weights in place);
    ``field``: the option the error names (default ``model.device_map=...``)."""
    if isinstance(device_map, dict):
        return dict(device_map)
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    budget = gpu_budget() if budget is None else dict(budget)
    model = meta_model(family, config, dtype)
    no_split = model._get_no_split_modules("auto") if hasattr(model, "_get_no_split_modules") else model._no_split_modules
    limits = budget
    if device_map != "sequential":
        limits = get_balanced_memory(model, max_memory=dict(budget), no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=device_map == "balanced_low_0")
        limits = {k: v for k, v in limits.items() if k in budget}
    placement = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    if any(device in ("cpu", "disk") for device in placement.values()) or not placement:
        need = estimate_weight_bytes(family, config, dtype)
        free = sum(budget.values())
        raise ModelCheckError(
            f"{field or f'model.device_map={device_map}'}: {name} in {str(dtype).removeprefix('torch.')} needs about "
            f"{_size(need)} for its weights, and the {len(budget)} visible GPU(s) can give {_size(free)} "
            f"({GPU_HEADROOM:.0%} of their free memory); use more GPUs or a smaller dtype (layers offloaded to the CPU "
            "are not supported)")
    return placement


def device_of(name: str, placement: dict) -> torch.device:
    """The device ``placement`` gives the parameter or buffer ``name`` (its longest matching module prefix)."""
    best = None
    for prefix in placement:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise ModelCheckError(f"model.device_map does not place {name!r}; map every module (or give '' a device)")
    device = placement[best]
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def build_random_placed(name: str, family: str, config, dtype: torch.dtype, attn_implementation: str, seed: int,
                        placement: dict):
    """``weights=random`` spread over devices: the architecture is built on the meta device, every parameter and
    buffer is allocated on its device of ``placement`` and initialised there by the model's own (seeded) init, and
    accelerate's hooks carry the activations across devices. No device ever holds the whole model."""
    from accelerate import dispatch_model

    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    model = meta_model(family, config, dtype)
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for key, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                module._parameters[key] = torch.nn.Parameter(
                    _unset_like(param, device_of(prefix + key, placement)), requires_grad=False)
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[key] = _unset_like(buffer, device_of(prefix + key, placement))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.initialize_weights()  # every parameter and buffer, where it lies
    model.tie_weights()
    unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point() and t.isnan().any()]
    if unset:  # the model's own init skipped them: never benchmark on leftover memory
        raise ModelCheckError(f"model.weights=random with model.device_map: the model's initialisation left "
                              f"{len(unset)} tensor(s) unset ({', '.join(unset[:5])})")
    model.config._attn_implementation = attn_implementation
    devices = {device_of(n, placement) for n, _ in [*model.named_parameters(), *model.named_buffers()]}
    return dispatch_model(model, device_map=placement, force_hooks=len(devices) > 1) if len(devices) > 1 else model


def _unset_like(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor``'s shape and dtype on ``device``, floating values NaN (so that any the init misses are found)."""
    if tensor.is_floating_point():
        return torch.full(tensor.shape, float("nan"), dtype=tensor.dtype, device=device)
    return torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)


def auto_device_map(family: str, config, dtype: torch.dtype, budget: dict | None = None) -> str | None:
    """``model.device=auto`` outside torchrun: ``"auto"`` (accelerate spreads the model over the visible GPUs) when
    there are several GPUs and the weights do not fit into the first one's share (``GPU_HEADROOM`` of its free
    memory); None (the model goes to one device) otherwise: a model that fits one GPU runs fastest on one."""
    budget = (gpu_budget() if torch.cuda.is_available() else {}) if budget is None else budget
    if len(budget) < 2:
        return None
    return "auto" if estimate_weight_bytes(family, config, dtype) > budget[min(budget)] else None


def _size(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
