"""The benchmark runner: per sample, prepare → (unpruned run) → method run(s) → score → record.

Everything that can be checked is checked before any model work (``build_plan``: every field, the architecture
from ``config.json``, layer ranges, the hub when needed, sample ids). Then the run directory is locked and
its ``run.json`` written. A sample that fails — a corrupt image, a missing file, an out-of-memory error, a
generation error — is recorded with its error and the run goes on; memory is released after every sample;
results already written are never lost.

Sharded runs: a process that is shard i of n (``run.shard=i/n``, or rank i of a torchrun group) writes its own
results file (``ResultStore``), runs its share of the samples that no results file of the directory holds yet
(``samples_to_run``), and the shards are merged into one result set at the end (``merge_run``): by rank 0 of a
torchrun group, by the last independent shard to finish, or by ``python -m tokenprune.merge``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import random
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .. import methods as method_registry
from ..methods.pdrop import stage_boundaries
from ..models import load_model, model_options
from .checks import ConfigError, check_dataset, check_methods, check_model, dataset_identity
from . import distributed
from .baselines import BaselineCache, auto_baseline_cache
from .measure import cut_at_stop, end_of_turn_ids, measure_generation, release_memory
from .results import (SUMMARY_FILE, ResultStore, RunDirectoryBusy, RunDirectoryLock, Shard, format_table,
                      is_error_record, merge_shards, read_records, summarize)

log = logging.getLogger("tokenprune")

# The embedded comparison (`run.compare=embedded`, selected by `experiment=embedded`, the no-argument command):
# every honest baseline and both attention-ranked methods at three budgets, beside the unpruned model.
EMBEDDED_KEEP_RATIOS = (0.5, 0.25, 0.125)
MODEL_METHOD_DIR = Path(__file__).resolve().parent.parent / "conf" / "model_method"
TIMING_KEYS = ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "total_ms", "overhead_ms")
MEMORY_KEYS = ("peak_memory_bytes", "extra_peak_memory_bytes", "memory_kind", "kv_cache_bytes")

__all__ = ["ConfigError", "Plan", "RunInterrupted", "build_plan", "merge_run", "run_benchmark", "samples_to_run"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: what was done, and where (the records written so far are kept)."""

    def __init__(self, done: int, total: int, run_dir: Path):
        super().__init__(f"interrupted after {done} of {total} samples")
        self.done, self.total, self.run_dir = done, total, run_dir


@dataclass
class Plan:
    model: dict  # checked model fields
    methods: dict  # label -> Method
    dataset: object
    indices: list[int]  # the dataset indices of this run's samples
    max_new_tokens: int
    output_dir: Path | None
    paired: bool
    baseline_label: str | None
    logger: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)  # model, dataset and settings that make runs comparable
    seed: int = 0
    retry_errors: bool = False
    shard: Shard | None = None  # run.shard=i/n: this job runs shard i of n (torchrun ranks find theirs at start)
    baseline_cache: Path | None = None  # where unpruned outputs are shared between runs (run.baseline_cache)

    def signature(self) -> dict:
        return {"model": self.model, "methods": {k: m.describe() for k, m in self.methods.items()},
                "dataset": self.config.get("dataset"), "max_new_tokens": self.max_new_tokens,
                "identity": self.identity}


def method_label(method) -> str:
    """``name`` for default fields, else ``name(field=value,...)`` with the fields that differ."""
    if not dataclasses.is_dataclass(method):
        return method.name
    defaults = dataclasses.asdict(type(method)()) if _has_defaults(type(method)) else {}
    changed = {k: v for k, v in dataclasses.asdict(method).items() if defaults.get(k, object()) != v}
    if not changed:
        return method.name
    return method.name + "(" + ",".join(f"{k}={_compact(v)}" for k, v in sorted(changed.items())) + ")"


def _has_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls) if f.init)


def _compact(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_compact(v) for v in value) + "]"
    return str(value)


def embedded_comparison(num_layers: int) -> list[dict]:
    """Method specs of the embedded comparison table (random, uniform, FastV, PDrop at three budgets)."""
    pdrop_layers = stage_boundaries(num_layers)
    specs = []
    for ratio in EMBEDDED_KEEP_RATIOS:
        specs += [{"name": "random", "keep_ratio": ratio}, {"name": "uniform", "keep_ratio": ratio},
                  {"name": "fastv", "keep_ratio": ratio},
                  {"name": "pdrop", "layers": pdrop_layers,
                   "ratios": [ratio / 2**i for i in range(len(pdrop_layers))]}]
    return specs


