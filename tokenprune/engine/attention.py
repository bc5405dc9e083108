"""The attention math the engine recomputes — for lazy scores (``scores.py``) and partial layers (``sublayers.py``).

A model family hands the engine one ``AttentionMath`` per decoder layer (``FamilySpec.attention_math``). The
default is a Llama-style layer: ``q_proj`` / ``k_proj`` / ``v_proj`` viewed as heads x ``head_dim``, rotary
embedding over the full head width (rotate-half), ``o_proj``. ``QKNormAttentionMath`` adds the per-head RMSNorm
on queries and keys before RoPE (``q_norm`` / ``k_norm``), as some decoders have.

Shapes: ``x`` ``[B, n, d]`` (rows after the layer's input norm) → queries ``[B, H, n, hd]``, keys and values
``[B, KVH, n, hd]``, all before RoPE; ``rope(states, cos, sin)`` with tables ``[B, n, hd]``.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[B, heads, n, head_dim]``; ``cos``/``sin``: ``[B, n, head_dim]`` (the decoder's own tables)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class AttentionMath:
    """One decoder layer's attention, recomputed exactly as its stock forward computes it (Llama-style)."""

    def __init__(self, layer):
        self.layer = layer
        self.attention = layer.self_attn
        config = self.attention.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(self.attention, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = float(self.attention.scaling)
        self.layer_index = self.attention.layer_idx

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's input norm (``[B, n, d]``)."""
        return self.layer.input_layernorm(hidden)

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        """``[B, n, heads * hd]`` → ``[B, n, heads, hd]``."""
        return projected.view(*projected.shape[:2], -1, self.head_dim)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.attention.q_proj(x)).transpose(1, 2)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.attention.k_proj(x)).transpose(1, 2)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.attention.v_proj(x)).transpose(1, 2)

    def rope(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(states, cos, sin)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """``[B, n, H * hd]`` (heads concatenated) → ``[B, n, d]``."""
        return self.attention.o_proj(attended)


class QKNormAttentionMath(AttentionMath):
    """Per-head RMSNorm on queries and keys (``q_norm`` / ``k_norm``) before RoPE."""

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention.q_norm(self._heads(self.attention.q_proj(x))).transpose(1, 2)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention.k_norm(self._heads(self.attention.k_proj(x))).transpose(1, 2)
