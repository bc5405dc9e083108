"""LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP vision tower + projector + Llama decoder)."""

from __future__ import annotations

import math
from functools import partial

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ..data.sample import Sample
from ..engine.contract import FixedGeometry, ModelInputError, VisualSpec
from ..engine.vision import SignalSource
from .base import Inputs, ModelAdapter, ModelSpec, register_adapter, register_model
from .images import load_images
from .vision_signals import clip_groups, clip_signal_layer

# The llava-hf template, used when a checkpoint's processor carries none.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class ClipSignals(SignalSource):
    """LLaVA's CLIP tower: the CLS row and head-mean keys of the layer producing the feature layer (22 of 24), its
    output patches (pre-projector features, CLS separate), the multimodal projector and the tower's final norm."""

    family = "llava"
    has_cls = True
    encoder_inputs = ("pixel_values",)

    def layer(self, model):
        config = model.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError("vision signals support vision_feature_select_strategy='default' (CLS not a visual "
                             f"token), got {config.vision_feature_select_strategy!r}")
        return model.model.vision_tower.encoder.layers[clip_signal_layer(config)]

    def hook(self, model, record) -> list:
        def capture(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            record({"hidden": hidden, "output": output[0] if isinstance(output, tuple) else output})

        return [self.layer(model).register_forward_hook(capture, with_kwargs=True)]

    def compute(self, model, captures, chunk_bytes):
        return clip_groups(self.layer(model), captures, chunk_bytes)

    def project(self, model, features):
        return model.model.multi_modal_projector(features)

    def post_norm(self, model, features):
        return model.model.vision_tower.post_layernorm(features)


@register_adapter
class LlavaAdapter(ModelAdapter):
    """Everything the engine needs is the ``FamilySpec`` default (Llama decoder, 1-D RoPE) but the layout."""

    family = "llava"
    model_classes = (LlavaForConditionalGeneration,)
    tiny_model = "tiny_llava"
    rope_name = "1d"
    capture_keys = ("pixel_values", "mm_encoder_outputs")  # the image size of the call (downsample changes it)
    # CLIP at another input size than its own (downsample: 14·g px) needs its position table interpolated; at the
    # native size the interpolation returns the table itself, so the call is unchanged
    resized_vision_kwargs = {"interpolate_pos_encoding": True}

    def vision_model(self, model):
        return model.model.vision_tower

    def vision_signal_source(self, model) -> SignalSource:
        return ClipSignals()

    @staticmethod
    def tokens_per_image(config, captured: dict | None = None) -> tuple[int, int, int]:
        """(count, rows, cols) of LLM tokens per image (one grid, no tiling): from the call's own pixels or encoder
        outputs when it has them (an input resized by ``downsample``: CLIP at 14·g px emits g × g), else from the
        vision config (``image_size / patch_size`` squared)."""
        vision = config.vision_config
        cls_kept = config.vision_feature_select_strategy != "default"
        side = vision.image_size // vision.patch_size
        pixels = (captured or {}).get("pixel_values")
        encoded = ((captured or {}).get("mm_encoder_outputs") or {}).get("image")
        if pixels is not None:
            side = pixels.shape[-1] // vision.patch_size
        elif encoded is not None and len(encoded.pooler_output):
            side = math.isqrt(encoded.pooler_output[0].shape[0] - cls_kept)
        if not cls_kept:
            return side * side, side, side
        return side * side + 1, 1, side * side + 1  # "full" keeps the CLS token: one row of side*side + 1 tokens

    def visual_specs(self, model, captured: dict) -> list[VisualSpec]:
        """One grid per image; every image of a call has the same size (the call's pixels or encoder outputs say
        which; the config's when neither is there)."""
        config = model.config
        count, rows, cols = self.tokens_per_image(config, captured)
        specs = []
        for row in captured["input_ids"]:
            found = int((row == config.image_token_id).sum())
            if found % count:
                raise ModelInputError(f"{found} image tokens is not a multiple of {count} tokens per image")
            specs.append(VisualSpec(image_token_id=config.image_token_id,
                                    image_grids=tuple((1, rows, cols) for _ in range(found // count))))
        return specs

    def input_geometry(self, processor, options: dict | None = None) -> FixedGeometry | None:
        """CLIP's fixed square input (crop size, patch size); None where the CLS token is kept (``full``)."""
        image = processor.image_processor
        if getattr(processor, "vision_feature_select_strategy", "default") != "default":
            return None
        return FixedGeometry(image_size=image.crop_size["height"], patch_size=processor.patch_size)

    def prepare(self, processor, model, sample: Sample, options: dict | None = None, method=None) -> Inputs:
        if sample.video is not None:
            raise ModelInputError("LLaVA-1.5 takes images, not video; use a Qwen2.5-VL model for video datasets")
        visuals = self.visual_inputs(method, processor, options, load_images(sample.images))
        content = [{"type": "image"} for _ in visuals.images] + [{"type": "text", "text": sample.question}]
        messages = [{"role": "user", "content": content}]
        template = None if getattr(processor, "chat_template", None) else LLAVA15_TEMPLATE
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             chat_template=template)
        encoded = processor(images=visuals.images or None, text=text, return_tensors="pt", **visuals.processor_kwargs)
        inputs = Inputs(encoded)
        inputs.layout = self.layout_of(model, inputs)
        return self.finish(inputs, visuals)

    def tiny_config(self, layers: int = 6):
        from .zoo.tiny import tiny_llava_config

        return tiny_llava_config(layers=layers)

    def tiny_processor(self):
        from .zoo.tiny import tiny_llava_processor

        return tiny_llava_processor()


def llava15_config(size: str) -> LlavaConfig:
    """LLaVA-1.5-{7B,13B} (llava-hf), from the published config.json files."""
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


for _size in ("7b", "13b"):
    register_model(ModelSpec(f"llava15_{_size}", "llava", f"llava-hf/llava-1.5-{_size}-hf",
                             partial(llava15_config, _size), description=f"LLaVA-1.5-{_size.upper()}"))