def _as_dict(node, where: str = "", strict: bool = False) -> dict:
    """A config node as a plain dict; ``strict``: a required value (``???``) left unset is a ConfigError."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return dict(node)
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=strict)
    except MissingMandatoryValue as error:
        key = f"{where}.{error.full_key}" if where and not str(error.full_key).startswith(where) else error.full_key
        raise ConfigError(f"{key} is required (it is ??? in the configuration); give it on the command line, "
                          f"e.g. {key}=...") from error


def model_method_settings(model_name: str, method_name: str) -> dict:
    """The fields of ``conf/model_method/<model>_<method>.yaml`` (empty if none): what Hydra's optional
    ``model_method`` default applies to ``method=``, applied to ``run.compare`` entries too."""
    path = MODEL_METHOD_DIR / f"{model_name}_{method_name}.yaml"
    return _as_dict(OmegaConf.load(path)) if path.is_file() else {}


def _create_method(spec, where: str, model_name: str | None = None, seed: int | None = None):
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    if "name" not in spec:
        raise ConfigError(f"{where} needs a 'name'; available methods: {', '.join(method_registry.available())}")
    if model_name is not None:  # the entry's own fields win over the model's settings
        spec = {**model_method_settings(model_name, spec["name"]), **spec}
    name = spec.pop("name")
    try:
        cls = method_registry.method_class(name)
        if seed is not None and "seed" not in spec and dataclasses.is_dataclass(cls) and \
                "seed" in {f.name for f in dataclasses.fields(cls)}:
            spec["seed"] = seed  # a seeded method not given its own seed follows run.seed
        return method_registry.create(name, **spec)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {error}") from error


def _check_count(name: str, value, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{name} must be an integer >= {minimum} or null, got {value!r}")


def build_plan(cfg: DictConfig, resolve_output_dir: bool = True) -> Plan:
    """Validate the whole configuration and build methods and dataset; no model weight is loaded here.

    ``resolve_output_dir=False``: check a sweep job's configuration before Hydra has given it a directory.
    """
    run = cfg.run
    seed = run.get("seed", 0)
    _check_count("run.seed", seed, 0)
    seed = seed or 0
    model = check_model(_as_dict(cfg.model, "model"), seed=seed)
    max_new_tokens = run.get("max_new_tokens")
    _check_count("run.max_new_tokens", max_new_tokens, 1)
    retry_errors = run.get("retry_errors", False)
    if not isinstance(retry_errors, bool):
        raise ConfigError(f"run.retry_errors must be true or false, got {retry_errors!r}")

    shard = _check_shard(run, model.fields)
    baseline_cache = _baseline_cache_dir(run.get("baseline_cache"))

    dataset_cfg = _dataset_fields(cfg)
    dataset = check_dataset(dataset_cfg)

    main = _create_method(_as_dict(cfg.method, "method", strict=True), "method")
    compare = run.get("compare")
    if compare == "embedded":
        compare = embedded_comparison(model.info.num_layers)
    elif compare == "auto":
        raise ConfigError("run.compare=auto was removed: the embedded comparison is the preset experiment=embedded "
                          "(what python -m tokenprune runs when the command names no method)")
    elif compare is None:
        compare = []
    elif not isinstance(compare, (list, ListConfig)):
        raise ConfigError(f"run.compare must be a list of method specs or 'embedded', got {compare!r}")
    methods: dict = {}
    paired = run.get("paired", True)
    if not isinstance(paired, bool):
        raise ConfigError(f"run.paired must be true or false, got {paired!r}")
    if paired:
        methods["baseline"] = method_registry.create("baseline")
    for index, method_spec in enumerate([main, *_as_list(compare)]):
        method = method_spec if isinstance(method_spec, method_registry.Method) else \
            _create_method(method_spec, f"run.compare[{index - 1}]", model_name=model.spec.name, seed=seed)
        methods.setdefault(method_label(method), method)
    check_methods(methods, model.info)

    logger = _as_dict(cfg.logger) if cfg.get("logger") is not None else {"name": "none"}
    if logger.get("name") not in ("none", "wandb"):
        raise ConfigError(f"logger={logger.get('name')!r} is unknown; choose from ['none', 'wandb']")
    indices = list(range(len(dataset)))
    _check_unique_ids(dataset, indices)
    identity = {"model": model.identity, "dataset": dataset_identity(dataset, dataset_cfg),
                "settings": {"max_new_tokens": max_new_tokens or dataset.max_new_tokens, "paired": paired,
                             **{k: model.fields[k] for k in ("attn_implementation", "video", "processor")}}}
    return Plan(model=model.fields, methods=methods, dataset=dataset, indices=indices,
                max_new_tokens=max_new_tokens or dataset.max_new_tokens,
                output_dir=Path(run.output_dir) if resolve_output_dir else None, paired=paired,
                baseline_label="baseline" if paired else None, logger=logger, config={"dataset": dataset_cfg},
                identity=identity, seed=seed, retry_errors=retry_errors, shard=shard, baseline_cache=baseline_cache)


def _check_shard(run, model_fields: dict) -> Shard | None:
    """``run.shard`` (``i/n``), checked together with torchrun's ranks and the model's placement."""
    if run.get("shards") is not None:
        raise ConfigError(f"run.shards={run.get('shards')} fans one configuration out into shard jobs of a sweep "
                          "(python -m tokenprune -m run.shards=N ...); one job takes run.shard=i/n")
    ranks = distributed.torchrun_ranks()
    text = run.get("shard")
    try:
        shard = None if text is None else Shard.parse(text)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if ranks is not None:
        if shard is not None:
            raise ConfigError(f"run.shard={text} under torchrun: the ranks are the shards (rank i of n); give one or "
                              "the other")
        if model_fields.get("device_map") is not None:
            raise ConfigError("model.device_map under torchrun: each rank takes one GPU (data parallel); a model "
                              "spread over the GPUs runs in one process (python -m tokenprune ...)")
        try:
            distributed.rank_device(model_fields.get("device", "auto"), distributed.Group(*ranks))
        except ValueError as error:
            raise ConfigError(str(error)) from error
    return shard if shard is None or shard.count > 1 else None


def _baseline_cache_dir(value) -> Path | None:
    """``run.baseline_cache``: null (off), ``auto`` (a sweep's own cache, ``<sweep dir>/baseline_cache``) or a
    directory shared by any runs that point to it."""
    if value is None or value is False:
        return None
    if value == "auto":
        return auto_baseline_cache()
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"run.baseline_cache must be null, auto or a directory, got {value!r}")
    return Path(value)


def _dataset_fields(cfg) -> dict:
    """``dataset.*`` with the deprecated sample counts mapped onto ``dataset.limit`` (said once)."""
    fields = _as_dict(cfg.dataset, "dataset", strict=True)
    for owner, value in (("dataset.n_samples", fields.pop("n_samples", None)),
                         ("run.n_samples", cfg.run.get("n_samples"))):
        if value is None:
            continue
        _check_count(owner, value, 0)
        log.warning("%s is deprecated: use dataset.limit=%s (dataset.seed picks which samples)", owner, value)
        fields["limit"] = value
    return fields


def _check_unique_ids(dataset, indices: list[int]) -> None:
    """Resuming finds finished samples by id: two samples with one id would collapse into one."""
    seen: dict[str, int] = {}
    repeated = []
    for index in indices:
        sample_id = _sample_id(dataset, index)
        if sample_id in seen:
            repeated.append(f"{sample_id!r} (samples {seen[sample_id]} and {index})")
        seen.setdefault(sample_id, index)
    if repeated:
        raise ConfigError(f"dataset={dataset.name}: sample ids must be unique; repeated: {', '.join(repeated[:10])}")


def _as_list(value) -> list:
    return list(OmegaConf.to_container(value, resolve=True)) if isinstance(value, ListConfig) else list(value)


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------
def samples_to_run(plan: Plan, done: dict, shard: Shard | None = None, balanced: bool = False) -> list[int]:
    """Which of the plan's samples this process runs: those no results file of the directory holds (``done``), and
    of those, a shard's share. ``balanced`` (a torchrun group, whose ranks all read the same ``done``): every n-th of
    the samples left, from the i-th; otherwise (independent jobs, which start at different times): the samples at
    positions i, i + n, i + 2n, ... of the dataset. Either way every sample left belongs to exactly one shard."""
    if shard is None:
        return [i for i in plan.indices if _sample_id(plan.dataset, i) not in done]
    if balanced:
        return samples_to_run(plan, done)[shard.index :: shard.count]
    return [i for position, i in enumerate(plan.indices)
            if position % shard.count == shard.index and _sample_id(plan.dataset, i) not in done]


def open_store(plan: Plan, shard: Shard | None = None) -> ResultStore:
    """Where this process's records go: its results file in the run directory, locked (a second writer of the
    directory, or of the same shard, is refused)."""
    try:
        return ResultStore(plan.output_dir, plan.signature(), shard)
    except (RunDirectoryBusy, ValueError) as error:  # busy, or the directory holds results of another configuration
        raise ConfigError(str(error)) from error


def run_benchmark(cfg: DictConfig, plan: Plan | None = None) -> dict:
    """Run (or resume) a benchmark, one process or one shard; returns the summary (also written to
    ``summary.json``), or a shard's own counts when another process merges the run."""
    plan = plan or build_plan(cfg)
    group = distributed.start()  # None outside torchrun
    shard = group.shard if group is not None else plan.shard
    device = distributed.rank_device(plan.model.get("device", "auto"), group) if group else None
    where = f" (shard {shard.index} of {shard.count})" if shard else ""
    print(f"tokenprune: run directory {plan.output_dir}{where}", flush=True)
    labels = list(plan.methods)
    try:
        with open_store(plan, shard) as store:
            _write_config(plan.output_dir, cfg)
            own = store.load()
            if plan.retry_errors and shard is None:
                failed = {sample_id for sample_id, record in own.items() if is_error_record(record)}
                if failed:
                    store.drop(failed)
                    print(f"retrying {len(failed)} sample(s) whose records hold errors", flush=True)
            if group is not None:
                group.barrier()  # every rank has opened (and repaired) its own file before any rank reads them all
            done = {record["id"]: record for record in read_records(plan.output_dir)}
            if plan.retry_errors and shard is not None:  # a new record without an error wins over the old one
                done = {k: v for k, v in done.items() if not is_error_record(v)}
            if group is not None:
                group.barrier()  # every rank has read every file before any rank writes
            todo = samples_to_run(plan, done, shard, balanced=group is not None)
            left = len(samples_to_run(plan, done))
            if done and (group is None or group.rank == 0):
                print(f"resumed: {len(plan.indices) - left} of {len(plan.indices)} samples done", flush=True)
            sink = _make_sink(plan, cfg) if shard is None else None
            if todo:
                _run_samples(plan, cfg, store, done, todo, labels, sink, device=device,
                             show_progress=group is None or group.rank == 0)
        if shard is None:
            return finish_run(plan, cfg, sink)
        if group is not None and group.rank == 0:  # wait for the other ranks to release their shards, then merge
            return merge_run(plan, cfg, blocking=True)
        return (merge_run(plan, cfg, blocking=False, complete_only=True) if group is None else None) or \
            _shard_payload(plan, shard, todo, merger="rank 0" if group is not None else None)
    finally:
        if group is not None:
            group.close()


