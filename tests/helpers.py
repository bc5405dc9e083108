"""Test-only methods and brute-force references built from eager attention probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenprune.methods.base import LayerStep, MergedRows, Method, Selection


@dataclass
class Replay(Method):
    """Re-applies frozen selections: at each layer in ``kept``, keep non-visual rows and the visual rows whose
    original index is listed. With use_cache=False this recomputes a pruned prefill exactly. ``reindex``: number the
    survivors contiguously, as PDrop's official positions do."""

    kept: dict = field(default_factory=dict)
    reindex: bool = False
    name = "replay"

    def prune_layers(self, layout) -> list[int]:
        return sorted(self.kept)

    def select(self, step: LayerStep) -> Selection:
        wanted = torch.tensor(sorted(self.kept[step.layer]), dtype=torch.long, device=step.layout.kind.device)
        is_kept = torch.isin(step.layout.original, wanted)
        return step.keep_visual(step.layout.visual_rows()[is_kept[step.layout.visual_rows()]],
                                reindex_positions=self.reindex)


def forced_generation(vlm, new_tokens: int) -> dict:
    """``generate`` kwargs for exactly ``new_tokens`` greedy tokens that never emit an image / video placeholder
    (a random model may; the prompt replayed with one would be invalid)."""
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                return_dict_in_generate=True, suppress_tokens=_placeholder_ids(vlm))


def forced_choice(vlm, logits: torch.Tensor) -> int:
    """The token ``forced_generation`` picks from raw last-row ``logits`` ``[1, V]``: greedy without end-of-turn
    (``min_new_tokens``) and without visual placeholders."""
    allowed = logits.clone()
    allowed[:, _placeholder_ids(vlm) + [vlm.model.generation_config.eos_token_id or vlm.model.config.eos_token_id]] = float("-inf")
    return int(allowed.argmax())


def _placeholder_ids(vlm) -> list[int]:
    config = vlm.model.config
    return [i for i in (config.image_token_id, getattr(config, "video_token_id", None)) if i is not None]


