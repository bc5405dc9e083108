"""The decoder driver: applies a method's reductions inside the stock decoder loop.

The stock text model keeps running its own loop — embeddings, masks, rotary tables, layers, final norm. The
driver attaches forward pre-hooks that read like that loop:

    text model pre-hook    begin the call: layouts, positions, side inputs; before_llm reductions (prefill)
    layer l pre-hook       add the side inputs of layer l; select at l; hand layer l the current rows, their
                           rotary tables and masks; choose layer l's plan
    text model hook        end the call: the prefill report, decode positions of a shortened prompt

Everything a model family decides (layout, RoPE scheme, attention math, side inputs) comes from its
``FamilySpec``; the rows travel as one ``PrefillSequence``. Because the stock loop is untouched, a method that
keeps every token gives the stock logits exactly, on any attention backend.

Semantics (tested in ``tests/``):
  * Pruning happens once, at prefill (a call whose KV cache is empty). Layers below a pruning layer cache the
    full prompt; layers at and above it cache only the survivors; decode steps never re-prune. Without a
    cache every call is a prefill, so uncached generation re-prunes each step (the official FastV / HiMAP
    evaluation behaviour).
  * Surviving tokens keep their original rotary positions (3-D positions where the family has them); decode
    positions continue from the unpruned prompt length.
  * Batch size 1, or unpadded batches whose samples keep equally many tokens; padded batches are refused.
  * Per-call state lives on the call's KV cache object and dies with it: nothing survives across calls.
  * Layer plans run in the prefill; a plan whose attention skip holds for every row (``attn_all_rows``, the seed's
    decoder) skips that attention in every decoding step of the same cache too, and leaves a
    ``SkippedAttentionLayer`` in its cache entry (no keys or values, only the row count: the cache length that
    the stock code and the prefill detection read from layer 0 stays right).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .cache import CacheLedger, cached_keys, decode_mask
from .compat import cache_argument, cache_kwargs, set_cache_argument
from .contract import DecoderInput, PrefillStep, PruningInputError, Reduction
from .devices import forward_slot, module_device, refuse_offloaded
from .family import FamilySpec, refuse_missing_input_ids
from .report import OverheadTimer, PrefillReport
from .scores import attention_probabilities, project_keys, project_queries
from .sequence import PrefillSequence
from .sublayers import run_layer_without_attention, run_planned_layer
from .vision import SignalCapture

STATE_ATTRIBUTE = "_tokenprune_state"
# Smallest score block (bytes). Small enough that scoring stays within a small model's own prefill peak (the
# 1.1x test at N = 1024), large enough that the tiny trained models score in one block (HiMAP stage 2: <= 171 rows).
MIN_SCORE_CHUNK_BYTES = 1536 * 2**10


# ---------------------------------------------------------------------------------------------------------
# Per-call state
# ---------------------------------------------------------------------------------------------------------
@dataclass
class DecodeState:
    """What decode steps of one generation need; stored on that generation's cache object."""

    changed: bool = False  # the prefill left some layer with a shortened cache or shifted positions
    position_offset: int = 0  # original prompt length - layer-0 cache length after prefill
    layer_position_shift: dict[int, int] = field(default_factory=dict)  # re-indexed layers: decode position shift
    attention_skipped: frozenset[int] = frozenset()  # layers whose attention every row skips, decoding included


@dataclass
class PrefillCall:
    seq: PrefillSequence
    cache: DynamicCache | None
    decode: DecodeState
    report: PrefillReport
    select_layers: frozenset[int] = frozenset()
    score_previous_at: frozenset[int] = frozenset()  # layers l whose input is kept for a selection at l + 1
    ledger: CacheLedger = field(default_factory=CacheLedger)
    plans: dict = field(default_factory=dict)
    reduced_at: int | None = None  # the layer whose input a reduction changed last (-1: before the decoder)
    decoder_input: tuple | None = None  # (hidden, positions, layouts) entering layer 0 (references, no copies)


@dataclass
class DecodeCall:
    positions: torch.Tensor | None  # [B, P, L] of the new rows (None: the prefill changed no rows)
    cache: DynamicCache
    decode: DecodeState
    tables: dict = field(default_factory=dict)  # shift -> (cos, sin)