def merge_run(plan: Plan, cfg, blocking: bool = False, complete_only: bool = False) -> dict | None:
    """Merge the shards of the run directory and write its summary, once no shard is being written (``blocking``:
    wait for them). None when a shard is still being written, or with ``complete_only`` while samples are missing.
    ShardMismatch (a ValueError) when the shards come from different configurations."""
    lock = RunDirectoryLock(plan.output_dir)
    try:
        lock.acquire(blocking=blocking)
    except RunDirectoryBusy:
        return None
    with lock:
        if complete_only:
            recorded = {record["id"] for record in read_records(plan.output_dir)}
            if any(_sample_id(plan.dataset, i) not in recorded for i in plan.indices):
                return None
        merge_shards(plan.output_dir)
        return finish_run(plan, cfg, sink=_make_sink(plan, cfg), log_samples=True)


def finish_run(plan: Plan, cfg, sink=None, log_samples: bool = False) -> dict:
    """The summary of the whole run directory: ``summary.json``, the printed table, the W&B summary (``log_samples``:
    the W&B run also gets every record, for a run whose samples were written by shards)."""
    labels = list(plan.methods)
    records = read_records(plan.output_dir)
    summary = summarize(records, labels, plan.dataset.scorer, plan.baseline_label)
    if sink is not None:
        if log_samples:
            for record in records:
                sink.log_sample(record, labels)
        sink.finish(records, summary, labels)
    errors = error_kinds(records)
    payload = {"model": plan.model["name"], "dataset": plan.dataset.name, "samples": len(plan.indices),
               "methods": summary, "identity": plan.identity, "scored": _scored_samples(records),
               "errors_by_kind": errors}
    (plan.output_dir / SUMMARY_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    print(format_table(summary, f"{plan.dataset.name} · {plan.model['name']} · {len(plan.indices)} samples"))
    if errors:
        print("errors by kind: " + ", ".join(f"{kind} × {count}" for kind, count in errors.items()))
    print(f"tokenprune: results in {plan.output_dir} (results.jsonl, summary.json)", flush=True)
    return payload


def _shard_payload(plan: Plan, shard: Shard, ran: list[int], merger: str | None = None) -> dict:
    """What a shard that did not merge the run reports: its own samples of this invocation."""
    mine = {_sample_id(plan.dataset, i) for i in ran}
    everything = read_records(plan.output_dir)
    records = [record for record in everything if record["id"] in mine]
    how = f"{merger} merges the shards" if merger else (f"the shards merge when the last one finishes (or: python -m "
                                                         f"tokenprune.merge {plan.output_dir})")
    print(f"tokenprune: shard {shard.index} of {shard.count} ran {len(ran)} samples; the run directory holds "
          f"{len(everything)} of {len(plan.indices)}; {how}", flush=True)
    return {"model": plan.model["name"], "dataset": plan.dataset.name, "samples": len(ran), "shard": shard.name,
            "scored": _scored_samples(records), "errors_by_kind": error_kinds(records), "merged": False}


def _write_config(run_dir: Path, cfg) -> None:
    """``config.yaml`` (written beside it and renamed: shards of a run write it at the same time)."""
    partial = run_dir / f".config.yaml.{os.getpid()}"
    partial.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    partial.replace(run_dir / "config.yaml")


def _run_samples(plan: Plan, cfg, store: ResultStore, done: dict, todo: list[int], labels: list[str], sink,
                 device: str | None = None, show_progress: bool = True) -> None:
    vlm = load_vlm(plan.model if device is None else {**plan.model, "device": device})
    # The model's objects never become garbage: move them out of the collector's sight, so the per-sample
    # collection (which frees cyclic garbage left by a failed or finished generation) stays cheap.
    gc.collect()
    gc.freeze()
    eos = end_of_turn_ids(vlm) or None
    baselines = BaselineCache(plan.baseline_cache, vlm, plan, eos) if plan.baseline_cache is not None else None
    main_label = labels[1] if plan.paired and len(labels) > 1 else labels[0]
    running = {"correct": 0.0, "n": 0}
    for record in done.values():
        _update_running(running, record, main_label)
    total = len(plan.indices) if store.shard is None else len(todo)  # a shard counts its own share
    finished = total - len(todo)
    progress = _progress(cfg, total=total, initial=finished, show=show_progress)
    try:
        for index in todo:
            _seed_everything(plan.seed)  # each sample sees the same random state, whatever ran before it
            record = run_sample(vlm, plan, index, eos, baselines)
            store.append(record)
            finished += 1
            _update_running(running, record, main_label)
            if sink is not None:
                sink.log_sample(record, labels)
            progress.update(1)
            if running["n"]:
                progress.set_postfix_str(f"{main_label} acc {100 * running['correct'] / running['n']:.1f}%")
            release_memory()
    except KeyboardInterrupt as interrupt:
        raise RunInterrupted(finished, total, plan.output_dir) from interrupt
    finally:
        progress.close()
        gc.unfreeze()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def error_kinds(records: list[dict]) -> dict[str, int]:
    """How many errors of each kind (``ModelInputError``, ``out of memory``, ...): a failed sample counts once,
    a failed method run on a prepared sample once per method."""
    kinds = Counter()
    for record in records:
        if record.get("error") is not None:
            kinds[_kind(record["error"])] += 1
            continue
        for run in record.get("runs", {}).values():
            if run.get("error") is not None:
                kinds[_kind(run["error"])] += 1
    return dict(kinds.most_common())


def _kind(error: str) -> str:
    return str(error).split(":", 1)[0].strip() or "error"


def _scored_samples(records: list[dict]) -> int:
    return sum(1 for r in records if any(run.get("score") is not None for run in r.get("runs", {}).values()))


def load_vlm(model: dict):
    """Load the checked model (``plan.model``), with the processor options of a user's model YAML."""
    vlm = load_model(model["name"], path=model.get("path"), weights=model.get("weights", "pretrained"),
                     dtype=model.get("dtype", "float32"), device=model.get("device", "auto"),
                     attn_implementation=model.get("attn_implementation", "sdpa"), seed=model.get("seed", 0),
                     options=model_options(model), device_map=model.get("device_map"))
    if model.get("processor") and model.get("path"):
        from transformers import AutoProcessor

        vlm.processor = AutoProcessor.from_pretrained(model["path"], **model["processor"])
    return vlm


def _sample_id(dataset, index: int) -> str:
    try:
        return dataset.sample_id(index)
    except Exception:  # the sample itself is broken: its index identifies it
        return f"index-{index}"


def run_sample(vlm, plan: Plan, index: int, eos, baselines: BaselineCache | None = None) -> dict:
    """Prepare one sample and run every method on it; never raises for a bad sample."""
    record = {"index": index, "id": f"index-{index}", "question": None, "answer": None, "meta": {}, "error": None,
              "runs": {}}
    try:
        sample = plan.dataset[index]
        record.update(id=sample.id, question=sample.question, answer=sample.answer, meta=dict(sample.meta))
        if not str(sample.question or "").strip():
            log.warning("sample %s: the question is empty", sample.id)
        inputs = vlm.prepare(sample)
    except Exception as error:  # corrupt image, missing file, unreadable video, bad row
        record["error"] = _describe(error)
        log.warning("sample %s: %s", record["id"], record["error"])
        return record
    for label, method in plan.methods.items():
        if baselines is not None and method.is_noop:  # the unpruned run, shared with other runs of the same inputs
            record["runs"][label] = baselines.run(inputs, sample, lambda: run_method(vlm, inputs, method, sample, plan, eos))
        else:
            record["runs"][label] = run_method(vlm, inputs, method, sample, plan, eos)
    del inputs
    return record


def run_method(vlm, inputs, method, sample, plan: Plan, eos) -> dict:
    try:
        if method.uses_before_processor:  # the method changes the preprocessing (downsample): its own inputs
            inputs = vlm.prepare(sample, method)
        measured = measure_generation(vlm, inputs, method, plan.max_new_tokens, eos_token_id=eos,
                                      stop_strings=plan.dataset.stop)
    except Exception as error:  # out of memory, generation error: record and go on
        release_memory()
        text = _describe(error)
        log.warning("sample %s, %s: %s", sample.id, method.name, text)
        log.debug("".join(traceback.format_exception(error)))
        return {"prediction": None, "score": None, "error": text}
    prediction = cut_at_stop(vlm.decode(measured.output_ids[0]), plan.dataset.stop)
    metrics = measured.metrics
    run = {"prediction": prediction, "score": float(plan.dataset.scorer.score(prediction, sample)), "error": None,
           "timing": {k: metrics.pop(k) for k in TIMING_KEYS},
           "memory": {k: metrics.pop(k) for k in MEMORY_KEYS}}
    run.update(metrics)
    if measured.report is not None and measured.report.kept:
        run["kept_layers"] = sorted(measured.report.kept)
    return run


def _describe(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        return f"out of memory: {error}"
    return f"{type(error).__name__}: {error}"


def _update_running(running: dict, record: dict, label: str) -> None:
    run = record.get("runs", {}).get(label)
    if run is not None and run.get("score") is not None:
        running["correct"] += run["score"]
        running["n"] += 1


def _progress(cfg, total: int, initial: int, show: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="samples", disable=not (show and cfg.run.get("progress", True)),
                dynamic_ncols=True)


def _make_sink(plan: Plan, cfg):
    if plan.logger.get("name") != "wandb":
        return None
    from .wandb_sink import WandbSink

    return WandbSink(plan, cfg)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