def prompt_so_far(inputs: dict, sequences: torch.Tensor, step: int) -> dict:
    """``inputs`` with the first ``step`` generated tokens of ``sequences`` appended (a no-cache forward of it
    recomputes decoding step ``step``)."""
    extended = dict(inputs)
    extended["input_ids"] = sequences[:, : inputs["input_ids"].shape[1] + step]
    extended["attention_mask"] = torch.ones_like(extended["input_ids"])
    if "mm_token_type_ids" in extended:
        extended["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, step))
    return extended


def stock_decoder_call(vlm, inputs) -> dict:
    """What the stock outer model hands its text decoder: ``embeds`` ``[1, L, d]``, ``positions`` ``[1, P, L]``, and
    ``side`` ``{layer: [1, L, d]}`` — the per-row inputs the stock loop adds between layers (Qwen3-VL's DeepStack
    feature k is added after layer k, i.e. to the input of layer k + 1)."""
    captured = {}
    text_model = vlm.adapter.text_model(vlm.model)
    handle = text_model.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            vlm.model(**inputs, use_cache=False)
    finally:
        handle.remove()
    embeds = captured["inputs_embeds"]
    position_ids = captured.get("position_ids")
    if position_ids is None:
        positions = torch.arange(embeds.shape[1])[None, None]
    elif position_ids.dim() == 3:
        positions = position_ids[-3:].permute(1, 0, 2)
    else:
        positions = position_ids[:, None]
    side = {}
    for k, feature in enumerate(captured.get("deepstack_visual_embeds") or []):
        full = torch.zeros_like(embeds)
        full[captured["visual_pos_masks"]] = feature
        side[k + 1] = full
    return {"embeds": embeds, "positions": positions, "side": side}


def eager_attentions(vlm, inputs, method: Method | None = None):
    """Stock eager attention maps (``[H, L_l, L_l]`` per layer), optionally under ``method``'s pruning."""
    import tokenprune as tp

    with torch.no_grad():
        if method is None:
            out = vlm.model(**inputs, output_attentions=True)
            report = None
        else:
            with tp.apply(vlm.model, method) as session:
                out = vlm.model(**inputs, output_attentions=True)
            report = session.last_report
    return [a[0].float() for a in out.attentions], report


def current_rows(layout, kept_visual_originals) -> list[int]:
    """Original row indices of the sequence after keeping ``kept_visual_originals`` (all text rows stay)."""
    text = layout.original[~layout.is_visual].tolist()
    return sorted(set(text) | set(kept_visual_originals))


def topk_original(scores: torch.Tensor, columns_original: list[int], k: int) -> set[int]:
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return {columns_original[i] for i in order.tolist()}


def stock_prefill(vlm, inputs, layer: int) -> dict:
    """The stock model's own prefill: ``hidden`` ``[1, L, d]`` entering decoder layer ``layer`` and its ``cache`` (keys
    after RoPE, ``[1, KVH, L, hd]`` per layer) — independent of tokenprune's engine."""
    from tokenprune.engine.compat import output_cache

    captured = {}

    def record(module, args, kwargs):
        captured.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

    handle = vlm.adapter.layers(vlm.model)[layer].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            out = vlm.model(**inputs, use_cache=True)
    finally:
        handle.remove()
    return {"hidden": captured["hidden"], "cache": output_cache(out)}


class LayerSpy:
    """Records what the stock decoder layer ``layer`` receives on every call (hidden rows and rotary tables)."""

    def __init__(self, vlm, layer: int):
        self.calls: list[dict] = []
        module = vlm.adapter.layers(vlm.model)[layer]
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.calls.append({"length": hidden.shape[1], "hidden": hidden.detach().clone(),
                           "tables": tuple(t.clone() for t in kwargs["position_embeddings"])})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def rotary_tables(vlm, positions: torch.Tensor):
    """The text model's own rotary tables for ``positions`` ``[1, P, n]``."""
    text_model = vlm.adapter.text_model(vlm.model)
    hidden = torch.zeros(1, 1, text_model.config.hidden_size)
    return vlm.adapter.rotary(text_model, hidden, positions)


@dataclass
class Frozen(Method):
    """Runs ``inner`` and records each of its reductions by original rows; with ``replay=True`` re-applies the
    recorded reductions instead (kept rows, merged rows with the same members and weights — values recomputed as
    ``Σ weights · rows`` — and the same position rules). Rows beyond the recorded prompt (generated tokens of an
    extended prompt) are kept. With use_cache=False this recomputes a pruned, merged prefill exactly."""

    inner: Method = None
    replay: bool = False
    recorded: dict = field(default_factory=dict)
    name = "frozen"

    def prune_layers(self, layout) -> list[int]:
        return self.inner.prune_layers(layout)

    def select(self, step: LayerStep) -> Selection:
        original = step.layout.original
        if not self.replay:
            reduction = self.inner.select(step)
            merged = reduction.merged
            self.recorded[step.layer] = dict(
                length=step.layout.original_length, keep=original[reduction.keep],
                reindex=reduction.reindex_positions,
                merged=None if merged is None else dict(
                    sources=original[merged.sources], into=merged.into, weights=merged.weights,
                    anchor=torch.where(merged.anchor < step.layout.length,  # -1: at the end
                                       original[merged.anchor.clamp(max=step.layout.length - 1)], -1),
                    positions=merged.positions))
            return reduction
        record = self.recorded[step.layer]
        inverse = torch.full((step.layout.original_length,), -1, dtype=torch.long)
        inverse[original] = torch.arange(original.numel())
        extra = (original >= record["length"]).nonzero().flatten()  # rows the recorded prompt did not have
        keep = torch.cat([inverse[record["keep"]], extra]).sort().values
        merged = None
        if record["merged"] is not None:
            m = record["merged"]
            merged = MergedRows(sources=inverse[m["sources"]], into=m["into"], weights=m["weights"],
                                anchor=torch.where(m["anchor"] >= 0, inverse[m["anchor"].clamp(min=0)],
                                                   step.layout.length), positions=m["positions"])
        return Selection(keep, merged=merged, reindex_positions=record["reindex"])


def assert_cached_decoding_equals_recompute(vlm, inputs, out, method: Method, steps: int) -> None:
    """Every greedy step of ``out`` (``generate`` with ``forced_generation``, cached) equals a forward without a cache
    of the prompt so far under ``method`` (which must reproduce the prefill's reductions: a replay, or a method that
    does not depend on the text), to fp32 kernel differences; the chosen tokens agree."""
    import tokenprune as tp

    prompt_length = inputs["input_ids"].shape[1]
    for step in range(steps):
        extended = prompt_so_far(inputs, out.sequences, step)
        with torch.no_grad(), tp.apply(vlm.model, method):
            recomputed = vlm.model(**extended, use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[step], recomputed, rtol=1e-5, atol=1e-5)
        assert forced_choice(vlm, recomputed) == int(out.sequences[0, prompt_length + step])


def layers_by_hand(vlm, hidden, positions, side: dict, layers: range) -> torch.Tensor:
    """The stock decoder layers ``layers`` on ``hidden`` ``[1, L, d]`` (SDPA's own causal rule: no mask), with the
    model's own rotary tables of ``positions`` ``[1, P, L]`` and the side inputs added at their layers' inputs."""
    text_model = vlm.adapter.text_model(vlm.model)
    stock_positions = positions[:, 0] if positions.shape[1] == 1 else positions.permute(1, 0, 2)
    tables = text_model.rotary_emb(hidden, stock_positions)
    for index in layers:
        if index in side:
            hidden = hidden + side[index]
        hidden = text_model.layers[index](hidden, attention_mask=None, position_embeddings=tables)
    return hidden


def final_logits(vlm, hidden) -> torch.Tensor:
    """Logits of every row ``[L, V]``."""
    return vlm.model.lm_head(vlm.adapter.text_model(vlm.model).norm(hidden))[0]


def batched_inputs(vlm, samples) -> dict:
    """One processor call for several one-image samples (padded where their prompts differ in length)."""
    from tokenprune.models.images import load_images

    texts = []
    for sample in samples:
        content = [{"type": "image"}, {"type": "text", "text": sample.question}]
        texts.append(vlm.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                       add_generation_prompt=True))
    images = [load_images(s.images)[0] for s in samples]
    return dict(vlm.processor(text=texts, images=images, return_tensors="pt", padding=True))


