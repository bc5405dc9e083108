"""LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP vision tower + projector + Llama decoder)."""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration

from ..data.sample import Sample
from ..engine.layout import TokenLayout, VisualSpec
from .base import Inputs, ModelAdapter, ModelInputError, register_adapter
from .images import load_images

# The llava-hf template, used when a checkpoint's processor carries none.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_class = LlavaForConditionalGeneration
    rope = "1d"
    visual_input_keys = ()

    def vision_model(self, model):
        return model.model.vision_tower

    @staticmethod
    def tokens_per_image(config) -> tuple[int, int, int]:
        """(count, rows, cols) of LLM tokens per image from the vision config (one grid, no tiling)."""
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        count = side * side + (0 if config.vision_feature_select_strategy == "default" else 1)
        if count == side * side:
            return count, side, side
        return count, 1, count  # "full" keeps the CLS token: one row of side*side + 1 tokens

    def visual_specs(self, model, captured: dict | None) -> list[VisualSpec]:
        config = model.config
        count, rows, cols = self.tokens_per_image(config)
        specs = []
        for row in captured["input_ids"]:
            found = int((row == config.image_token_id).sum())
            if found % count:
                raise ModelInputError(f"{found} image tokens is not a multiple of {count} tokens per image")
            specs.append(VisualSpec(image_token_id=config.image_token_id,
                                    image_grids=tuple((1, rows, cols) for _ in range(found // count))))
        return specs

    def prepare(self, processor, model, sample: Sample, options: dict | None = None) -> Inputs:
        if sample.video is not None:
            raise ModelInputError("LLaVA-1.5 takes images, not video; use a Qwen2.5-VL model for video datasets")
        images = load_images(sample.images)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": sample.question}]
        messages = [{"role": "user", "content": content}]
        template = None if getattr(processor, "chat_template", None) else LLAVA15_TEMPLATE
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             chat_template=template)
        encoded = processor(images=images or None, text=text, return_tensors="pt")
        inputs = Inputs(encoded)
        spec = self.visual_specs(model, {"input_ids": inputs["input_ids"]})[0]
        inputs.layout = TokenLayout.from_input_ids(inputs["input_ids"][0], spec)
        return inputs

