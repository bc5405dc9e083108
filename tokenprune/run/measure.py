"""Measure one generation: latency split (vision encoder, prefill, decode), memory, KV cache, tokens, FLOPs.

Timing uses forward hooks on the vision encoder, the text decoder and the whole model, with CUDA events on
GPU (read after one synchronisation at the end) and ``perf_counter`` on CPU:

* ``vision_ms``: time inside the vision encoder;
* ``prefill_ms``: the text decoder's first call (decoder prefill, pruning overhead included);
* ``ttft_ms``: from the start of ``generate`` to the end of the first forward (time to first token);
* ``decode_ms_per_token``: mean duration of the later forwards (one new token each);
* ``total_ms``: the whole ``generate`` call.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import weakref
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from transformers import StoppingCriteria, StoppingCriteriaList

from ..engine.apply import apply
from ..engine.compat import output_cache
from ..engine.flops import all_conventions
from ..models.checks import proc_kib_bytes


class Clock:
    """Timestamps on the model's device: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Spans:
    """Start / end timestamps of every call of one module (forward pre-hook / forward hook).

    Hooks run in registration order: register a ``Spans`` before other hooks on the module (e.g. before
    ``tokenprune.apply``) so that their work falls inside the measured span.
    """

    def __init__(self, module, clock: Clock):
        self.clock, self.starts, self.ends = clock, [], []
        self._handles = [module.register_forward_pre_hook(lambda *a: self.starts.append(clock.now())),
                         module.register_forward_hook(lambda *a: self.ends.append(clock.now()))]

    def remove(self):
        for handle in self._handles:
            handle.remove()

    def durations_ms(self) -> list[float]:
        return [self.clock.elapsed_ms(s, e) for s, e in zip(self.starts, self.ends)]


@dataclass
class RunMeasurement:
    output_ids: torch.Tensor  # [1, new_tokens] generated ids (prompt removed)
    report: object | None  # PrefillReport, None for methods that install nothing
    metrics: dict = field(default_factory=dict)


