"""Architectures of the real checkpoints, for ``weights=random`` without a local config (speed / memory
benchmarks; timing does not depend on weight values). Values are those of the published config.json files."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2_5_VLConfig


def llava15_config(size: str) -> LlavaConfig:
    text = {
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    }[size]
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text, num_key_value_heads=text["num_attention_heads"], vocab_size=32064,
                                max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001,
                                tie_word_embeddings=False),
        image_token_id=32000, vision_feature_select_strategy="default", vision_feature_layer=-2,
        projector_hidden_act="gelu", pad_token_id=32001,
    )


def qwen25vl_config(size: str) -> Qwen2_5_VLConfig:
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
