"""The decoder driver: applies a method's selections inside the stock decoder loop.

The stock text model (Llama, Qwen2, Qwen2.5-VL) keeps running its own loop — embeddings, masks, rotary
tables, layers, final norm. The driver attaches forward pre-hooks that, between layers, gather the
surviving rows of the hidden states, their rotary tables and their positions, rebuild the mask for the
shorter sequence, and hand the next layers the right tensors. Because the stock loop is untouched, a method
that keeps every token gives the stock logits exactly, on any attention backend.

Semantics (tested in ``tests/``):
  * Pruning happens once, at prefill (a call whose KV cache is empty). Layers below a pruning layer cache the
    full prompt; layers at and above it cache only the survivors; decode steps never re-prune. Without a
    cache every call is a prefill, so uncached generation re-prunes each step (the official FastV / HiMAP
    evaluation behaviour).
  * Surviving tokens keep their original rotary positions (Qwen2.5-VL: their 3-D positions); decode
    positions continue from the unpruned prompt length.
  * Batch size 1, or unpadded batches whose samples keep equally many tokens; padded batches are refused.
  * Per-call state lives on the call's KV cache object and dies with it: nothing survives across calls.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .compat import cache_argument, cache_kwargs, set_cache_argument
from ..methods.base import LayerStep, Method, Selection, VisualSequence, selectors_at
from .layout import TokenLayout
from .scores import attention_probabilities, project_keys, project_queries
from .flops import DecoderShape, prefill_flops
from .sublayers import run_planned_layer, skipped_flops

STATE_ATTRIBUTE = "_tokenprune_state"
MIN_SCORE_CHUNK_BYTES = 4 * 2**20


class PruningInputError(ValueError):
    """A call the engine cannot prune correctly (padding, missing input_ids, unsupported cache)."""


# ---------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------
class OverheadTimer:
    """Time spent in method hooks (scoring + selection). CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._cpu_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start = None

    def __enter__(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._start = start
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._cpu_seconds += time.perf_counter() - self._start
        return False

    @property
    def milliseconds(self) -> float:
        if self.cuda:
            if self._events:
                self._events[-1][1].synchronize()
            return float(sum(start.elapsed_time(end) for start, end in self._events))
        return self._cpu_seconds * 1000.0


@dataclass
class PrefillReport:
    """What one pruned prefill did (sample 0 of the batch)."""

    prompt_tokens: int
    visual_tokens: int
    layer_tokens: list[int] = field(default_factory=list)  # sequence length entering each layer
    layer_visual: list[int] = field(default_factory=list)  # visual tokens entering each layer
    tokens_entering_decoder: int = 0
    visual_entering_decoder: int = 0
    kept_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> original rows of surviving visual tokens
    layer_plans: dict = field(default_factory=dict)  # layer -> LayerPlan that ran (layer skip), identity plans omitted
    skipped_flops: float = 0.0  # tokenprune-convention FLOPs the layer plans did not compute
    flops_override: float | None = None  # prefill FLOPs when layer plans ran (layer_tokens alone overcount them)
    stats: dict = field(default_factory=dict)  # method-reported numbers (segments, static fraction, ...)
    timer: OverheadTimer | None = None

    @property
    def kept(self) -> dict[int, list[int]]:
        """Layer -> original row indices of the visual tokens that survived the selection at that layer (read
        after the call: converting to lists synchronises with the device)."""
        return {layer: rows.tolist() for layer, rows in self.kept_rows.items()}

    @property
    def visual_layer_mean(self) -> float:
        return sum(self.layer_visual) / max(1, len(self.layer_visual))

    @property
    def overhead_ms(self) -> float:
        return self.timer.milliseconds if self.timer is not None else 0.0


# ---------------------------------------------------------------------------------------------------------
# Per-call state
# ---------------------------------------------------------------------------------------------------------
@dataclass
class DecodeState:
    """What decode steps of one generation need; stored on that generation's cache object."""

    changed: bool = False  # the prefill left some layer with a shortened cache or shifted positions
    position_offset: int = 0  # original prompt length - layer-0 cache length after prefill
    layer_position_shift: dict[int, int] = field(default_factory=dict)  # re-indexed layers: decode position shift


@dataclass
class CallState:
    prefill: bool
    layouts: list[TokenLayout]
    positions: torch.Tensor  # [B, P, L] rotary positions of the current rows (P = 1 or 3)
    cache: DynamicCache | None
    decode: DecodeState
    report: PrefillReport | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # override of the stock tables
    masks: dict | None = None  # per layer type, for the current (shortened) prefill
    changed: bool = False  # the sequence no longer equals the stock one
    select_layers: frozenset[int] = frozenset()
    saved_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    cached_originals: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> original rows it cached
    plans: dict = field(default_factory=dict)
    decode_tables: dict = field(default_factory=dict)  # shift -> (cos, sin) during a decode call
    stock_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


# ---------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------
class Driver:
    """Installs the hooks that apply ``method`` inside ``model``'s text decoder (see ``tokenprune.apply``)."""

    def __init__(self, model, adapter, method: Method):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.outer = adapter.outer_model(model)
        self.text_model = adapter.text_model(model)
        self.layers = list(self.text_model.layers)
        self.config = self.text_model.config
        self.shape = DecoderShape.from_config(self.config)
        self.rope = adapter.rope
        self._handles: list = []
        self._wrapped_forwards: list = []
        self._pending: dict | None = None
        self.active: CallState | None = None
        self.last_report: PrefillReport | None = None

    # -- installation -----------------------------------------------------------------------------------
    def install(self) -> None:
        self._handles.append(self.outer.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))
        self._handles.append(self.outer.register_forward_hook(self._release_inputs))
        self._handles.append(self.text_model.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        self._handles.append(self.text_model.register_forward_hook(self._end_call))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_layer_hook(index), with_kwargs=True))
        if self.method.uses_layer_plan:
            for index, layer in enumerate(self.layers):
                self._wrap_layer_forward(index, layer)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self._wrapped_forwards:
            del layer.forward  # drop the instance attribute: the class forward is back
        self._wrapped_forwards.clear()
        self._pending = None
        self.active = None

    def _wrap_layer_forward(self, index: int, layer) -> None:
        stock_forward = layer.forward

        def forward(hidden_states, *args, **kwargs):
            state = self.active
            plan = state.plans.get(index) if state is not None and state.prefill else None
            if plan is None:
                return stock_forward(hidden_states, *args, **kwargs)
            return run_planned_layer(layer, plan, state.layouts, hidden_states, **kwargs)

        layer.forward = forward
        self._wrapped_forwards.append(layer)

    # -- outer model: remember the input_ids of the current call -----------------------------------------
    def _capture_inputs(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending = {"input_ids": input_ids, **{k: kwargs.get(k) for k in self.adapter.visual_input_keys}}
        return None

    def _release_inputs(self, module, args, output):
        self._pending = None
        return None

    # -- text model: start / end of one call -------------------------------------------------------------
    def _begin_call(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = module.embed_tokens(input_ids)
            kwargs["inputs_embeds"], kwargs["input_ids"] = embeds, None
            args = ()
        cache = cache_argument(kwargs)
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill:
            state = self._begin_prefill(embeds, kwargs, use_cache)
        else:
            state = self._begin_decode(embeds, kwargs, cache)
        self.active = state
        return args, kwargs

    def _end_call(self, module, args, output):
        state = self.active
        self.active = None
        if state is None or not state.prefill:
            return None
        state.saved_inputs.clear()
        report = state.report
        if report is not None:
            self.last_report = report
            if report.layer_plans:
                report.flops_override = prefill_flops(self.shape, report.layer_tokens) - report.skipped_flops
        state.decode.changed = state.changed
        if state.cache is not None:
            layer0 = state.cache.get_seq_length(0)
            state.decode.position_offset = state.layouts[0].original_length - layer0
            if state.decode.position_offset:
                self.adapter.after_shortened_prefill(self.model, state.decode.position_offset)
        return None

    def _begin_prefill(self, embeds: torch.Tensor, kwargs: dict, use_cache: bool) -> CallState:
        batch, length = embeds.shape[:2]
        positions = self._rope_positions(kwargs.get("position_ids"), batch, length, embeds.device, past=0)
        layouts = self._layouts(batch, length, embeds.device)
        cache = cache_argument(kwargs)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
            set_cache_argument(kwargs, type(self.text_model).forward, cache)
        if cache is not None and type(cache) is not DynamicCache:
            raise PruningInputError(
                f"tokenprune prunes into a DynamicCache; got {type(cache).__name__}. "
                "Use the default cache (no cache_implementation / static cache)."
            )
        state = CallState(prefill=True, layouts=layouts, positions=positions, cache=cache, decode=DecodeState())
        state.report = PrefillReport(prompt_tokens=length, visual_tokens=layouts[0].num_visual,
                                     timer=OverheadTimer(embeds.device))
        if cache is not None:
            setattr(cache, STATE_ATTRIBUTE, state.decode)

        if all(layout.num_visual == 0 for layout in layouts):
            if self.method.uses_before_llm or self.method.uses_select or self.method.uses_layer_plan:
                warnings.warn(f"method {self.method.name!r}: the input has no visual tokens; running it unpruned",
                              stacklevel=2)
            self._finish_report_without_pruning(state, length)
            return state

        changes_sequence = self.method.uses_before_llm or self.method.uses_select
        if changes_sequence:
            self._refuse_padding(kwargs.get("attention_mask"), batch)
        if self.method.uses_before_llm:
            self._apply_before_llm(state, kwargs)
        if self.method.uses_select:
            state.select_layers = frozenset(
                layer for layer in self.method.prune_layers(state.layouts[0]) if 0 <= layer < len(self.layers)
            )
        state.report.tokens_entering_decoder = state.layouts[0].length
        state.report.visual_entering_decoder = state.layouts[0].num_visual
        return state

    def _finish_report_without_pruning(self, state: CallState, length: int) -> None:
        visual = state.layouts[0].num_visual
        state.report.layer_tokens = [length] * len(self.layers)
        state.report.layer_visual = [visual] * len(self.layers)
        state.report.tokens_entering_decoder = length
        state.report.visual_entering_decoder = visual

    def _begin_decode(self, embeds: torch.Tensor, kwargs: dict, cache) -> CallState | None:
        decode = getattr(cache, STATE_ATTRIBUTE, None)
        if decode is None or not decode.changed:
            return None  # a cache this driver did not prefill, or a prefill that kept everything: run stock
        batch, length = embeds.shape[:2]
        past = cache.get_seq_length(0)
        position_ids = kwargs.get("position_ids")
        if position_ids is None and decode.position_offset and self.rope == "1d":
            # A manual forward without positions would count from the (shortened) layer-0 cache.
            position_ids = torch.arange(length, device=embeds.device)[None].expand(batch, -1) + past + decode.position_offset
            kwargs["position_ids"] = position_ids
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if not bool(mask.all()):
                raise PruningInputError("attention_mask has padding during decode of a pruned prefill")
            kwargs["attention_mask"] = None  # the stock 2-D mask has the unpruned length
        positions = self._rope_positions(kwargs.get("position_ids"), batch, length, embeds.device, past=past)
        return CallState(prefill=False, layouts=[], positions=positions, cache=cache, decode=decode)

    # -- per-layer hook ----------------------------------------------------------------------------------
    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            state = self.active
            if state is None:
                return None
            if state.prefill:
                return self._prefill_layer(index, state, args, kwargs)
            return self._decode_layer(index, state, args, kwargs)

        return hook

    def _prefill_layer(self, index: int, state: CallState, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if state.position_embeddings is None:
            state.stock_position_embeddings = kwargs["position_embeddings"]
        if index in state.select_layers:
            hidden = self._select(index, state, hidden, kwargs)
        if (index + 1) in state.select_layers:
            state.saved_inputs = {index: hidden}  # queries of layer `index` for the selection at index + 1
        if state.select_layers:
            state.cached_originals[index] = [layout.original for layout in state.layouts]
        if state.changed:
            kwargs["position_embeddings"] = state.position_embeddings
            kwargs["attention_mask"] = state.masks[self._layer_type(index)]
            kwargs["position_ids"] = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
        if self.method.uses_layer_plan:
            plan = self.method.layer_plan(index, state.layouts[0])
            state.plans[index] = plan if plan is not None and not plan.is_identity else None
            if state.plans[index] is not None:
                state.report.layer_plans[index] = plan
                state.report.skipped_flops += skipped_flops(self.shape, state.layouts[0], plan)
        if len(state.report.layer_tokens) == index:
            state.report.layer_tokens.append(hidden.shape[1])
            state.report.layer_visual.append(state.layouts[0].num_visual)
        return (hidden, *args[1:]), kwargs

    def _decode_layer(self, index: int, state: CallState, args, kwargs):
        cache = state.cache
        hidden = args[0] if args else kwargs["hidden_states"]
        query_length = hidden.shape[1]
        layer_length = cache.layers[index].get_seq_length() if index < len(cache.layers) else 0
        if layer_length != cache.get_seq_length(0):
            kwargs["attention_mask"] = self._decode_mask(hidden, layer_length, query_length)
        shift = state.decode.layer_position_shift.get(index, 0)
        if shift:
            if shift not in state.decode_tables:
                state.decode_tables[shift] = self._rotary(hidden, state.positions + shift)
            kwargs["position_embeddings"] = state.decode_tables[shift]
        return args, kwargs

    # -- selection ---------------------------------------------------------------------------------------
    def _select(self, index: int, state: CallState, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        position_embeddings = state.position_embeddings or state.stock_position_embeddings
        batch = hidden.shape[0]
        indices, reindex, prune_before = [], False, False
        with state.report.timer:
            for b in range(batch):
                layout = state.layouts[b]
                if layout.num_visual == 0:
                    indices.append(torch.arange(layout.length, device=hidden.device))
                    continue
                keep = torch.arange(layout.length, device=hidden.device)
                for selector in selectors_at(self.method, index, layout):
                    step = self._layer_step(index, state, hidden, position_embeddings, b, keep)
                    selection = selector.select(step)
                    self._check_selection(selector, selection, step.layout.length, index)
                    keep = keep[selection.indices]
                    reindex |= selection.reindex_positions
                    prune_before |= selection.prune_cache_before
                indices.append(keep)
            lengths = {int(keep.numel()) for keep in indices}
            if len(lengths) != 1:
                raise PruningInputError(
                    f"the samples of this batch keep different numbers of tokens at layer {index} "
                    f"({sorted(lengths)}); run them with batch size 1"
                )
            if all(keep.numel() == layout.length for keep, layout in zip(indices, state.layouts)) and not reindex:
                return hidden  # the selection keeps everything: the sequence stays the stock one
            index_tensor = torch.stack(indices)  # [B, L']
            entering = hidden.shape[1]
            hidden = hidden.gather(1, index_tensor[..., None].expand(-1, -1, hidden.shape[-1]))
            state.layouts = [layout.gather(keep) for layout, keep in zip(state.layouts, indices)]
            state.positions = state.positions.gather(2, index_tensor[:, None].expand(-1, state.positions.shape[1], -1))
            cos, sin = position_embeddings
            state.position_embeddings = (_gather_rows(cos, index_tensor), _gather_rows(sin, index_tensor))
            if reindex:
                self._reindex_positions(index, state, hidden)
            if prune_before and state.cache is not None:
                self._prune_earlier_caches(index, state, index_tensor, length=entering)
            state.changed = True
            state.masks = self._prefill_masks(hidden)
            state.report.kept_rows[index] = state.layouts[0].original[state.layouts[0].is_visual]
        return hidden

    def _layer_step(self, index, state, hidden, position_embeddings, b, keep) -> LayerStep:
        """The LayerStep for sample b after the selections already applied at this layer (``keep``)."""
        full = keep.numel() == state.layouts[b].length
        layout = state.layouts[b] if full else state.layouts[b].gather(keep)
        sample_hidden = hidden[b : b + 1] if full else hidden[b : b + 1, keep]
        positions = state.positions[b : b + 1] if full else state.positions[b : b + 1, :, keep]
        cos, sin = (table.expand(hidden.shape[0], -1, -1) for table in position_embeddings)  # [B, L, hd]
        tables = (cos[b : b + 1], sin[b : b + 1]) if full else (cos[b : b + 1, keep], sin[b : b + 1, keep])
        saved = state.saved_inputs.get(index - 1)
        previous = None if saved is None else (saved[b : b + 1] if full else saved[b : b + 1, keep])

        def scorer(layer, queries, keys, rope, causal, heads, reduce):
            if layer == index:
                source, cached_keys = sample_hidden, None
            elif layer == index - 1 and previous is not None:
                source = previous
                cached_keys = self._cached_keys(state.cache, layer, b, previous.shape[1]) if (rope and full) else None
            else:
                raise ValueError(
                    f"step.attention(layer={layer}) at layer {index}: scores can come from layer {index} "
                    f"or {index - 1} (the layer just below the selection)"
                )
            decoder_layer = self.layers[layer]
            q = project_queries(decoder_layer, source, queries, *tables, rope=rope)
            k = cached_keys if cached_keys is not None else project_keys(decoder_layer, source, *tables, rope=rope)
            probs = attention_probabilities(q, k, queries, keys, decoder_layer.self_attn.scaling,
                                            causal=causal, heads=heads, reduce=reduce,
                                            chunk_bytes=self._score_budget(source))
            return probs[0]

        return LayerStep(index, sample_hidden, positions, layout, scorer, state.report.stats)

    def _score_budget(self, hidden: torch.Tensor) -> int:
        """Bytes of one score block: the size of the layer's own MLP activation for this sequence, so scoring
        never raises the prefill's peak memory above what the layer itself needs (at least MIN_SCORE_CHUNK)."""
        mlp_activation = hidden.shape[0] * hidden.shape[1] * self.config.intermediate_size * hidden.element_size()
        return max(MIN_SCORE_CHUNK_BYTES, mlp_activation)

    @staticmethod
    def _cached_keys(cache, layer: int, b: int, length: int):
        if cache is None or layer >= len(cache.layers):
            return None
        keys = cache.layers[layer].keys
        if keys is None or keys.shape[-2] != length:
            return None
        return keys[b : b + 1]

    @staticmethod
    def _check_selection(selector: Method, selection: Selection, length: int, layer: int) -> None:
        rows = selection.indices
        if rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{selector.name}.select must return 1-D integer indices, got {tuple(rows.shape)} {rows.dtype}")
        if rows.numel() == 0:
            return
        # one host-device synchronisation for both checks
        in_range, ascending = torch.stack([(rows.min() >= 0) & (rows.max() < length),
                                           (rows[1:] > rows[:-1]).all()]).tolist()
        if not in_range:
            raise ValueError(f"{selector.name}.select at layer {layer} returned rows outside [0, {length})")
        if not ascending:
            raise ValueError(f"{selector.name}.select at layer {layer} must return strictly ascending rows")

    def _reindex_positions(self, index: int, state: CallState, hidden: torch.Tensor) -> None:
        if self.rope != "1d":
            raise ValueError("positions='reindex' is defined for 1-D RoPE only (LLaVA); mRoPE has no reference")
        batch, length = hidden.shape[:2]
        positions = torch.arange(length, device=hidden.device)[None, None].expand(batch, 1, -1)
        state.positions = positions
        state.position_embeddings = self._rotary(hidden, positions)
        shift = length - state.layouts[0].original_length
        for layer in range(index, len(self.layers)):
            state.decode.layer_position_shift[layer] = shift

    @staticmethod
    def _prune_earlier_caches(index: int, state: CallState, index_tensor: torch.Tensor, length: int) -> None:
        """Keep only the surviving rows in the caches of the layers below ``index``.

        ``index_tensor`` ``[B, L']`` indexes the sequence of ``length`` rows that entered this selection. A layer
        whose cache is that long holds exactly those rows; a longer one (cached before an earlier selection without
        ``prune_cache_before``) is mapped through the original row indices of what it cached.
        """
        cache = state.cache
        survivors = [layout.original for layout in state.layouts]  # after the selection
        for layer in range(min(index, len(cache.layers))):
            cache_layer = cache.layers[layer]
            if cache_layer.keys.shape[-2] == length:
                rows = index_tensor
            else:
                rows = torch.stack([_rows_of(cached, kept, layout.original_length) for cached, kept, layout in
                                    zip(state.cached_originals[layer], survivors, state.layouts)])
            gather = rows[:, None, :, None].expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[-1])
            cache_layer.keys = cache_layer.keys.gather(2, gather)
            cache_layer.values = cache_layer.values.gather(2, gather)
            state.cached_originals[layer] = survivors

    # -- before the decoder ------------------------------------------------------------------------------
    def _apply_before_llm(self, state: CallState, kwargs: dict) -> None:
        embeds = kwargs["inputs_embeds"]
        sequences = []
        with state.report.timer:
            for b, layout in enumerate(state.layouts):
                seq = VisualSequence(embeds[b : b + 1], state.positions[b : b + 1], layout, stats=state.report.stats)
                sequences.append(self.method.before_llm(seq) if layout.num_visual else seq)
        lengths = {seq.embeds.shape[1] for seq in sequences}
        if len(lengths) != 1:
            raise PruningInputError(f"samples of this batch have different lengths after before_llm ({sorted(lengths)}); "
                                    "run them with batch size 1")
        new_embeds = torch.cat([seq.embeds for seq in sequences])
        if new_embeds.shape[1] == embeds.shape[1] and all(s.layout is l for s, l in zip(sequences, state.layouts)):
            return
        state.layouts = [seq.layout for seq in sequences]
        state.positions = torch.cat([seq.positions for seq in sequences])
        state.position_embeddings = self._rotary(new_embeds, state.positions)
        state.changed = True
        state.masks = self._prefill_masks(new_embeds)
        kwargs["inputs_embeds"] = new_embeds
        kwargs["attention_mask"] = None
        batch, length = new_embeds.shape[:2]
        contiguous = torch.arange(length, device=new_embeds.device)[None].expand(batch, -1)
        # The stock loop gets contiguous positions (so no "packed sequence" mask is inferred); the layer hooks
        # substitute the rotary tables of the real positions.
        kwargs["position_ids"] = contiguous if self.rope == "1d" else torch.cat(
            [contiguous[None], state.positions.permute(1, 0, 2)], dim=0)

    # -- positions, rotary, masks ------------------------------------------------------------------------
    def _rope_positions(self, position_ids, batch: int, length: int, device, past: int) -> torch.Tensor:
        """Rotary positions as ``[B, P, L]`` from whatever the stock model was given."""
        if position_ids is None:
            base = torch.arange(length, device=device) + past
            width = 1 if self.rope == "1d" else 3
            return base[None, None].expand(batch, width, -1)
        if self.rope == "1d":
            return position_ids.expand(batch, -1)[:, None]
        if position_ids.dim() == 2:
            return position_ids.expand(batch, -1)[:, None].expand(-1, 3, -1)
        if position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return position_ids.permute(1, 0, 2).expand(batch, -1, -1)

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        """The text model's own rotary tables for ``positions`` ``[B, P, L]``."""
        if self.rope == "1d":
            return self.text_model.rotary_emb(hidden, positions[:, 0])
        return self.text_model.rotary_emb(hidden, positions.permute(1, 0, 2))

    def _layer_type(self, index: int) -> str:
        layer_types = getattr(self.config, "layer_types", None)
        return layer_types[index] if layer_types else "full_attention"

    def _prefill_masks(self, hidden: torch.Tensor) -> dict:
        """Masks of a shortened prefill, built without the partly filled cache."""
        batch, length = hidden.shape[:2]
        mask_kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=None,
                           position_ids=torch.arange(length, device=hidden.device)[None].expand(batch, -1),
                           **cache_kwargs(create_causal_mask, None))
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks

    def _decode_mask(self, hidden: torch.Tensor, layer_length: int, query_length: int):
        """Mask for ``query_length`` new rows over a layer cache of ``layer_length`` (+ the new rows)."""
        if query_length == 1 or "flash" in str(self.config._attn_implementation):
            return None  # one query sees everything; flash attention aligns causal masks bottom-right
        kv_length = layer_length + query_length
        rows = torch.arange(query_length, device=hidden.device)[:, None] + layer_length
        columns = torch.arange(kv_length, device=hidden.device)[None, :]
        hidden_keys = columns > rows  # [q, kv]
        mask = torch.zeros(query_length, kv_length, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(hidden_keys, torch.finfo(hidden.dtype).min)
        return mask[None, None].expand(hidden.shape[0], 1, -1, -1)

    # -- layouts -----------------------------------------------------------------------------------------
    def _layouts(self, batch: int, length: int, device) -> list[TokenLayout]:
        pending = self._pending
        input_ids = None if pending is None else pending.get("input_ids")
        if input_ids is None or input_ids.shape[-1] != length:
            if self.method.uses_before_llm or self.method.uses_select or self.method.uses_layer_plan:
                raise PruningInputError(
                    "tokenprune finds visual tokens from input_ids: call the model with input_ids "
                    "(not inputs_embeds only)"
                )
        specs = self.adapter.visual_specs(self.model, pending)
        return [TokenLayout.from_input_ids(input_ids[b].to(device), specs[b]) for b in range(batch)]

    @staticmethod
    def _refuse_padding(attention_mask, batch: int) -> None:
        if attention_mask is None:
            return
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise PruningInputError("tokenprune needs a 2-D attention_mask (or none) to prune")
        if not bool(attention_mask.all()):
            raise PruningInputError(
                "padded batches are not supported by token pruning: the samples would need different per-layer "
                "cache lengths. Run batch size 1, or a batch of equal-length prompts without padding."
            )


def _rows_of(cached: torch.Tensor, wanted: torch.Tensor, original_length: int) -> torch.Tensor:
    """Positions in ``cached`` (original row indices of a cache's rows) of each of ``wanted``'s original rows."""
    inverse = torch.full((original_length,), -1, dtype=torch.long, device=cached.device)
    inverse[cached] = torch.arange(cached.numel(), device=cached.device)
    rows = inverse[wanted]
    if int((inverse >= 0).sum()) != cached.numel() or bool((rows < 0).any()):
        raise PruningInputError("cannot prune an earlier layer's cache: its rows do not map one-to-one to original "
                                "rows (a pre-LLM merge with shared first members?)")
    return rows


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table``: ``[B or 1, L, D]``; ``index``: ``[B, L']`` → ``[B, L', D]``."""
    table = table.expand(index.shape[0], -1, -1)
    return table.gather(1, index[..., None].expand(-1, -1, table.shape[-1]))
