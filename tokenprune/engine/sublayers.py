"""Run one decoder layer under a LayerPlan: the skipping rows (visual rows) skip the attention and/or the MLP.

Text rows always run the full layer. Skipped work is really skipped: an attention skip computes queries,
scores and the output projection for text rows only (keys and values are still computed for every row and
cached, so text rows attend to visual tokens); an MLP skip runs the norm and the MLP on text rows only.

    attention skip:  visual rows  u = attn_scale * h          text rows  u = h + Attn(LN1(h))
    MLP skip:        visual rows  y = mlp_scale * u           text rows  y = u + MLP(LN2(u))

The seed's decoder (``LayerPlan.attn_all_rows`` / ``mlp_scales_text``, layer skip ``semantics: seed``):

    attention skip:  every row    u = h   (no norm, projections or KV-cache entry; also while decoding)
    MLP skip:        image rows   y = s * u                   other rows  y = s * u + MLP(LN2(u))   (prefill)

A layer whose attention every row skips keeps a ``SkippedAttentionLayer`` in the KV cache (``cache.py``): no keys
or values, only the count of rows that passed, so that every reader of the cache length (the stock
``get_seq_length()`` reads layer 0) still gets the sequence length.

Batches: the rows that are text in at least one sample are computed (the others are skipped); a row that is
visual in some samples and text in others is computed and then replaced by the scaled residual where it is
visual, so every sample gets its own exact result (left-padded batches included: padding rows count as text).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionMath
from .cache import count_skipped_attention
from .compat import cache_argument, set_cache_argument
from .contract import LayerPlan, TokenLayout
from .flops import planned_layer_flops, planned_prefill_flops  # noqa: F401  (their former home)


@dataclass
class PlanRows:
    """Which rows a planned layer computes. ``compute``: ``[C]`` ascending rows that are text in some sample;
    ``visual_in_compute``: ``[B, C]`` bool, rows of ``compute`` that are visual in that sample (None when all
    samples have the same visual rows, the usual case)."""

    compute: torch.Tensor
    visual_in_compute: torch.Tensor | None

    @classmethod
    def of(cls, layouts: list[TokenLayout], plan: LayerPlan) -> "PlanRows":
        """The rows of ``layouts`` (one per sample) that ``plan`` computes (those not of its ``skip_kinds``)."""
        skipping = [plan.skipping(layout) for layout in layouts]  # [L] each
        if all(torch.equal(rows, skipping[0]) for rows in skipping[1:]):
            return cls((~skipping[0]).nonzero().flatten(), None)
        visual = torch.stack(skipping)  # [B, L]
        compute = (~visual).any(0).nonzero().flatten()
        return cls(compute, visual[:, compute])

    def combine(self, skipped: torch.Tensor, computed: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale * skipped`` on skipped rows, ``computed`` on the computed ones.

        ``skipped``: ``[B, L, d]``; ``computed``: ``[B, C, d]`` → ``[B, L, d]``.
        """
        output = skipped * scale if scale != 1.0 else skipped.clone()
        if self.visual_in_compute is not None:
            computed = torch.where(self.visual_in_compute[..., None], output[:, self.compute], computed)
        return output.index_copy_(1, self.compute, computed)


def run_planned_layer(math: AttentionMath, plan, layouts, hidden_states: torch.Tensor, attention_mask=None,
                      position_embeddings=None, past_key_values=None, position_ids=None, use_cache=False,
                      **kwargs) -> torch.Tensor:
    """``hidden_states``: ``[B, L, d]`` → ``[B, L, d]``: the decoder layer of ``math`` under ``plan`` (a pre-norm
    layer: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``)."""
    layer = math.layer
    if plan.skip_attn and kwargs.get("output_attentions"):
        raise ValueError(f"output_attentions=True cannot be combined with an attention skip (layer "
                         f"{math.layer_index}): visual rows have no attention map there")
    past_key_values = cache_argument({"past_key_values": past_key_values, "cache": kwargs.pop("cache", None)})
    rows = PlanRows.of(layouts, plan)
    residual = hidden_states

    if plan.skip_attn and plan.attn_all_rows:  # the seed: no attention for any row, no KV entry
        count_skipped_attention(past_key_values, math.layer_index, hidden_states.shape[1])
        after_attention = residual
    elif plan.skip_attn:
        normed = layer.input_layernorm(hidden_states)
        attention_rows = text_query_attention(math, normed, rows.compute, position_embeddings,
                                              past_key_values, attention_mask)  # [B, C, d]
        after_attention = rows.combine(residual, residual[:, rows.compute] + attention_rows, plan.attn_scale)
    else:
        normed = layer.input_layernorm(hidden_states)
        set_cache_argument(kwargs, type(layer.self_attn).forward, past_key_values)
        attention_output, _ = layer.self_attn(
            hidden_states=normed, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
        )
        after_attention = residual + attention_output

    if plan.skip_mlp:
        computed = after_attention[:, rows.compute]  # [B, C, d]
        if plan.mlp_scales_text:  # the seed: s * u + MLP(LN2(u)) on the computed rows
            computed = computed * plan.mlp_scale + layer.mlp(layer.post_attention_layernorm(computed))
        else:
            computed = computed + layer.mlp(layer.post_attention_layernorm(computed))
        return rows.combine(after_attention, computed, plan.mlp_scale)
    return after_attention + layer.mlp(layer.post_attention_layernorm(after_attention))


