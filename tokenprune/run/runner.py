"""The benchmark runner: per sample, prepare → (unpruned run) → method run(s) → score → record.

Everything that can be checked is checked before the model loads (``build_plan``). A sample that fails —
a corrupt image, a missing file, an out-of-memory error, a generation error — is recorded with its error
and the run goes on; memory is released after every sample; results already written are never lost.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from .. import methods as method_registry
from ..data import available_datasets, create_dataset
from ..methods.pdrop import stage_boundaries
from ..models import adapter_named, available_models, load_model, model_options, model_spec
from .measure import cut_at_stop, end_of_turn_ids, measure_generation, release_memory
from .results import SUMMARY_FILE, ResultStore, format_table, read_records, summarize

log = logging.getLogger("tokenprune")

# The embedded default (`python -m tokenprune` with no arguments): every honest baseline and both
# attention-ranked methods at three budgets, beside the unpruned model.
EMBEDDED_KEEP_RATIOS = (0.5, 0.25, 0.125)
MODEL_METHOD_DIR = Path(__file__).resolve().parent.parent / "conf" / "model_method"
TIMING_KEYS = ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "total_ms", "overhead_ms")
MEMORY_KEYS = ("peak_memory_bytes", "extra_peak_memory_bytes", "memory_kind", "kv_cache_bytes")


class ConfigError(ValueError):
    """A configuration refused at start-up; the message names the field and the allowed values."""


@dataclass
class Plan:
    model: dict
    methods: dict  # label -> Method
    dataset: object
    indices: list[int]
    max_new_tokens: int
    output_dir: Path
    paired: bool
    baseline_label: str | None
    logger: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def signature(self) -> dict:
        return {"model": self.model, "methods": {k: m.describe() for k, m in self.methods.items()},
                "dataset": self.config.get("dataset"), "max_new_tokens": self.max_new_tokens}


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


def _as_dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else dict(node)


def model_method_settings(model_name: str, method_name: str) -> dict:
    """The fields of ``conf/model_method/<model>_<method>.yaml`` (empty if none): what Hydra's optional
    ``model_method`` default applies to ``method=``, applied to ``run.compare`` entries too."""
    path = MODEL_METHOD_DIR / f"{model_name}_{method_name}.yaml"
    return _as_dict(OmegaConf.load(path)) if path.is_file() else {}


def _create_method(spec, where: str, model_name: str | None = None):
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    if "name" not in spec:
        raise ConfigError(f"{where} needs a 'name'; available methods: {', '.join(method_registry.available())}")
    if model_name is not None:  # the entry's own fields win over the model's settings
        spec = {**model_method_settings(model_name, spec["name"]), **spec}
    name = spec.pop("name")
    try:
        return method_registry.create(name, **spec)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {error}") from error


def build_plan(cfg: DictConfig, command_has_arguments: bool = True) -> Plan:
    """Validate the whole configuration and build methods and dataset; no model is loaded here."""
    model = _as_dict(cfg.model)
    name = model.get("name")
    if name not in available_models():
        raise ConfigError(f"model={name!r} is unknown; available models: {', '.join(available_models())}")
    spec = model_spec(name)
    if model.get("path") in ("???", ""):
        model["path"] = None
    if model.get("weights") == "pretrained" and not model.get("path") and spec.default_path() is None:
        raise ConfigError(f"model.path is required for model={name} (a local checkpoint directory"
                          + (f", e.g. a copy of {spec.hub_id})" if spec.hub_id else ")")
                          + "; or weights=random for the architecture with random weights")
    try:
        adapter_named(spec.family).check_options(model_options(model))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    run = cfg.run
    n_samples = run.get("n_samples")
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0):
        raise ConfigError(f"run.n_samples must be a non-negative integer or null, got {n_samples!r}")
    max_new_tokens = run.get("max_new_tokens")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ConfigError(f"run.max_new_tokens must be a positive integer or null, got {max_new_tokens!r}")

    dataset_cfg = _as_dict(cfg.dataset)
    dataset_name = dataset_cfg.pop("name", None)
    if dataset_name not in available_datasets():
        raise ConfigError(f"dataset={dataset_name!r} is unknown; available datasets: {', '.join(available_datasets())}")

    main = _create_method(_as_dict(cfg.method), "method")
    compare = run.get("compare")
    if compare == "embedded" or (compare == "auto" and not command_has_arguments):
        compare = embedded_comparison(_num_layers(spec, model))
    elif compare == "auto":
        compare = []
    elif compare is None:
        compare = []
    elif not isinstance(compare, (list, ListConfig)):
        raise ConfigError(f"run.compare must be a list of method specs, 'auto' or 'embedded', got {compare!r}")
    methods: dict = {}
    paired = bool(run.get("paired", True))
    if paired:
        methods["baseline"] = method_registry.create("baseline")
    for index, method_spec in enumerate([main, *_as_list(compare)]):
        method = method_spec if isinstance(method_spec, method_registry.Method) else \
            _create_method(method_spec, f"run.compare[{index - 1}]", model_name=name)
        methods.setdefault(method_label(method), method)

    logger = _as_dict(cfg.logger) if cfg.get("logger") is not None else {"name": "none"}
    if logger.get("name") not in ("none", "wandb"):
        raise ConfigError(f"logger={logger.get('name')!r} is unknown; choose from ['none', 'wandb']")
    try:
        dataset = create_dataset(dataset_name, **dataset_cfg)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"dataset={dataset_name}: {error}") from error
    total = len(dataset)
    indices = list(range(total if n_samples is None else min(total, n_samples)))
    return Plan(model=model, methods=methods, dataset=dataset, indices=indices,
                max_new_tokens=max_new_tokens or dataset.max_new_tokens, output_dir=Path(run.output_dir),
                paired=paired, baseline_label="baseline" if paired else None, logger=logger,
                config={"dataset": {"name": dataset_name, **dataset_cfg}})


def _as_list(value) -> list:
    return list(OmegaConf.to_container(value, resolve=True)) if isinstance(value, ListConfig) else list(value)


def _num_layers(spec, model: dict) -> int:
    if model.get("path"):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model["path"])
    else:
        config = spec.random_config()
    return config.get_text_config().num_hidden_layers


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------
def run_benchmark(cfg: DictConfig, command_has_arguments: bool = True, plan: Plan | None = None) -> dict:
    """Run (or resume) a benchmark; returns the summary (also written to ``summary.json``)."""
    plan = plan or build_plan(cfg, command_has_arguments)
    store = ResultStore(plan.output_dir, plan.signature())
    (plan.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    done = store.load()
    vlm = _load(plan.model)
    # The model's objects never become garbage: move them out of the collector's sight, so the per-sample
    # collection (which frees cyclic garbage left by a failed or finished generation) stays cheap.
    gc.collect()
    gc.freeze()
    info = vlm.info()
    for label, method in plan.methods.items():
        try:
            method.validate(info)
        except ValueError as error:
            raise ConfigError(f"{label}: {error}") from error
    sink = _make_sink(plan, cfg)
    eos = end_of_turn_ids(vlm) or None
    labels = list(plan.methods)
    main_label = labels[1] if plan.paired and len(labels) > 1 else labels[0]
    running = {"correct": 0.0, "n": 0}
    for record in done.values():
        _update_running(running, record, main_label)
    todo = [i for i in plan.indices if not done or _sample_id(plan.dataset, i) not in done]
    progress = _progress(cfg, total=len(plan.indices), initial=len(plan.indices) - len(todo))
    try:
        for index in todo:
            record = run_sample(vlm, plan, index, eos)
            store.append(record)
            _update_running(running, record, main_label)
            if sink is not None:
                sink.log_sample(record, labels)
            progress.update(1)
            if running["n"]:
                progress.set_postfix_str(f"{main_label} acc {100 * running['correct'] / running['n']:.1f}%")
            release_memory()
    finally:
        progress.close()
        gc.unfreeze()
    records = read_records(plan.output_dir)
    summary = summarize(records, labels, plan.dataset.scorer, plan.baseline_label)
    payload = {"model": plan.model["name"], "dataset": plan.dataset.name, "samples": len(plan.indices),
               "methods": summary}
    (plan.output_dir / SUMMARY_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    table = format_table(summary, f"{plan.dataset.name} · {plan.model['name']} · {len(plan.indices)} samples")
    print(table)
    if sink is not None:
        sink.finish(records, summary, labels)
    return payload


def _load(model: dict):
    return load_model(model["name"], path=model.get("path"), weights=model.get("weights", "pretrained"),
                      dtype=model.get("dtype", "float32"), device=model.get("device", "auto"),
                      attn_implementation=model.get("attn_implementation", "sdpa"), options=model_options(model))


def _sample_id(dataset, index: int) -> str:
    try:
        return dataset.sample_id(index)
    except Exception:  # the sample itself is broken: its index identifies it
        return f"index-{index}"


def run_sample(vlm, plan: Plan, index: int, eos) -> dict:
    """Prepare one sample and run every method on it; never raises for a bad sample."""
    record = {"index": index, "id": f"index-{index}", "question": None, "answer": None, "meta": {}, "error": None,
              "runs": {}}
    try:
        sample = plan.dataset[index]
        record.update(id=sample.id, question=sample.question, answer=sample.answer, meta=dict(sample.meta))
        inputs = vlm.prepare(sample)
    except Exception as error:  # corrupt image, missing file, unreadable video, bad row
        record["error"] = _describe(error)
        log.warning("sample %s: %s", record["id"], record["error"])
        return record
    for label, method in plan.methods.items():
        record["runs"][label] = run_method(vlm, inputs, method, sample, plan, eos)
    del inputs
    return record


def run_method(vlm, inputs, method, sample, plan: Plan, eos) -> dict:
    try:
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


def _progress(cfg, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="samples", disable=not cfg.run.get("progress", True),
                dynamic_ncols=True)


def _make_sink(plan: Plan, cfg):
    if plan.logger.get("name") != "wandb":
        return None
    from .wandb_sink import WandbSink

    return WandbSink(plan, cfg)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
