"""Qwen3-VL (``Qwen3VLForConditionalGeneration``; MoE: ``Qwen3VLMoeForConditionalGeneration``): ViT with DeepStack
mergers + Qwen3 decoder (q/k norms, interleaved 3-D mRoPE).

What differs from Qwen2-VL (``qwen2vl.py``), and how this file tells the engine:

* attention math: a per-head RMSNorm on queries and keys before RoPE (``QKNormAttentionMath``), so recomputed
  scores and partial layers equal the stock attention;
* side inputs: the stock text model adds DeepStack feature k to the visual rows after decoder layer k (through a
  full-length mask, which a shortened sequence would break). ``side_inputs`` takes the features out of the text
  model's kwargs; the engine adds feature k to the input of layer k + 1 itself, on whatever visual rows survive
  (merged rows get the merged features), before any scoring there — so every method may reduce at any layer;
* layout: a video is one placeholder run per temporal step, with timestamp text (``<t seconds>``) and
  ``<|vision_start|>`` / ``<|vision_end|>`` between the runs. Rows are taken in order, so a ``(t, rows, cols)``
  grid still describes it; inside ``generate`` (no grids) the runs are grouped into videos with the per-video
  token counts of ``mm_encoder_outputs``;
* interleaved mRoPE lives in the model's own ``rotary_emb``: nothing to change (tables are per row);
* FLOPs: an MoE layer runs top-k experts of ``moe_intermediate_size`` plus the router.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                          Qwen3VLMoeForConditionalGeneration)

from ..engine.attention import QKNormAttentionMath
from ..engine.contract import ModelInputError, PruningInputError
from ..engine.flops import DecoderShape
from .base import ModelSpec, register_adapter, register_model
from .qwen2vl import Qwen2VLAdapter
from .zoo.tiny import QWEN_TEMPLATE, tiny_qwen_ids, tiny_qwen_processor, tiny_qwen_text


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3vl"
    model_classes = (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)
    tiny_model = "tiny_qwen3vl"
    capture_keys = Qwen2VLAdapter.capture_keys + ("mm_encoder_outputs",)
    video_runs_per_frame = True

    def attention_math(self, layer) -> QKNormAttentionMath:
        return QKNormAttentionMath(layer)

    def side_inputs(self, model, text_kwargs: dict, embeds: torch.Tensor) -> dict[int, torch.Tensor]:
        """DeepStack: ``{k + 1: [B, L, d]}`` with feature k on the visual rows (zeros elsewhere)."""
        mask = text_kwargs.pop("visual_pos_masks", None)  # [B, L] bool
        features = text_kwargs.pop("deepstack_visual_embeds", None)  # k -> [n_visual (batch-major), d]
        if features is None:
            return {}
        layers = len(self.text_model(model).layers)
        if len(features) >= layers:
            raise PruningInputError(f"{len(features)} DeepStack features for a {layers}-layer decoder: the last one "
                                    "would be added after the last layer")
        where = mask.to(embeds.device)[..., None].expand_as(embeds)
        return {k + 1: torch.zeros_like(embeds).masked_scatter(where, feature.to(embeds.device, embeds.dtype))
                for k, feature in enumerate(features)}

    def specs_from_positions(self, model, captured: dict):
        """Per-run grids from the 3-D positions (Qwen2-VL's rule), then each video's consecutive runs joined into
        one ``(t, rows, cols)`` grid, ``t`` from the video's token count in ``mm_encoder_outputs``."""
        specs = super().specs_from_positions(model, captured)
        if not any(spec.video_grids for spec in specs):
            return specs
        outputs = (captured.get("mm_encoder_outputs") or {}).get("video")
        if outputs is None:
            raise ModelInputError("Qwen3-VL video call without video_grid_thw and without mm_encoder_outputs: "
                                  "tokenprune cannot tell which frames belong to which video")
        sizes = iter([int(video.shape[0]) for video in outputs.pooler_output])  # tokens per video, batch order
        grouped = []
        for spec in specs:
            runs, videos = list(spec.video_grids), []
            while runs:
                tokens = next(sizes, None)
                if tokens is None:
                    raise ModelInputError("more video placeholder runs than videos in mm_encoder_outputs")
                _, rows, cols = runs[0]
                frames = tokens // (rows * cols)
                if frames * rows * cols != tokens or any(run != (1, rows, cols) for run in runs[:frames]) \
                        or len(runs) < frames:
                    raise ModelInputError(f"a Qwen3-VL video of {tokens} tokens does not match its placeholder runs "
                                          f"{runs[:frames]}")
                videos.append((frames, rows, cols))
                runs = runs[frames:]
            grouped.append(type(spec)(spec.image_token_id, spec.video_token_id, spec.image_grids, tuple(videos)))
        return grouped

    def decoder_shape(self, text_config) -> DecoderShape:
        shape = DecoderShape.from_config(text_config)
        experts = getattr(text_config, "num_experts", 0)
        if not experts:
            return shape
        if getattr(text_config, "mlp_only_layers", None) or getattr(text_config, "decoder_sparse_step", 1) != 1:
            raise ValueError("tokenprune's FLOPs count needs every decoder layer to be an MoE layer "
                             f"(mlp_only_layers={text_config.mlp_only_layers}, "
                             f"decoder_sparse_step={text_config.decoder_sparse_step})")
        return DecoderShape(hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                            layers=shape.layers, router=experts,
                            intermediate=text_config.num_experts_per_tok * text_config.moe_intermediate_size)

    def tiny_config(self, layers: int = 6):
        return tiny_qwen3vl_config(layers=layers)

    def tiny_processor(self):
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        # the real template writes the video as one unspaced "<|vision_start|><|video_pad|><|vision_end|>", which
        # the processor collapses before writing one run per temporal step (timestamp, start, pads, end)
        template = QWEN_TEMPLATE.replace("<|vision_start|> <|video_pad|> <|vision_end|>",
                                         "<|vision_start|><|video_pad|><|vision_end|>")
        return tiny_qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, chat_template=template)