def reduction_by_hand(x: torch.Tensor, record: dict, merged_values: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[L, ...]`` → the rows a reduction recorded by ``helpers.Frozen`` (on rows that are still the original
    ones) leaves, by its stated rule: kept rows in order; merged row m = Σ weights · x[sources] (float64), or
    ``merged_values[m]``, placed just before row ``anchor[m]`` (-1: at the end), equal anchors in m order."""
    merged, before = record["merged"], {}
    if merged is not None:
        for m in range(int(merged["into"].max()) + 1):
            members = merged["into"] == m
            if merged_values is not None:
                value = merged_values[m]
            else:
                value = sum(float(w) * x[int(s)].double() for w, s in zip(merged["weights"][members],
                                                                          merged["sources"][members])).to(x.dtype)
            before.setdefault(int(merged["anchor"][m]), []).append(value)
    kept = set(record["keep"].tolist())
    rows = []
    for r in range(x.shape[0]):
        rows += before.get(r, [])
        if r in kept:
            rows.append(x[r])
    return torch.stack(rows + before.get(-1, []))


def logits_after_a_reduction_by_hand(vlm, inputs, layer: int, record: dict) -> torch.Tensor:
    """Final logits ``[L', V]`` of the stock decoder layers run by hand around one reduction at ``layer``'s input
    (``record``: ``helpers.Frozen.recorded[layer]``, the first reduction of the prefill): the layers before it on the
    whole prompt with their side inputs, the side input of ``layer``, then the reduction by hand on the hidden rows,
    on the later layers' side inputs (same members and weights) and on the positions (re-numbered contiguously,
    or kept rows' own and merged rows' recorded ``[P, M]`` positions), then the remaining layers."""
    call = stock_decoder_call(vlm, inputs)
    layers = len(vlm.adapter.layers(vlm.model))
    hidden = layers_by_hand(vlm, call["embeds"], call["positions"], call["side"], range(layer))
    if layer in call["side"]:
        hidden = hidden + call["side"][layer]
    hidden = reduction_by_hand(hidden[0], record)
    side = {k: reduction_by_hand(values[0], record)[None] for k, values in call["side"].items() if k > layer}
    positions = call["positions"][0]  # [P, L]
    if record["reindex"]:
        positions = torch.arange(hidden.shape[0])[None].expand(positions.shape[0], -1)
    else:
        merged = record["merged"]
        given = None if merged is None else merged["positions"].T  # [M, P]
        positions = reduction_by_hand(positions.T, record, given).T
    return final_logits(vlm, layers_by_hand(vlm, hidden[None], positions[None], side, range(layer, layers)))
