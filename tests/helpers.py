"""Test-only methods and brute-force references built from eager attention probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenprune.methods.base import LayerStep, Method, Selection


@dataclass
class Replay(Method):
    """Re-applies frozen selections: at each layer in ``kept``, keep non-visual rows and the visual rows whose
    original index is listed. With use_cache=False this recomputes a pruned prefill exactly."""

    kept: dict = field(default_factory=dict)
    name = "replay"

    def prune_layers(self, layout) -> list[int]:
        return sorted(self.kept)

    def select(self, step: LayerStep) -> Selection:
        wanted = torch.tensor(sorted(self.kept[step.layer]), dtype=torch.long, device=step.layout.kind.device)
        is_kept = torch.isin(step.layout.original, wanted)
        return step.keep_visual(step.layout.visual_rows()[is_kept[step.layout.visual_rows()]])


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