# ---------------------------------------------------------------------------------------------------------
# Architectures: the published checkpoints (weights=random) and the tiny test architecture
# ---------------------------------------------------------------------------------------------------------
QWEN3VL_TEXT = {  # Qwen3-VL-*-Instruct config.json text configs (head_dim 128, rope_theta 5e6, sections [24, 20, 20])
    "2b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
               num_key_value_heads=8, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                num_key_value_heads=8, tie_word_embeddings=False),
    "30b_a3b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                    num_key_value_heads=4, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                    moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[]),
}
QWEN3VL_VISION = {  # ViT depth / width / MLP and the vision layers that feed DeepStack
    "small": dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17]),
    "large": dict(depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=[8, 16, 24]),
}


def qwen3vl_config(size: str) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """Qwen3-VL-{2B,4B,8B,32B,30B-A3B}-Instruct, from the published config.json files."""
    text = dict(QWEN3VL_TEXT[size])
    vision = QWEN3VL_VISION["small" if size in ("2b", "4b") else "large"]
    config_class = Qwen3VLMoeConfig if "num_experts" in text else Qwen3VLConfig
    return config_class(
        text_config=dict(**text, head_dim=128, vocab_size=151936, max_position_embeddings=262144, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(**vision, num_heads=16, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=text["hidden_size"], num_position_embeddings=2304,
                           hidden_act="gelu_pytorch_tanh"),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def tiny_qwen3vl_config(layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                        vision_hidden: int = 32, vision_depth: int = 3, vision_heads: int = 2, patch_size: int = 14,
                        rope_theta: float = 5000000.0, experts: int = 0) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """A tiny random Qwen3-VL (168 x 168 px image → 6 x 6 = 36 visual tokens with ``tiny_processor``), DeepStack
    from every vision layer into decoder layers 1..3; ``experts`` > 0: the MoE variant (top-2)."""
    moe = dict(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=intermediate // 2,
               decoder_sparse_step=1, mlp_only_layers=[]) if experts else {}
    text = tiny_qwen_text(layers, hidden, heads, kv_heads, intermediate, rope_theta, section=[3, 3, 2],
                          head_dim=hidden // heads, **moe)
    text["rope_parameters"]["mrope_interleaved"] = True
    return (Qwen3VLMoeConfig if experts else Qwen3VLConfig)(
        text_config=text,
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=vision_heads, out_hidden_size=hidden, patch_size=patch_size, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=list(range(vision_depth))),
        **tiny_qwen_ids(),
    )


for _size in ("2b", "4b", "8b", "32b", "30b_a3b"):
    _hub = _size.upper().replace("_", "-")
    register_model(ModelSpec(f"qwen3vl_{_size}", "qwen3vl", f"Qwen/Qwen3-VL-{_hub}-Instruct",
                             partial(qwen3vl_config, _size), description=f"Qwen3-VL-{_hub}-Instruct"))
register_model(ModelSpec("tiny_qwen3vl", "qwen3vl", None, tiny_qwen3vl_config,
                         random_processor=lambda: Qwen3VLAdapter().tiny_processor(),
                         description="tiny Qwen3-VL test architecture (DeepStack, q/k norms; random weights)"))
