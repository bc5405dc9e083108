"""Measurements of ``benchmarks/speed.py``: decoder prefill, decode, memory, per-layer times, the ideal, and the
peer-style (eager attention maps) variant of attention-scored methods.

Timing follows ``tokenprune.run.measure``: CUDA events on GPU, read after one synchronisation at the end of a
batch of calls, ``perf_counter`` on CPU. The decoder prefill is the span of the text decoder's forward
(``Spans`` registered before ``tokenprune.apply``, so the driver's own work — layouts, selections, masks — is
inside it); the vision encoder never runs in it (its output is passed as ``mm_encoder_outputs``).
"""

from __future__ import annotations

import statistics
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from tokenprune.engine.apply import apply
from tokenprune.engine.compat import cache_kwargs, output_cache
from tokenprune.methods.base import LayerStep, Method
from tokenprune.run.measure import Clock, HostReads, PeakMemory, Spans, kv_cache_bytes

from _speed_inputs import encode


def median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def timed_ms(fn, clock: Clock, repeats: int, warmup: int, from_idle: bool = True) -> list[float]:
    """Durations of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, read after one synchronisation at the
    end. ``from_idle``: synchronise before each call, so that each starts on an idle GPU like a single request
    (False: back to back, the host queueing ahead as it does between the layers of one forward)."""
    for _ in range(warmup):
        fn()
    marks = []
    for _ in range(repeats):
        if from_idle:
            clock.synchronize()
        start = clock.now()
        fn()
        marks.append((start, clock.now()))
    clock.synchronize()
    return [clock.elapsed_ms(start, end) for start, end in marks]


def count_synchronizations(fn, device: torch.device) -> int:
    """Host-device synchronisations during ``fn()``: CUDA's sync debug mode on GPU; on CPU the operations that
    would synchronise on a GPU (``HostReads``: reads of device values back to the host)."""
    if device.type != "cuda":
        with HostReads() as reads:
            fn()
        return len(reads.calls)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# ---------------------------------------------------------------------------------------------------------
# Vision encoder
# ---------------------------------------------------------------------------------------------------------
def measure_vision(vlm, prompt, repeats: int, warmup: int):
    """Median vision-encoder time (ms) of the prompt's pixels and the encoder output (for the decoder calls)."""
    clock = Clock(vlm.device)
    encoded = encode(vlm, prompt)
    times = timed_ms(lambda: encode(vlm, prompt), clock, repeats, max(0, warmup - 1))
    return median(times), encoded


# ---------------------------------------------------------------------------------------------------------
# Decoder prefill
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Prefill:
    """One (method, prompt) prefill measurement. ``cache``: the KV cache of the memory call (for decode)."""

    times_ms: list[float]
    overheads_ms: list[float]
    report: object | None  # PrefillReport (None for methods that install nothing)
    cache: DynamicCache
    peak_bytes: int | None
    extra_peak_bytes: int | None
    memory_kind: str
    kv_cache_bytes: int
    synchronizations: int | None = None

    @property
    def ms(self) -> float:
        return median(self.times_ms)

    @property
    def overhead_ms(self) -> float:
        return median(self.overheads_ms) or 0.0


def measure_prefill(vlm, inputs: dict, method: Method, repeats: int, warmup: int, around=nullcontext,
                    count_syncs: bool = True) -> Prefill:
    """Decoder prefill of ``inputs`` under ``method``: ``warmup`` calls, one call for peak memory and the KV cache,
    then ``repeats`` timed calls (median), then (CUDA) one call counting host-device synchronisations.

    ``around``: a context manager factory entered outside ``apply`` (the peer-style eager switch).
    """
    model, device = vlm.model, vlm.device
    outer, text = vlm.adapter.outer_model(model), vlm.adapter.text_model(model)
    clock = Clock(device)

    def call():
        return outer(**inputs, use_cache=True)

    spans = Spans(text, clock)  # registered before apply(): the driver's hooks run inside the span
    try:
        with around(), apply(model, method) as session:
            for _ in range(warmup):
                call()
            with PeakMemory(device, cpu="tensors") as memory:
                cache = output_cache(call())
            report = session.last_report
            reports = []
            for _ in range(repeats):
                clock.synchronize()  # each prefill starts on an idle device, like a request
                call()
                reports.append(session.last_report)
            clock.synchronize()
            syncs = count_synchronizations(call, device) if count_syncs else None
    finally:
        spans.remove()
    first = warmup + 1
    times = spans.durations_ms()[first : first + repeats]
    overheads = [r.overhead_ms for r in reports if r is not None]
    return Prefill(times, overheads, report, cache, memory.peak, memory.extra, memory.kind, kv_cache_bytes(cache),
                   syncs)


