"""Test-only methods and brute-force references built from eager attention probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenprune.methods.base import LayerStep, Method, Selection


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
