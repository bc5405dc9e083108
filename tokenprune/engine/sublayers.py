"""Run one decoder layer under a LayerPlan: visual rows skip the attention and/or the MLP.

Text rows always run the full layer. Skipped work is really skipped: an attention skip computes queries,
scores and the output projection for text rows only (keys and values are still computed for every row and
cached, so text rows attend to visual tokens); an MLP skip runs the MLP on text rows only.

    attention skip:  visual rows  u = attn_scale * h          text rows  u = h + Attn(LN1(h))
    MLP skip:        visual rows  y = mlp_scale * u           text rows  y = u + MLP(LN2(u))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .scores import apply_rope


def run_planned_layer(layer, plan, layouts, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                      past_key_values=None, position_ids=None, use_cache=False, **kwargs) -> torch.Tensor:
    """``hidden_states``: ``[B, L, d]`` → ``[B, L, d]``. All samples must share one layout of visual rows."""
    visual = layouts[0].is_visual
    if any(not torch.equal(layout.is_visual, visual) for layout in layouts[1:]):
        raise ValueError("layer skipping needs every sample of a batch to have its visual tokens at the same rows")
    visual_rows = visual.nonzero().flatten()
    text_rows = (~visual).nonzero().flatten()
    residual = hidden_states
    normed = layer.input_layernorm(hidden_states)

    if plan.skip_attn:
        text_update = text_query_attention(layer.self_attn, normed, text_rows, position_embeddings, past_key_values)
        after_attention = residual.clone()
        after_attention[:, text_rows] = residual[:, text_rows] + text_update
        if plan.attn_scale != 1.0:
            after_attention[:, visual_rows] = residual[:, visual_rows] * plan.attn_scale
    else:
        attention_output, _ = layer.self_attn(
            hidden_states=normed, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
        )
        after_attention = residual + attention_output

    if plan.skip_mlp:
        output = after_attention.clone()
        text_states = after_attention[:, text_rows]
        output[:, text_rows] = text_states + layer.mlp(layer.post_attention_layernorm(text_states))
        output[:, visual_rows] = after_attention[:, visual_rows] * plan.mlp_scale
        return output
    return after_attention + layer.mlp(layer.post_attention_layernorm(after_attention))


def text_query_attention(attention, normed: torch.Tensor, query_rows: torch.Tensor, position_embeddings,
                         past_key_values) -> torch.Tensor:
    """Self-attention output (after o_proj) for ``query_rows`` only; keys/values of every row are cached.

    ``normed``: ``[B, L, d]`` (after the input norm) → ``[B, n_q, d]``.
    """
    batch, length, _ = normed.shape
    head_dim = attention.head_dim
    cos, sin = position_embeddings
    queries = attention.q_proj(normed[:, query_rows]).view(batch, query_rows.numel(), -1, head_dim).transpose(1, 2)
    keys = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    values = attention.v_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    queries = apply_rope(queries, cos[:, query_rows], sin[:, query_rows])
    keys = apply_rope(keys, cos, sin)
    if past_key_values is not None:
        keys, values = past_key_values.update(keys, values, attention.layer_idx)
    groups = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)  # [B, H, L_kv, hd]
    values = values.repeat_interleave(groups, dim=1)
    offset = keys.shape[2] - length
    visible = torch.arange(keys.shape[2], device=normed.device)[None, :] <= (query_rows[:, None] + offset)  # [n_q, L_kv]
    output = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, scale=attention.scaling)
    output = output.transpose(1, 2).reshape(batch, query_rows.numel(), -1)
    return attention.o_proj(output)
