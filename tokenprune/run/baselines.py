"""Shared baselines: the unpruned model's output on a sample is computed once and reused by every run that asks
for it again — every job of a sweep, every shard, every rerun pointed at the same cache directory.

    run.baseline_cache=auto          # in a sweep: <sweep dir>/baseline_cache (the default); a single run: off
    run.baseline_cache=/scratch/tp   # any runs that name the same directory share it
    run.baseline_cache=null          # off: every run computes its own unpruned run

An entry is keyed by what decides the unpruned output and nothing else: the model (name, weights, checkpoint
fingerprint, dtype), the generation settings (answer length, stop strings, attention backend, run seed, end-of-sequence ids), the
device kind (CPU, or the GPU's name: kernels differ), the torch and transformers versions, and a hash of the
prepared input tensors of the sample (so two datasets that show the same prompt share it, and a changed image never
does). ``<cache>/<settings hash>/<inputs hash>.json`` holds the run as the runner records it; the score is
recomputed from the prediction by the current dataset's scorer. A lock file per entry makes concurrent jobs wait
for the one computing that sample instead of computing it again. Failed runs (an out-of-memory error) are not
stored. Records say ``"baseline_cache": "computed"`` or ``"reused"``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

CACHE_FORMAT = 1  # bump when what a stored run holds changes


def auto_baseline_cache() -> Path | None:
    """``run.baseline_cache=auto``: ``<sweep dir>/baseline_cache`` inside a Hydra multirun, else None (off)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra.sweep.dir) / "baseline_cache"


def inputs_key(inputs: dict) -> str:
    """A hash of a sample's prepared inputs: every tensor's name, dtype, shape and bytes, every other value's repr."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        value = inputs[name]
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            flat = value.detach().contiguous().cpu()
            digest.update(f"{flat.dtype}{tuple(flat.shape)}".encode())
            digest.update(flat.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def device_kind(vlm) -> list[str]:
    """The kinds of device the model runs on: ``cpu``, or each GPU's name."""
    kinds = []
    for device in vlm.devices:
        kinds.append(torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)
    return sorted(set(kinds))


class BaselineCache:
    """The shared unpruned runs of one model and generation settings (one subdirectory of the cache)."""

    def __init__(self, directory: str | Path, vlm, plan, eos_token_id=None):
        import transformers

        settings = {"format": CACHE_FORMAT, "model": plan.identity["model"], "max_new_tokens": plan.max_new_tokens,
                    "seed": plan.seed, "attn_implementation": plan.model.get("attn_implementation"),
                    "eos_token_id": eos_token_id, "stop": list(plan.dataset.stop or ()), "devices": device_kind(vlm),
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
        key = hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
        self.directory = Path(directory) / key
        self.directory.mkdir(parents=True, exist_ok=True)
        settings_file = self.directory / "settings.json"
        if not settings_file.exists():
            _write_atomically(settings_file, json.dumps(settings, indent=2, sort_keys=True, default=str))
        self.scorer = plan.dataset.scorer

    def run(self, inputs: dict, sample, compute: Callable[[], dict]) -> dict:
        """The unpruned run of ``inputs``: the stored one (scored again for ``sample``), or ``compute()``'s, stored
        for the next run that asks."""
        key = inputs_key(inputs)
        entry = self.directory / f"{key}.json"
        with _locked(self.directory / f"{key}.lock"):
            if entry.exists():
                run = json.loads(entry.read_text())
                if run.get("prediction") is not None:
                    run["score"] = float(self.scorer.score(run["prediction"], sample))
                return {**run, "baseline_cache": "reused"}
            run = compute()
            if run.get("error") is None:
                _write_atomically(entry, json.dumps(run, sort_keys=True, default=_plain))
        return {**run, "baseline_cache": "computed"}


@contextmanager
def _locked(path: Path):
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another job computes this sample
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)
