"""A hand-written reference of the seed's modified Qwen2.5-VL decoder (method card §2.1, "Layer"), for the tests of
layer skip ``semantics: seed`` and of the seed's search.

It runs the stock modules of a Qwen2.5-VL by hand: embeddings and 3-D positions as the stock outer model hands them to
its text model, then per layer the stock norms, attention (with a plain DynamicCache of its own) and MLP. Nothing of
tokenprune is used.
"""

import torch
from transformers.cache_utils import DynamicCache

DECODE_STEPS = 4


def text_model_inputs(vlm, inputs):
    """What the stock outer model hands its text model: ``inputs_embeds [1, L, d]``, ``position_ids [3, 1, L]``."""
    text = vlm.model.model.language_model
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"], seen["positions"] = kwargs["inputs_embeds"], kwargs["position_ids"]

    handle = text.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            vlm.model(**inputs, use_cache=False)
    finally:
        handle.remove()
    embeds, positions = seen["embeds"], seen["positions"]
    if positions is None:  # a text-only prompt: the text model counts 0..L-1 on all three axes
        return embeds, torch.arange(embeds.shape[1])[None, None].expand(3, 1, -1)
    return embeds, positions[-3:] if positions.shape[0] == 4 else positions


class SeedDecoder:
    """The seed's Qwen2.5-VL decoder (card §2.1): ``policy`` = dict(mlp, attn, scalars with string keys)."""

    def __init__(self, vlm, mlp=(), attn=(), scalars=None):
        self.model = vlm.model
        self.text = vlm.model.model.language_model
        self.mlp, self.attn = set(mlp), set(attn)
        self.scalars = {str(layer): value for layer, value in (scalars or {}).items()}  # looked up as strings
        self.cache = DynamicCache()  # grows one entry per layer that runs its attention
        self.next_position = None
        self.hidden_states = []  # the prefill's hidden_states: the input of each layer, then the final norm's output

    def _layers(self, h, positions, text_rows):
        """``h [1, n, d]``; ``text_rows`` ``[1, n, 1]`` (prefill: 1 on non-image rows) or None (decode)."""
        cos_sin = self.text.rotary_emb(h, positions)
        states = []
        for index, layer in enumerate(self.text.layers):
            states.append(h)
            if index not in self.attn:  # a skipped attention: no norm, no projections, no cache entry
                attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=None,
                                               position_embeddings=cos_sin, cache=self.cache)
                h = h + attention
            u = h
            if index in self.mlp and text_rows is not None:  # prefill: every row scaled, MLP on text rows only
                h = u * self.scalars.get(str(index), 1.0) + layer.mlp(layer.post_attention_layernorm(u)) * text_rows
            else:  # no skip, or decoding: the full MLP, no scalar
                h = u + layer.mlp(layer.post_attention_layernorm(u))
        h = self.text.norm(h)
        if text_rows is not None:
            self.hidden_states = states + [h]
        return self.model.lm_head(h)[0]

    def prefill(self, vlm, inputs) -> torch.Tensor:
        """Logits ``[L, V]`` of the prompt. The seed's mask: image pads (and vision pads) are visual, all else text."""
        embeds, positions = text_model_inputs(vlm, inputs)
        config = self.model.config
        ids = inputs["input_ids"]
        text_rows = ((ids != config.image_token_id) & (ids != vision_pad_id(vlm)))[..., None].to(embeds.dtype)
        self.next_position = int(positions.max()) + 1  # the stock rule: cache length + rope_deltas
        with torch.no_grad():
            return self._layers(embeds, positions, text_rows)

    def step(self, token: int) -> torch.Tensor:
        """Logits ``[V]`` of one decoding step."""
        h = self.text.embed_tokens(torch.tensor([[token]]))
        positions = torch.full((3, 1, 1), self.next_position)
        self.next_position += 1
        with torch.no_grad():
            return self._layers(h, positions, None)[-1]


def vision_pad_id(vlm) -> int:
    return vlm.processor.tokenizer.convert_tokens_to_ids("<|vision_pad|>")


def reference_run(vlm, inputs, policy, steps=DECODE_STEPS):
    """Prefill logits ``[L, V]``, the greedy tokens and the logits ``[steps, V]`` of the cached decoding steps."""
    decoder = SeedDecoder(vlm, **policy)
    prefill = decoder.prefill(vlm, inputs)
    tokens, logits = [int(prefill[-1].argmax())], []
    for _ in range(steps):
        logits.append(decoder.step(tokens[-1]))
        tokens.append(int(logits[-1].argmax()))
    return prefill, tokens, torch.stack(logits)