class HostReads(TorchFunctionMode):
    """Counts the tensor operations that read device values back to the host — each one a host-device
    synchronisation on a GPU (``item``, ``tolist``, ``bool`` / ``int`` / ``float`` of a tensor, ``nonzero``,
    boolean-mask indexing, ``masked_select``, ``unique``). Works on CPU, where CUDA's sync debug mode cannot::

        with HostReads() as reads:
            model(**inputs)
        len(reads.calls), reads.calls[0]   # ("nonzero", "tokenprune/methods/fastv.py:49")
    """

    READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                       "masked_select", "unique"})

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []  # (operation, "file:line" of the caller)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.calls.append((name, self._caller()))
        elif name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor) \
                and args[1].dtype == torch.bool:
            self.calls.append(("boolean index", self._caller()))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _caller() -> str:
        frame = sys._getframe(2)
        return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def peak_rss_reset() -> bool:
    """Reset the process's peak resident set size (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    return proc_kib_bytes("/proc/self/status", "VmHWM")


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def kv_cache_bytes(cache) -> int:
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensors created while the mode is active that are still alive, and their peak — on any device,
    CPU included (where no allocator keeps such statistics). Counted per storage (views are free), when an
    operation returns a storage that none of its inputs had, and released when the storage dies::

        with torch.no_grad(), TensorMemory() as memory:
            model(**inputs)
        memory.peak   # the most bytes of call-created tensors alive at once (activations, caches, scores)

    Memory inside a fused kernel (SDPA's workspace) is not seen; every tensor Python code materialises is, such as
    an attention map of L x L scores.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes = WeakIdKeyDictionary()  # storage -> bytes counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage in self._sizes:
                continue
            if inputs is None:
                inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            if id(storage) in inputs:  # a view of (or in place on) a tensor that existed before the call
                continue
            size = storage.nbytes()
            self._sizes[storage] = size
            weakref.finalize(storage, self._release, size)
            self.live += size
            self.peak = max(self.peak, self.live)
        return out

    def _release(self, size: int) -> None:
        self.live -= size


class PeakMemory:
    """Peak memory from ``start()`` to ``stop()``: CUDA allocated bytes on GPU; on CPU the process RSS high-water
    mark (Linux ``/proc``; indicative only), or with ``cpu="tensors"`` the peak bytes of the tensors created in
    the measured span (``TensorMemory``: exact, but slows the span down). ``before``: bytes in use at ``start()``."""

    def __init__(self, device: torch.device, cpu: str = "rss"):
        self.device = device
        self.cuda = device.type == "cuda"
        self.tensors = TensorMemory() if not self.cuda and cpu == "tensors" else None
        self.kind = "cuda_allocated" if self.cuda else ("tensor_bytes" if self.tensors else "process_rss")
        self.before = 0
        self.peak: int | None = None

    def start(self) -> "PeakMemory":
        release_memory()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = int(torch.cuda.memory_allocated(self.device))
        elif self.tensors is not None:
            self.tensors.__enter__()
        else:
            peak_rss_reset()
            self.before = current_rss_bytes()
        return self

    def stop(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.tensors is not None:
            self.tensors.__exit__(None, None, None)
            self.peak = self.tensors.peak
        else:
            self.peak = peak_rss_bytes()
        return self

    @property
    def extra(self) -> int | None:
        """Peak minus the bytes in use at ``start()`` (activations, caches, workspaces)."""
        return None if self.peak is None else max(0, self.peak - self.before)

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False


def end_of_turn_ids(vlm) -> list[int]:
    """Token ids that end the answer: the tokenizer's end-of-sequence token and the checkpoint's generation config
    ones (LLaVA-1.5: ``</s>``; Qwen2.5-VL-Instruct: ``<|im_end|>`` and ``<|endoftext|>``)."""
    ids = []
    tokenizer = getattr(vlm.processor, "tokenizer", None)
    configured = getattr(getattr(vlm.model, "generation_config", None), "eos_token_id", None)
    for value in (getattr(tokenizer, "eos_token_id", None), configured):
        for token in (value if isinstance(value, (list, tuple)) else [value]):
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


def cut_at_stop(text: str, stop) -> str:
    """``text`` up to the first of the ``stop`` strings (lmms-eval splits answers at its ``until`` strings)."""
    for string in stop or ():
        text = text.split(string)[0]
    return text


class StopStrings(StoppingCriteria):
    """Stop a row once its generated text contains one of ``stops`` (decoded with ``tokenizer``, special tokens
    skipped). Transformers' own ``stop_strings`` needs a sub-word vocabulary; this works with any tokenizer."""

    def __init__(self, tokenizer, stops, prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stops), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [any(stop in self.tokenizer.decode(row[self.prompt_length:], skip_special_tokens=True)
                    for stop in self.stops) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def measure_generation(vlm, inputs, method, max_new_tokens: int, eos_token_id=None, stop_strings=()) -> RunMeasurement:
    """Generate greedily under ``method`` and measure it (see the module docstring). Generation ends at
    ``eos_token_id`` (an id or a list: end of turn) or once the text ends with one of ``stop_strings``."""
    model, adapter = vlm.model, vlm.adapter
    device = vlm.device
    clock = Clock(device)
    memory = PeakMemory(device).start()
    spans = {"vision": Spans(adapter.vision_model(model), clock), "decoder": Spans(adapter.text_model(model), clock),
             "model": Spans(model, clock)}
    prompt_length = inputs["input_ids"].shape[1]
    cache_after_prefill = {}

    def remember_cache(module, args, kwargs, output):
        if "bytes" not in cache_after_prefill:
            cache_after_prefill["bytes"] = kv_cache_bytes(output_cache(output))

    pad_token_id = (eos_token_id[0] if eos_token_id else None) if isinstance(eos_token_id, (list, tuple)) else eos_token_id
    stopping = {}
    if stop_strings:
        stopping["stopping_criteria"] = StoppingCriteriaList([StopStrings(vlm.processor.tokenizer, stop_strings,
                                                                          prompt_length)])
    cache_hook = model.register_forward_hook(remember_cache, with_kwargs=True)
    try:
        with torch.no_grad(), apply(model, method, questions=getattr(inputs, "questions", None)) as session:
            start = clock.now()
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, **stopping)
            end = clock.now()
        clock.synchronize()
        report = session.last_report
    finally:
        cache_hook.remove()
        for span in spans.values():
            span.remove()

    new_ids = output[:, prompt_length:]
    model_calls = spans["model"].durations_ms()
    decode_calls = model_calls[1:]
    metrics = {
        "new_tokens": int(new_ids.shape[1]),
        "vision_ms": sum(spans["vision"].durations_ms()),
        "prefill_ms": spans["decoder"].durations_ms()[0] if spans["decoder"].ends else None,
        "ttft_ms": clock.elapsed_ms(start, spans["model"].ends[0]) if spans["model"].ends else None,
        "decode_ms_per_token": sum(decode_calls) / len(decode_calls) if decode_calls else None,
        "total_ms": clock.elapsed_ms(start, end),
        "overhead_ms": report.overhead_ms if report is not None else 0.0,
        "kv_cache_bytes": cache_after_prefill.get("bytes", 0),
        "attention_backend": str(model.config._attn_implementation),
    }
    memory.stop()
    metrics["peak_memory_bytes"] = memory.peak
    metrics["extra_peak_memory_bytes"] = memory.extra
    metrics["memory_kind"] = memory.kind
    metrics.update(token_metrics(vlm, inputs.layout, report, getattr(inputs, "stats", None)))
    return RunMeasurement(new_ids, report, metrics)


def token_metrics(vlm, layout, report, input_stats: dict | None = None) -> dict:
    """Visual tokens entering the decoder and layer-averaged, and analytic prefill FLOPs (all conventions).
    ``input_stats``: what a ``before_processor`` method reported (``native_visual_tokens``: the unchanged input's N,
    reported as ``visual_tokens_original``)."""
    input_stats = input_stats or {}
    shape = vlm.adapter.decoder_shape(vlm.adapter.text_config(vlm.model))
    if report is None or not report.layer_tokens:
        layer_tokens = [layout.length] * shape.layers
        layer_visual = [layout.num_visual] * shape.layers
        entering_tokens, entering_visual = layout.length, layout.num_visual
        stats = {}
    else:
        layer_tokens, layer_visual = report.layer_tokens, report.layer_visual
        entering_tokens, entering_visual = report.tokens_entering_decoder, report.visual_entering_decoder
        stats = dict(report.stats)
    flops = all_conventions(shape, layer_tokens, layer_visual)
    if report is not None and report.layer_plans:
        flops["tokenprune"] = report.flops(shape)  # layer plans skip rows: the token counts alone overcount
    stats = {**input_stats, **stats}
    return {
        "prompt_tokens": layout.length,
        "visual_tokens_original": input_stats.get("native_visual_tokens", layout.num_visual),
        "visual_tokens": entering_visual,
        "visual_tokens_layer_mean": sum(layer_visual) / len(layer_visual),
        "tokens_entering_decoder": entering_tokens,
        "tokens_layer_mean": sum(layer_tokens) / len(layer_tokens),
        "flops": flops,
        "method_stats": stats,
    }
