"""Tiny LLaVA and Qwen2.5-VL architectures, with tokenizers and processors built in code (no downloads).

The tokenizer is word-level over the vocabulary of the synthetic tasks plus each family's special tokens;
the processors are the stock ``LlavaProcessor`` / ``Qwen2_5_VLProcessor`` with the family's chat template,
so a tiny model takes exactly the path a real checkpoint takes.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
)

# Words of the synthetic image / video tasks and of the chat templates.
WORDS = """
a an the is are of in on at to and or what which how many colour color shape object objects image picture video
frame frames first last appeared appears moving move moves direction left right up down top bottom upper lower
centre center middle corner square circle triangle cross star diamond ring bar red green blue yellow purple
orange white black gray grey cyan pink brown zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6
7 8 9 10 yes no there answer question with word single phrase using options option letter choose from A B C D E
user assistant system you You helpful are . , ? : ; ! ( ) - ' " before after same different than more fewer most
largest smallest big small position where row column stays still static
""".split()

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:"]
QWEN_SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>"]

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% endif %}{% endfor %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}"
    "</s> {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|> system You are "
    "a helpful assistant . <|im_end|> {% endif %}<|im_start|> {{ message['role'] }} {% if message['content'] is "
    "string %}{{ message['content'] }} {% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|> <|image_pad|> <|vision_end|> {% elif item['type'] == 'video' %}<|vision_start|> <|video_pad|> "
    "<|vision_end|> {% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}{% endif %}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_tokenizer(specials: list[str], **special_tokens) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: whitespace and punctuation split, unknown words map to <unk>."""
    vocab = {token: index for index, token in enumerate(specials + [w for w in dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                   additional_special_tokens=specials[1:], **special_tokens)


def llava_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(LLAVA_SPECIALS, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")


# ---------------------------------------------------------------------------------------------------------
# LLaVA
# ---------------------------------------------------------------------------------------------------------
def tiny_llava_config(image_size: int = 84, patch_size: int = 14, layers: int = 6, hidden: int = 64,
                      heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vision_hidden: int = 32,
                      vision_layers: int = 2, vision_heads: int = 2, rope_theta: float = 10000.0) -> LlavaConfig:
    tokenizer_vocab = len(llava_tokenizer())
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=tokenizer_vocab,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_SPECIALS.index("<image>"),
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def tiny_llava_processor(image_size: int = 84, patch_size: int = 14) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=llava_tokenizer(), patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_TEMPLATE)


# ---------------------------------------------------------------------------------------------------------
# Qwen2.5-VL
# ---------------------------------------------------------------------------------------------------------
def tiny_qwen_text(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, rope_theta: float,
                   section: list[int] | None = None, **extra) -> dict:
    """The text config of a tiny Qwen-VL decoder with the test tokenizer (mRoPE sections cover head_dim / 2
    frequencies: by default 1/8 on t, the rest split between h and w)."""
    head_dim = extra.get("head_dim") or hidden // heads
    if section is None:
        section = [head_dim // 8, (head_dim // 2 - head_dim // 8) // 2]
        section.append(head_dim // 2 - sum(section))
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=len(qwen_tokenizer()), max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=QWEN_SPECIALS.index("<|im_end|>"),
                pad_token_id=QWEN_SPECIALS.index("<|endoftext|>"), tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": section}, **extra)


def tiny_qwen_ids() -> dict:
    """The special-token ids of the test tokenizer, as Qwen-VL config fields."""
    return dict(image_token_id=QWEN_SPECIALS.index("<|image_pad|>"), video_token_id=QWEN_SPECIALS.index("<|video_pad|>"),
                vision_start_token_id=QWEN_SPECIALS.index("<|vision_start|>"),
                vision_end_token_id=QWEN_SPECIALS.index("<|vision_end|>"), bos_token_id=None,
                eos_token_id=QWEN_SPECIALS.index("<|im_end|>"), pad_token_id=QWEN_SPECIALS.index("<|endoftext|>"),
                tie_word_embeddings=False)


def tiny_qwen_processor(processor_class, video_processor_class=None, min_pixels: int = 56 * 56,
                        max_pixels: int = 168 * 168, patch_size: int = 14, chat_template: str = QWEN_TEMPLATE):
    """A stock Qwen-VL processor (``processor_class``) with the test tokenizer and chat template: images and
    video frames between ``min_pixels`` and ``max_pixels``, a 2 x 2 merge."""
    from transformers import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                            merge_size=2, temporal_patch_size=2)
    video_processor = (video_processor_class or Qwen2VLVideoProcessor)(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch_size, merge_size=2,
        temporal_patch_size=2, cap_pixels_per_frame=True)
    return processor_class(image_processor=image_processor, tokenizer=qwen_tokenizer(), video_processor=video_processor,
                           chat_template=chat_template)


def tiny_qwen25vl_config(layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                         intermediate: int = 128, vision_hidden: int = 32, vision_depth: int = 2,
                         window_size: int = 56, patch_size: int = 14, vision_heads: int = 2,
                         rope_theta: float = 10000.0) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=tiny_qwen_text(layers, hidden, heads, kv_heads, intermediate, rope_theta),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=vision_heads, out_hidden_size=hidden, patch_size=patch_size, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=window_size, fullatt_block_indexes=[vision_depth - 1],
                           tokens_per_second=2),
        **tiny_qwen_ids(),
    )


def tiny_qwen25vl_processor(min_pixels: int = 56 * 56, max_pixels: int = 168 * 168,
                            patch_size: int = 14) -> Qwen2_5_VLProcessor:
    return tiny_qwen_processor(Qwen2_5_VLProcessor, min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size)


# ---------------------------------------------------------------------------------------------------------
# The trained tiny models (architecture of the packaged checkpoints; weights=random builds it untrained)
# ---------------------------------------------------------------------------------------------------------
TRAINED_LLAVA = dict(image_size=168, patch_size=14, layers=6, hidden=128, heads=4, kv_heads=2, intermediate=384,
                     vision_hidden=96, vision_layers=4, vision_heads=4,
                     rope_theta=1e6)  # 12 x 12 = 144 visual tokens
TRAINED_QWEN = dict(layers=6, hidden=128, heads=4, kv_heads=2, intermediate=384, vision_hidden=96, vision_depth=4,
                    vision_heads=4, patch_size=7, window_size=56, rope_theta=1e6)  # 168 px -> 24 x 24 patches -> 12 x 12 = 144


def trained_llava_config() -> LlavaConfig:
    return tiny_llava_config(**TRAINED_LLAVA)


def trained_llava_processor() -> LlavaProcessor:
    return tiny_llava_processor(image_size=TRAINED_LLAVA["image_size"], patch_size=TRAINED_LLAVA["patch_size"])


def trained_qwen25vl_config() -> Qwen2_5_VLConfig:
    return tiny_qwen25vl_config(**TRAINED_QWEN)


def trained_qwen25vl_processor() -> Qwen2_5_VLProcessor:
    # images: exactly 168 x 168; video frames: up to 112 x 112 (8 x 8 tokens per two frames)
    return tiny_qwen25vl_processor(min_pixels=112 * 112, max_pixels=168 * 168, patch_size=TRAINED_QWEN["patch_size"])