# ---------------------------------------------------------------------------------------------------------
# Which hooks of a method run where (Compose runs its children in order)
# ---------------------------------------------------------------------------------------------------------
def reducers_before_llm(method) -> list:
    """The methods whose ``before_llm`` runs, in order (``components()``: a method, or the children of a Compose)."""
    return [part for part in method.components() if part.uses_before_llm]


def selectors_at(method, layer: int, layout) -> list:
    """The methods whose ``select`` runs at ``layer``, in order."""
    return [part for part in method.components() if part.uses_prune_layers and layer in part.prune_layers(layout)]


# ---------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------
class Driver:
    """Installs the hooks that apply ``method`` inside ``model``'s text decoder (see ``tokenprune.apply``)."""

    def __init__(self, model, family: FamilySpec, method, questions: list[str] | None = None):
        self.model = model
        self.family = family
        self.method = method
        self.info = family.model_info(model)
        self.questions = questions
        # the family's vision-encoder capture, only for a method that reads vision signals (refused clearly here,
        # before any model work, on a family that has none)
        needs_signals = any(getattr(part, "needs_vision_signals", False) for part in reducers_before_llm(method))
        self.signals = (SignalCapture(model, family.vision_signal_source(model), MIN_SCORE_CHUNK_BYTES) if needs_signals
                        else None)
        self.outer = family.outer_model(model)
        self.text_model = family.text_model(model)
        self.layers = family.layers(model)
        self.devices = [module_device(layer) for layer in self.layers]  # several when accelerate spread the model
        self.attention = [family.attention_math(layer) for layer in self.layers]
        self.final_norm = family.final_norm(model)
        self.info = family.model_info(model)
        self.config = self.text_model.config
        self.changes_rows = method.uses_before_llm or method.uses_prune_layers
        self._handles: list = []
        self._wrapped_forwards: list = []  # (layer, attribute, the instance's own previous value or None)
        self._captured: dict | None = None
        self.active: PrefillCall | DecodeCall | None = None
        self.last_report: PrefillReport | None = None

    # -- installation -----------------------------------------------------------------------------------
    def install(self) -> None:
        refuse_offloaded(self.layers)
        if self.signals is not None:
            self.signals.install()
        self._handles.append(self.outer.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))
        self._handles.append(self.outer.register_forward_hook(self._release_inputs))
        self._handles.append(self.text_model.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        self._handles.append(self.text_model.register_forward_hook(self._end_call))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        if self.method.uses_layer_plan:
            for index, layer in enumerate(self.layers):
                self._wrap_layer_forward(index, layer)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.signals is not None:
            self.signals.remove()
        for layer, slot, previous in reversed(self._wrapped_forwards):
            if previous is None:
                delattr(layer, slot)  # drop the instance attribute: the class forward is back
            else:
                setattr(layer, slot, previous)  # accelerate's wrapped forward, or whatever was there
        self._wrapped_forwards.clear()
        self._captured = None
        self.active = None

    def _wrap_layer_forward(self, index: int, layer) -> None:
        """Wrap the layer's forward (inside accelerate's device hook, where there is one: ``forward_slot``)."""
        slot = forward_slot(layer)
        stock_forward = getattr(layer, slot)

        def forward(hidden_states, *args, **kwargs):
            call = self.active
            if isinstance(call, DecodeCall) and index in call.decode.attention_skipped:
                return run_layer_without_attention(layer, index, hidden_states, **kwargs)
            plan = call.plans.get(index) if isinstance(call, PrefillCall) else None
            if plan is None:
                return stock_forward(hidden_states, *args, **kwargs)
            return run_planned_layer(self.attention[index], plan, call.seq.layouts, hidden_states, **kwargs)

        self._wrapped_forwards.append((layer, slot, layer.__dict__.get(slot)))
        setattr(layer, slot, forward)

    # -- outer model: remember the inputs of the current call --------------------------------------------
    def _capture_inputs(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._captured = {"input_ids": input_ids, **{key: kwargs.get(key) for key in self.family.capture_keys}}
        if self.signals is not None and self.signals.encodes(kwargs):
            self.signals.clear()  # this call encodes its pixels itself: earlier captures belong to no prefill of it
        return None

    def _release_inputs(self, module, args, output):
        self._captured = None
        return None

    # -- text model: start of a call ---------------------------------------------------------------------
    def _begin_call(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = module.embed_tokens(input_ids)
            kwargs["inputs_embeds"], kwargs["input_ids"] = embeds, None
            args = ()
        cache = cache_argument(kwargs)
        if cache is None or cache.get_seq_length() == 0:
            self.active = self._begin_prefill(embeds, kwargs)
        else:
            self.active = self._begin_decode(embeds, kwargs, cache)
        return args, kwargs

    def _begin_prefill(self, embeds: torch.Tensor, kwargs: dict) -> PrefillCall:
        batch, length = embeds.shape[:2]
        side = self.family.side_inputs(self.model, kwargs, embeds)  # taken over from the stock loop
        captured = refuse_missing_input_ids(self._captured, length)
        seq = PrefillSequence(hidden=embeds, layouts=self.family.layouts(self.model, captured, embeds.device),
                              positions=self.family.positions(kwargs.get("position_ids"), batch, length, 0,
                                                              embeds.device), side=side)
        call = PrefillCall(seq=seq, cache=self._prefill_cache(kwargs), decode=DecodeState(),
                           report=PrefillReport(prompt_tokens=length, visual_tokens=seq.layouts[0].num_visual,
                                                timer=OverheadTimer(embeds.device),
                                                pre_llm_timer=OverheadTimer(embeds.device)))
        if call.cache is not None:
            setattr(call.cache, STATE_ATTRIBUTE, call.decode)
        vision = [None] * batch
        if self.signals is not None:  # this prefill's encoder captures, consumed here (computed only if asked)
            vision = self.signals.for_samples(seq.layouts)
            self.signals.clear()
        if all(layout.num_visual == 0 for layout in seq.layouts):
            # nothing to prune; the layers still report (a layer plan acting on text rows too, as the seed's
            # layer skip does, runs and is counted)
            warnings.warn(f"method {self.method.name!r}: the input has no visual tokens; nothing is pruned",
                          stacklevel=2)
            call.report.tokens_entering_decoder, call.report.visual_entering_decoder = length, 0
            return call
        if self.changes_rows:
            _refuse_padding(kwargs.get("attention_mask"), batch)
        for reducer in reducers_before_llm(self.method):
            self._before_llm(call, reducer, vision)
        if call.seq.changed:
            self._hand_over_to_stock_loop(call.seq, kwargs)
        call.decoder_input = (call.seq.hidden, call.seq.positions, call.seq.layouts)
        if self.method.uses_prune_layers:
            layers = [layer for layer in self.method.prune_layers(call.seq.layouts[0]) if 0 <= layer < len(self.layers)]
            call.select_layers = frozenset(layers)
            call.score_previous_at = frozenset(layer - 1 for layer in layers)
        call.report.tokens_entering_decoder = call.seq.length
        call.report.visual_entering_decoder = call.seq.layouts[0].num_visual
        return call

    def _prefill_cache(self, kwargs: dict):
        cache = cache_argument(kwargs)
        use_cache = kwargs.get("use_cache")
        if (self.config.use_cache if use_cache is None else use_cache) and cache is None:
            cache = DynamicCache(config=self.config)
            set_cache_argument(kwargs, type(self.text_model).forward, cache)
        if cache is not None and type(cache) is not DynamicCache:
            raise PruningInputError(f"tokenprune prunes into a DynamicCache; got {type(cache).__name__}. "
                                    "Use the default cache (no cache_implementation / static cache).")
        return cache

    def _before_llm(self, call: PrefillCall, reducer, vision: list) -> None:
        seq = call.seq
        with call.report.timer, call.report.pre_llm_timer:
            reductions = []
            for b, layout in enumerate(seq.layouts):
                if self.questions is not None and len(self.questions) != len(seq.layouts):
                    raise PruningInputError(f"apply(questions=...) has {len(self.questions)} questions for a batch of "
                                            f"{len(seq.layouts)} samples")
                question = self.questions[b] if self.questions is not None else None
                sample = DecoderInput(seq.hidden[b : b + 1], seq.positions[b : b + 1], layout, call.report.stats,
                                      side={layer: values[b : b + 1] for layer, values in seq.side.items()},
                                      model=self.info, vision=vision[b], question=question)
                reduction = reducer.before_llm(sample) if layout.num_visual else None
                if reduction is not None:
                    reduction.check(layout.length, f"{reducer.name}.before_llm", "before the decoder")
                reductions.append(reduction)
            self._reduce(call, reductions, index=0, before_llm=True)

    def _hand_over_to_stock_loop(self, seq: PrefillSequence, kwargs: dict) -> None:
        """After a pre-LLM change the stock loop runs on the new rows: contiguous positions (no packed sequence is
        inferred) and no padding mask; the layer hooks substitute the real rotary tables and masks."""
        kwargs["inputs_embeds"] = seq.hidden
        kwargs["attention_mask"] = None
        contiguous = torch.arange(seq.length, device=seq.hidden.device)[None].expand(seq.batch, -1)
        kwargs["position_ids"] = self.family.stock_position_ids(seq.positions, contiguous)

    def _begin_decode(self, embeds: torch.Tensor, kwargs: dict, cache) -> DecodeCall | None:
        decode = getattr(cache, STATE_ATTRIBUTE, None)
        if decode is None or not (decode.changed or decode.attention_skipped):
            return None  # a cache this driver did not prefill, or a prefill that kept everything: run stock
        if not decode.changed:
            return DecodeCall(positions=None, cache=cache, decode=decode)  # rows and positions are the stock ones
        batch, length = embeds.shape[:2]
        past = cache.get_seq_length(0)
        position_ids = self.family.decode_position_ids(kwargs.get("position_ids"), batch, length, past,
                                                       decode.position_offset, embeds.device)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if not bool(mask.all()):
                raise PruningInputError("attention_mask has padding during decode of a pruned prefill")
            kwargs["attention_mask"] = None  # the stock 2-D mask has the unpruned length
        positions = self.family.positions(kwargs.get("position_ids"), batch, length, past, embeds.device)
        return DecodeCall(positions=positions, cache=cache, decode=decode)

    # -- text model: end of a call -----------------------------------------------------------------------
    def _end_call(self, module, args, output):
        call, self.active = self.active, None
        if not isinstance(call, PrefillCall):
            return None
        self.last_report = call.report
        call.decode.changed = call.seq.changed
        call.decode.attention_skipped = frozenset(
            index for index, plan in call.plans.items() if plan is not None and plan.skip_attn and plan.attn_all_rows)
        if call.cache is not None:
            offset = call.seq.layouts[0].original_length - call.cache.get_seq_length(0)
            call.decode.position_offset = offset
            if offset:
                self.family.after_shortened_prefill(self.model, offset)
        return None

    # -- every decoder layer -----------------------------------------------------------------------------
    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            call = self.active
            if isinstance(call, PrefillCall):
                return self._prefill_layer(index, call, args, kwargs)
            if isinstance(call, DecodeCall):
                return self._decode_layer(index, call, args, kwargs)
            return None

        return hook

    def _prefill_layer(self, index: int, call: PrefillCall, args, kwargs):
        seq = call.seq
        seq.hidden = args[0] if args else kwargs.pop("hidden_states")
        if not seq.changed:
            seq.tables = kwargs["position_embeddings"]  # the stock loop's tables are the rows' tables
        seq = call.seq = seq.to(self.devices[index])  # a model spread over devices: the rows go to this layer's
        seq.add_side_input(index)
        if index in call.select_layers:
            self._select(index, call)
            seq = call.seq = call.seq.to(self.devices[index])
        seq.previous = seq.hidden if index in call.score_previous_at else None
        if call.select_layers:
            call.ledger.record(index, seq.layouts)
        if seq.changed:
            kwargs["position_embeddings"] = seq.tables
            kwargs["attention_mask"] = seq.masks[_layer_type(self.config, index)]
            kwargs["position_ids"] = torch.arange(seq.length, device=seq.hidden.device)[None].expand(seq.batch, -1)
        plan = self._plan(index, call)
        call.report.record_layer(index, seq.layouts[0], seq.length, plan)
        return (seq.hidden, *args[1:]), kwargs

    def _plan(self, index: int, call: PrefillCall):
        if not self.method.uses_layer_plan:
            return None
        plan = self.method.layer_plan(index, call.seq.layouts[0])
        if plan is not None and plan.skip_attn and plan.attn_all_rows and self.changes_rows:
            raise PruningInputError(f"layer {index}: an attention skip for every row (no KV-cache entry; layer skip "
                                    "semantics 'seed') cannot be combined with token pruning")
        call.plans[index] = plan if plan is not None and not plan.is_identity else None
        return call.plans[index]

    def _decode_layer(self, index: int, call: DecodeCall, args, kwargs):
        if not call.decode.changed:
            return None  # every cache that holds keys has the full length: the stock masks and tables are right
        cache = call.cache
        hidden = args[0] if args else kwargs["hidden_states"]
        layer_length = cache.layers[index].get_seq_length() if index < len(cache.layers) else 0
        if layer_length != cache.get_seq_length(0):
            kwargs["attention_mask"] = decode_mask(hidden, layer_length, hidden.shape[1],
                                                   self.config._attn_implementation)
        shift = call.decode.layer_position_shift.get(index, 0)
        if shift:
            if shift not in call.tables:
                call.tables[shift] = self.family.rotary(self.text_model, hidden, call.positions + shift)
            kwargs["position_embeddings"] = call.tables[shift]
        return args, kwargs

    # -- selection ---------------------------------------------------------------------------------------
    def _select(self, index: int, call: PrefillCall) -> None:
        for selector in selectors_at(self.method, index, call.seq.layouts[0]):
            with call.report.timer:
                seq = call.seq
                reductions = []
                for b, layout in enumerate(seq.layouts):
                    if layout.num_visual == 0:
                        reductions.append(None)
                        continue
                    reduction = selector.select(self._step(index, call, b))
                    reduction.check(layout.length, f"{selector.name}.select", f"at layer {index}")
                    reductions.append(reduction)
                self._reduce(call, reductions, index)

    def _step(self, index: int, call: PrefillCall, b: int) -> PrefillStep:
        """The PrefillStep of sample ``b`` at the input of layer ``index``."""
        seq = call.seq
        hidden, positions, tables = seq.sample(b)
        previous = None if seq.previous is None else seq.previous[b : b + 1]
        unreduced = call.reduced_at != index  # the rows are still those layer index - 1 saw and cached

        def source_of(layer: int, what: str):
            """The input of ``layer`` (this layer's or the one below's) and its cached post-RoPE keys, if usable."""
            if layer == index:
                return hidden, None
            if layer == index - 1 and previous is not None:
                # layer index - 1 cached exactly these rows' keys (after RoPE) unless a reduction ran since
                return previous, cached_keys(call.cache, layer, b, previous.shape[1]) if unreduced else None
            raise ValueError(f"step.{what}(layer={layer}) at layer {index}: it can come from layer {index} or "
                             f"{index - 1} (the layer just below the selection)")

        def scorer(layer, queries, keys, rope, causal, heads, reduce):
            source, keys_cached = source_of(layer, "attention")
            math = self.attention[layer]
            device = self.devices[layer]  # the scoring layer's own device (layer index - 1 may sit on another)
            source, layer_tables = source.to(device), tuple(table.to(device) for table in tables)
            q = project_queries(math, source, queries.to(device), *layer_tables, rope=rope)
            k = (keys_cached if keys_cached is not None and rope
                 else project_keys(math, source, *layer_tables, rope=rope))
            probs = attention_probabilities(q, k, queries.to(device), None if keys is None else keys.to(device),
                                            math.scaling, causal=causal, heads=heads, reduce=reduce,
                                            chunk_bytes=self._score_budget(source))
            return probs[0].to(hidden.device)

        def keys_of(layer: int) -> torch.Tensor:
            source, keys_cached = source_of(layer, "keys")
            keys = keys_cached if keys_cached is not None else project_keys(self.attention[layer], source, *tables,
                                                                             rope=True)
            return keys[0]  # [KVH, L, hd]

        def decoder_input() -> DecoderInput:
            embeds, entering, layouts = call.decoder_input
            return DecoderInput(embeds[b : b + 1], entering[b : b + 1], layouts[b], call.report.stats, model=self.info)

        return PrefillStep(index, hidden, positions, seq.layouts[b], scorer, call.report.stats, model=self.info,
                           keys=keys_of, final_norm=self.final_norm, decoder_input=decoder_input)

    def _score_budget(self, hidden: torch.Tensor) -> int:
        """Bytes of one score block: the size of the layer's own MLP activation for this sequence, so scoring
        never raises the prefill's peak memory above what the layer itself needs (at least MIN_SCORE_CHUNK)."""
        width = getattr(self.config, "intermediate_size", None) or 4 * self.config.hidden_size
        return max(MIN_SCORE_CHUNK_BYTES, hidden.shape[0] * hidden.shape[1] * width * hidden.element_size())

    # -- applying reductions (before the decoder and at layer inputs) ------------------------------------
    def _reduce(self, call: PrefillCall, reductions: list[Reduction | None], index: int,
                before_llm: bool = False) -> None:
        seq = call.seq
        if all(r is None or r.keeps_everything(layout.length) for r, layout in zip(reductions, seq.layouts)):
            return  # the sequence stays the stock one
        reductions = [r if r is not None else Reduction(torch.arange(layout.length, device=seq.hidden.device))
                      for r, layout in zip(reductions, seq.layouts)]
        entering = seq.length
        new = seq.reduce(reductions, rotary=lambda hidden, positions: self.family.rotary(self.text_model, hidden,
                                                                                          positions))
        if any(r.reindex_positions for r in reductions):
            self._reindex_positions(index, new, call.decode)
        if any(r.sequence_positions is not None for r in reductions):
            self._given_positions(index, seq.positions, new.positions, call.decode)
        if any(r.prune_cache_before for r in reductions) and call.cache is not None:
            rows = torch.stack([r.keep for r in reductions])
            call.ledger.prune_below(call.cache, index, rows, entering, new.layouts)
        if new.tables is None:  # before the first layer there are no stock tables to gather
            new.tables = self.family.rotary(self.text_model, new.hidden, new.positions)
        new.masks = self._prefill_masks(new.hidden)
        call.seq = new
        call.reduced_at = -1 if before_llm else index
        if not before_llm:
            call.report.kept_rows[index] = new.layouts[0].original[new.layouts[0].is_visual]

    def _reindex_positions(self, index: int, seq: PrefillSequence, decode: DecodeState) -> None:
        if not self.family.reindex_positions:
            raise ValueError(f"positions='reindex' is not defined for the {self.family.family} family "
                             f"({self.family.rope_name}): keep the original positions")
        seq.positions = torch.arange(seq.length, device=seq.hidden.device)[None, None].expand(
            seq.batch, seq.positions.shape[1], -1)
        seq.tables = self.family.rotary(self.text_model, seq.hidden, seq.positions)
        shift = seq.length - seq.layouts[0].original_length
        for layer in range(index, len(self.layers)):
            decode.layer_position_shift[layer] = shift

    def _given_positions(self, index: int, before: torch.Tensor, after: torch.Tensor, decode: DecodeState) -> None:
        """A reduction gave every row's positions: decoding continues after their maximum from layer ``index`` on
        (the rotary tables of decode steps there shift by the change of the maximum)."""
        change = (after.amax(dim=(1, 2)) - before.amax(dim=(1, 2))).tolist()  # [B]
        if len(set(change)) != 1:
            raise PruningInputError("the samples of this batch were given positions that continue differently; run "
                                    "them with batch size 1")
        for layer in range(index, len(self.layers)):
            decode.layer_position_shift[layer] = decode.layer_position_shift.get(layer, 0) + int(change[0])

    def _prefill_masks(self, hidden: torch.Tensor) -> dict:
        """Masks of a shortened prefill, built without the partly filled cache (its length is not the rows')."""
        batch, length = hidden.shape[:2]
        mask_kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=None,
                           position_ids=torch.arange(length, device=hidden.device)[None].expand(batch, -1),
                           **cache_kwargs(create_causal_mask, None))
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks


def _layer_type(config, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    return layer_types[index] if layer_types else "full_attention"


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