# ---------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------
def measure_decode(vlm, cache, method: Method, token_id: int, steps: int, warmup: int) -> tuple[float, float]:
    """Median time (ms) of one decode step on ``cache`` with ``method`` applied, and of the stock model on the same
    cache (same per-layer lengths, no hook), interleaved step by step. Each step appends one token to the cache."""
    model, device = vlm.model, vlm.device
    clock = Clock(device)
    ids = torch.tensor([[token_id]], device=device)
    marks = {"method": [], "stock": []}
    for step in range(warmup + steps):
        for variant in ("method", "stock"):
            context = apply(model, method) if variant == "method" else nullcontext()
            with context:
                clock.synchronize()  # generate() reads each new token back before the next step
                start = clock.now()
                model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(type(model).forward, cache))
                end = clock.now()
            if step >= warmup:
                marks[variant].append((start, end))
    clock.synchronize()
    return tuple(median([clock.elapsed_ms(s, e) for s, e in marks[v]]) for v in ("method", "stock"))


# ---------------------------------------------------------------------------------------------------------
# Per-layer times and the ideal prefill
# ---------------------------------------------------------------------------------------------------------
class LayerTimer:
    """Median forward time of one decoder layer — and of its sublayers — at a sequence length, on the model's
    own layer, dtype and attention backend, with a fresh KV cache as in a prefill (cached per length)."""

    def __init__(self, vlm, repeats: int, warmup: int):
        self.vlm = vlm
        self.text = vlm.adapter.text_model(vlm.model)
        self.index = len(self.text.layers) // 2
        self.layer = self.text.layers[self.index]
        self.repeats, self.warmup = repeats, warmup
        self.clock = Clock(vlm.device)
        self.dtype = next(self.text.parameters()).dtype
        self.times: dict[tuple[str, int], float] = {}

    def _inputs(self, length: int):
        device = self.vlm.device
        generator = torch.Generator(device=device).manual_seed(length)
        hidden = torch.randn(1, length, self.text.config.hidden_size, generator=generator, device=device,
                             dtype=self.dtype)
        positions = self.vlm.adapter.positions(None, 1, length, 0, device)  # [1, P, L] contiguous
        return hidden, self.vlm.adapter.rotary(self.text, hidden, positions)

    def _median(self, kind: str, length: int, fn) -> float:
        key = (kind, length)
        if key not in self.times:  # back to back: inside a forward the host queues the next layer ahead
            self.times[key] = median(timed_ms(fn, self.clock, self.repeats, self.warmup, from_idle=False))
        return self.times[key]

    def layer_ms(self, length: int) -> float:
        """The whole decoder layer (as the stock loop calls it at batch 1: no mask, SDPA's causal path)."""
        hidden, rotary = self._inputs(length)
        config = self.text.config
        return self._median("layer", length, lambda: self.layer(
            hidden, attention_mask=None, position_embeddings=rotary, use_cache=True,
            **cache_kwargs(type(self.layer).forward, DynamicCache(config=config))))

    def attention_ms(self, length: int) -> float:
        """Input norm + self-attention (q/k/v/o, RoPE, cache write) + residual."""
        hidden, rotary = self._inputs(length)
        config, layer = self.text.config, self.layer

        def run():
            out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=None,
                                     position_embeddings=rotary,
                                     **cache_kwargs(type(layer.self_attn).forward, DynamicCache(config=config)))
            return hidden + out

        return self._median("attention", length, run)

    def mlp_ms(self, length: int) -> float:
        """Post-attention norm + MLP + residual on ``length`` rows."""
        hidden, _ = self._inputs(length)
        layer = self.layer
        return self._median("mlp", length, lambda: hidden + layer.mlp(layer.post_attention_layernorm(hidden)))

    def kv_ms(self, length: int) -> float:
        """Input norm + key and value projections of ``length`` rows (what an attention skip still computes)."""
        hidden, _ = self._inputs(length)
        attention, norm = self.layer.self_attn, self.layer.input_layernorm

        def run():
            x = norm(hidden)
            return attention.k_proj(x), attention.v_proj(x)

        return self._median("kv", length, run)


@dataclass
class Schedule:
    """What a prefill computes per layer: tokens, visual tokens, and layer plans (layer skip)."""

    layer_tokens: list[int]
    layer_visual: list[int]
    plans: dict = field(default_factory=dict)

    @classmethod
    def of(cls, report, num_layers: int, tokens: int, visual: int) -> "Schedule":
        if report is None or not report.layer_tokens:
            return cls([tokens] * num_layers, [visual] * num_layers)
        return cls(list(report.layer_tokens), list(report.layer_visual), dict(report.layer_plans))

    @property
    def mean_tokens(self) -> float:
        return sum(self.layer_tokens) / len(self.layer_tokens)

    @property
    def mean_visual(self) -> float:
        return sum(self.layer_visual) / len(self.layer_visual)