def run_layer_without_attention(layer, index: int, hidden_states: torch.Tensor, past_key_values=None, **kwargs
                                ) -> torch.Tensor:
    """A decoding step of a layer whose attention every row skips (the seed's decoder): ``h + MLP(LN2(h))``;
    the new rows are counted in the layer's ``SkippedAttentionLayer`` (``[B, n, d]`` → ``[B, n, d]``)."""
    if kwargs.get("output_attentions"):
        raise ValueError(f"output_attentions=True cannot be combined with an attention skip (layer {index})")
    cache = cache_argument({"past_key_values": past_key_values, "cache": kwargs.get("cache")})
    count_skipped_attention(cache, index, hidden_states.shape[1])
    return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))


def text_query_attention(math: AttentionMath, normed: torch.Tensor, query_rows: torch.Tensor, position_embeddings,
                         past_key_values, attention_mask=None) -> torch.Tensor:
    """Self-attention output (after o_proj) for ``query_rows`` only; keys/values of every row are computed and cached.

    ``normed``: ``[B, L, d]`` (after the input norm) → ``[B, n_q, d]``. ``attention_mask``: what the stock loop
    gives the layer (None: causal; 4-D ``[B, 1, L, L_kv]`` bool or additive; 2-D ``[B, L_kv]`` key padding).
    """
    batch, length, _ = normed.shape
    n_q = query_rows.numel()
    cos, sin = position_embeddings  # [B or 1, L, hd]
    queries = math.rope(math.queries(normed[:, query_rows]), cos[:, query_rows], sin[:, query_rows])  # [B, H, n_q, hd]
    keys = math.rope(math.keys(normed), cos, sin)  # [B, KVH, L, hd]
    values = math.values(normed)
    if past_key_values is not None:
        keys, values = past_key_values.update(keys, values, math.layer_index)
    kv_length = keys.shape[2]
    groups = queries.shape[1] // keys.shape[1]
    keys = _repeat_kv(keys, groups)  # [B, H, L_kv, hd]
    values = _repeat_kv(values, groups)
    mask = _query_mask(attention_mask, query_rows, kv_length - length, kv_length, normed.device)
    output = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=math.scaling)
    output = output.transpose(1, 2).reshape(batch, n_q, -1)  # [B, n_q, H * hd]
    return math.output(output)


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, KVH, L, hd]`` → ``[B, KVH * groups, L, hd]`` (each key/value head shared by ``groups`` query heads)."""
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def _query_mask(attention_mask, query_rows: torch.Tensor, offset: int, kv_length: int, device) -> torch.Tensor:
    """The mask rows of ``query_rows``: ``[n_q, L_kv]`` or ``[B, 1, n_q, L_kv]`` (bool: True = attend, or additive)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask[:, :, query_rows, -kv_length:]
    causal = torch.arange(kv_length, device=device)[None, :] <= (query_rows[:, None] + offset)  # [n_q, L_kv]
    if attention_mask is None:
        return causal
    if attention_mask.dim() == 2:  # flash-attention style key padding mask, 1 = real token
        return causal[None, None] & attention_mask[:, None, None, -kv_length:].bool()
    raise ValueError(f"layer skip: unsupported attention_mask of shape {tuple(attention_mask.shape)}")
