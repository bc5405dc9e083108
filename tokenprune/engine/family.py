"""What the engine needs from a model family, with defaults for a Llama-style decoder, and the family registry.

A model family is one file under ``tokenprune/models/`` whose class extends ``FamilySpec`` (through
``models.base.ModelAdapter``, which adds loading and preprocessing) and is registered with ``register_family``;
the engine finds it by the model's class (``family_for``) and never imports ``tokenprune.models``. Every member
has a default that is right for a Llama decoder with 1-D RoPE and one image grid, so a family overrides only
what differs (``docs/adding_a_model_family.md``):

* structure: ``outer_model`` (receives ``input_ids`` and calls the decoder), ``text_model``, ``layers``,
  ``final_norm``, ``vision_model`` (and ``resized_vision_kwargs``: its call arguments for a resized input);
* layout: ``visual_specs`` from the outer model's captured inputs (``capture_keys``), rebuilt at every call;
* RoPE: ``positions`` (``[B, P, L]`` from what the stock model got), ``rotary`` (tables for any rows),
  ``stock_position_ids`` (what the stock loop gets after a pre-LLM change), ``decode_position_ids``,
  ``after_shortened_prefill`` (e.g. ``rope_deltas``), ``reindex_positions`` (capability);
* attention math (``attention_math``) used by scores and partial layers;
* side inputs (``side_inputs``): per-row tensors the stock loop adds between layers, taken over by the engine;
* FLOPs shape (``decoder_shape``), and ``model_info`` for method validation;
* vision-encoder signals for pre-LLM methods (``vision_signal_source``; default: none, refused clearly).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .attention import AttentionMath
from .contract import ModelInfo, PruningInputError, TokenLayout, VisualSpec
from .flops import DecoderShape
from .vision import SignalSource


class FamilySpec(ABC):
    """How the engine drives one family's stock decoder (defaults: Llama-style decoder, 1-D RoPE)."""

    family: str = ""
    model_classes: tuple[type, ...] = ()  # stock transformers classes (dense and MoE variants)
    capture_keys: tuple[str, ...] = ()  # outer-model kwargs the layout needs besides input_ids
    rope_name: str = ""  # ModelInfo.rope: the family's name of its RoPE kind (for messages; no engine decision reads it)
    reindex_positions: bool = True  # contiguous re-indexing of positions is defined (PDrop's official option)
    video: bool = False  # the family takes video input

    # -- structure ----------------------------------------------------------------------------------------
    def outer_model(self, model):
        """The module that receives ``input_ids`` and calls the text decoder (``model.model``)."""
        return model.model

    def text_model(self, model):
        """The text decoder (a module with ``.layers``, ``.rotary_emb`` and ``.config``)."""
        return model.model.language_model

    def layers(self, model) -> list:
        return list(self.text_model(model).layers)

    def final_norm(self, model):
        """The text model's final norm (before the LM head): ``PrefillStep.final_norm``."""
        return self.text_model(model).norm

    def vision_model(self, model):
        """The vision encoder (timed separately; receives ``resized_vision_kwargs``)."""
        return model.model.vision_tower

    def text_config(self, model):
        return self.text_model(model).config

    # -- layout -------------------------------------------------------------------------------------------
    @abstractmethod
    def visual_specs(self, model, captured: dict) -> list[VisualSpec]:
        """One VisualSpec per sample of the current call; ``captured``: ``input_ids`` and ``capture_keys`` of the
        outer model's call (``generate`` may have dropped the grids: recover them from what is there)."""

    def layouts(self, model, captured: dict, device) -> list[TokenLayout]:
        """One TokenLayout per sample of the current call."""
        input_ids = captured["input_ids"]
        specs = self.visual_specs(model, captured)
        return [TokenLayout.from_input_ids(input_ids[b].to(device), specs[b]) for b in range(input_ids.shape[0])]

    # -- RoPE ---------------------------------------------------------------------------------------------
    def positions(self, position_ids, batch: int, length: int, past: int, device) -> torch.Tensor:
        """Rotary positions ``[B, P, L]`` of a call from the ``position_ids`` the text model got (1-D: P = 1)."""
        if position_ids is None:
            return (torch.arange(length, device=device) + past)[None, None].expand(batch, 1, -1)
        return position_ids.expand(batch, -1)[:, None]

    def rotary(self, text_model, hidden: torch.Tensor, positions: torch.Tensor):
        """The text model's own rotary tables ``(cos, sin)`` ``[B, L, hd]`` for ``positions`` ``[B, P, L]``."""
        return text_model.rotary_emb(hidden, positions[:, 0])

    def stock_position_ids(self, positions: torch.Tensor, contiguous: torch.Tensor) -> torch.Tensor:
        """What the stock loop gets as ``position_ids`` after a pre-LLM change (``contiguous``: ``[B, L']``), so that it
        infers no packed sequence; the layer hooks substitute the rotary tables of the real ``positions``."""
        return contiguous

    def decode_position_ids(self, position_ids, batch: int, length: int, past: int, offset: int, device):
        """``position_ids`` for a decoding call after a prefill whose layer-0 cache is ``offset`` rows shorter than the
        prompt (``past``: that cache's length). A manual forward without positions would count from the shortened
        cache: continue from the unpruned prompt instead. None: keep what the call has."""
        if position_ids is None and offset:
            return (torch.arange(length, device=device) + past + offset)[None].expand(batch, -1)
        return None

    def after_shortened_prefill(self, model, position_offset: int) -> None:
        """Called when a prefill left the layer-0 cache ``position_offset`` rows shorter than the prompt (pre-LLM
        reduction): fix whatever state the family's own decode position rule reads (e.g. ``rope_deltas``)."""

    # -- attention math, side inputs, FLOPs ---------------------------------------------------------------
    def attention_math(self, layer) -> AttentionMath:
        return AttentionMath(layer)

    # keyword arguments the vision encoder needs for an input whose resolution a method changed
    # (``VisualInputs.resized``); the engine adds them to its calls while such a method is applied. Default: none.
    resized_vision_kwargs: dict = {}

    def side_inputs(self, model, text_kwargs: dict, embeds: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-row tensors the stock decoder loop would add between layers, popped from the text model's kwargs:
        ``{layer: [B, L, d]}`` added by the engine to the input of ``layer`` (zero rows where a row has none), before
        any scoring there; they follow every gather and merge. Default: none."""
        return {}

    def vision_signal_source(self, model) -> SignalSource:
        """The capture hooks and computation of the vision encoder's signals (``engine/vision.py``), for methods that
        rank or merge by them (VisionZip, VisPruner, ...). Default: the family has none."""
        raise ValueError(f"vision signals not available for family {self.family!r}: a method that ranks tokens by the "
                         "vision encoder's attention cannot run on it (its family file must provide "
                         "vision_signal_source)")

    def decoder_shape(self, text_config) -> DecoderShape:
        return DecoderShape.from_config(text_config)

    def model_info(self, model) -> ModelInfo:
        config = self.text_config(model)
        return ModelInfo(num_layers=config.num_hidden_layers, rope=self.rope_name, hidden_size=config.hidden_size,
                         family=self.family, reindex_positions=self.reindex_positions,
                         side_inputs=type(self).side_inputs is not FamilySpec.side_inputs)


# ---------------------------------------------------------------------------------------------------------
# Registry (filled by tokenprune/models/*.py)
# ---------------------------------------------------------------------------------------------------------
_FAMILIES: dict[str, FamilySpec] = {}


def register_family(family_class: type[FamilySpec]) -> type[FamilySpec]:
    """Class decorator: register one instance of a family under ``family_class.family``."""
    if not family_class.family or not family_class.model_classes:
        raise ValueError(f"{family_class.__name__} needs a family name and model_classes")
    existing = _FAMILIES.get(family_class.family)
    if existing is not None and type(existing) is not family_class:
        raise ValueError(f"model family {family_class.family!r} is already registered by {type(existing).__name__}")
    _FAMILIES[family_class.family] = family_class()
    return family_class


def families() -> list[FamilySpec]:
    """Registered families, by name."""
    return [_FAMILIES[name] for name in sorted(_FAMILIES)]


def family_named(name: str) -> FamilySpec:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; available: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_for(model) -> FamilySpec:
    """The family of a loaded model, found by its class."""
    for family in _FAMILIES.values():
        if isinstance(model, family.model_classes):
            return family
    supported = ", ".join(cls.__name__ for f in _FAMILIES.values() for cls in f.model_classes)
    raise TypeError(f"tokenprune has no model family for {type(model).__name__}; supported: {supported}")


def refuse_missing_input_ids(captured: dict | None, length: int) -> dict:
    """The captured outer-model inputs of the current call, or a clear error when ``input_ids`` are missing."""
    input_ids = None if captured is None else captured.get("input_ids")
    if input_ids is None or input_ids.shape[-1] != length:
        raise PruningInputError("tokenprune finds visual tokens from input_ids: call the model with input_ids "
                                "(not inputs_embeds only)")
    return captured