def ideal_prefill_ms(schedule: Schedule, timer: LayerTimer) -> float:
    """Sum over layers of the measured single-layer time at that layer's token count.

    A layer under a LayerPlan (visual rows skip sublayers) counts the sublayers it still has to run: the attention
    of every row, or — attention skip — the key/value projections of every row plus the attention of the text
    rows; the MLP of every row, or — MLP skip — of the text rows only.
    """
    total = 0.0
    for layer, (tokens, visual) in enumerate(zip(schedule.layer_tokens, schedule.layer_visual)):
        plan = schedule.plans.get(layer)
        if plan is None or plan.is_identity:
            total += timer.layer_ms(tokens)
            continue
        text_rows = max(1, tokens - visual)
        if plan.skip_attn:
            attention = timer.kv_ms(tokens) + timer.attention_ms(text_rows)
        else:
            attention = timer.attention_ms(tokens)
        mlp = timer.mlp_ms(text_rows) if plan.skip_mlp else timer.mlp_ms(tokens)
        total += attention + mlp
    return total


# ---------------------------------------------------------------------------------------------------------
# Peer-style scoring: the same selection from eager attention maps (what the official implementations cost)
# ---------------------------------------------------------------------------------------------------------
# Methods with a peer-style variant, and the layers whose attention maps their official code reads.
PEER_SCORING_LAYERS = {
    "fastv": lambda method: [method.layer - 1],
    "himap": lambda method: [method.text_layer - 1, method.image_layer - 1],
}


class EagerMapScoring(Method):
    """``inner``'s selection, with its scores read from the attention maps that eager attention returned in the
    scoring layers of the same forward (instead of tokenprune's lazily recomputed rows). Not registered."""

    def __init__(self, inner: Method, maps: dict):
        self.inner = inner
        self.maps = maps  # layer -> [1, H, L, L] attention probabilities of the current call (eager_attention_maps)
        self.name = f"{inner.name}[peer]"

    def validate(self, model) -> None:
        self.inner.validate(model)

    def prune_layers(self, layout) -> list[int]:
        return self.inner.prune_layers(layout)

    def select(self, step: LayerStep):
        peer_step = LayerStep(step.layer, step.hidden, step.positions, step.layout, self._scores, step.stats)
        return self.inner.select(peer_step)

    def describe(self) -> dict:
        return {**self.inner.describe(), "scores": "eager attention maps"}

    def _scores(self, layer, queries, keys, rope, causal, heads, reduce):
        """``LayerStep.attention`` semantics on a stored map (RoPE'd, causal: what eager attention returns)."""
        if not (rope and causal):
            raise ValueError("peer-style scores exist for RoPE'd causal attention only")
        if layer not in self.maps:
            raise ValueError(f"no eager attention map of layer {layer} was kept (kept: {sorted(self.maps)})")
        probs = self.maps[layer][0][:, queries]  # [H, n_q, L]
        if keys is not None:
            probs = probs[..., keys]
        probs = probs.float()
        if heads == "mean":
            probs = probs.mean(0)
        elif heads == "max":
            probs = probs.amax(0)
        if reduce in ("sum", "mean"):
            probs = probs.sum(-2) if reduce == "sum" else probs.mean(-2)
        elif reduce == "max":
            probs = probs.amax(-2)
        return probs


@contextmanager
def eager_attention_maps(vlm, layers: list[int] | None, maps: dict | None = None):
    """Switch the text decoder to eager attention and keep the maps that ``layers`` return (all layers when None)
    in ``maps`` until the end of each decoder forward — ``output_attentions=True`` on those layers."""
    model = vlm.model
    text = vlm.adapter.text_model(model)
    previous = text.config._attn_implementation
    keep = range(len(text.layers)) if layers is None else layers
    maps = {} if maps is None else maps

    def keeper(index):
        def hook(module, args, output):
            maps[index] = output[1]
        return hook

    handles = [text.layers[i].self_attn.register_forward_hook(keeper(i)) for i in keep]
    handles.append(text.register_forward_hook(lambda *args: maps.clear()))
    model.set_attn_implementation({"text_config": "eager"})
    try:
        yield maps
    finally:
        model.set_attn_implementation({"text_config": previous})
        for handle in handles:
            handle.remove()
        maps.clear()
