"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``: windowed ViT + 2x2 merger + Qwen2 decoder, 3-D mRoPE).

Everything the engine needs is Qwen2-VL's (``qwen2vl.py``): the windowed ViT and the video time steps
(``second_per_grid_ts``) change only the stock positions, which the engine gathers as they are. The vision
signals undo the ViT's window permutation.
"""

from __future__ import annotations

from functools import partial

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .base import ModelSpec, register_adapter, register_model
from .qwen2vl import Qwen2VLAdapter, QwenViTSignals, check_image_options, check_video_options  # noqa: F401


class QwenWindowedSignals(QwenViTSignals):
    """Qwen2.5-VL's windowed ViT: its last block is a full-attention block; undo the window permutation."""

    def hook(self, model, record) -> list:
        visual = model.model.visual
        if len(visual.blocks) - 1 not in visual.fullatt_block_indexes:
            raise ValueError(f"vision signals read the last ViT block as a full-attention block; this model's "
                             f"full-attention blocks are {list(visual.fullatt_block_indexes)} of {len(visual.blocks)}")
        return super().hook(model, record)

    def window_index(self, model):
        from transformers.vision_utils import get_vision_window_index

        visual = model.model.visual

        def window_index(grid_thw):
            return get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                           window_size=visual.window_size, patch_size=visual.patch_size)[0]

        return window_index


@register_adapter
class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen25vl"
    model_classes = (Qwen2_5_VLForConditionalGeneration,)
    tiny_model = "tiny_qwen25vl"

    def vision_signal_source(self, model):
        return QwenWindowedSignals(self.family)

    def tiny_config(self, layers: int = 6):
        from .zoo.tiny import tiny_qwen25vl_config

        return tiny_qwen25vl_config(layers=layers)

    def tiny_processor(self):
        from .zoo.tiny import tiny_qwen25vl_processor

        return tiny_qwen25vl_processor()


def qwen25vl_config(size: str) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-{3B,7B,32B}-Instruct, from the published config.json files."""
    text = {
        "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                    num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    }[size]
    vision_intermediate = {"3b": 3420, "7b": 3420, "32b": 3456}[size]
    return Qwen2_5_VLConfig(
        text_config=dict(**text, max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=vision_intermediate, num_heads=16,
                           out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                           tokens_per_second=2, hidden_act="silu"),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=text["tie_word_embeddings"],
    )


for _size in ("3b", "7b", "32b"):
    register_model(ModelSpec(f"qwen25vl_{_size}", "qwen25vl", f"Qwen/Qwen2.5-VL-{_size.upper()}-Instruct",
                             partial(qwen25vl_config, _size), description=f"Qwen2.5-VL-{_size.upper()}-Instruct"))
