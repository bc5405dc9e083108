"""Analytic prefill FLOPs of the text decoder from its config and the per-layer token counts.

Two families of conventions, both reported so that paper tables can be reproduced:

* ``tokenprune``: every decoder token; q/k/v/o projections with GQA, causal attention scores and values
  (query i sees i + 1 keys), gated MLP (three matrices; MoE: the top-k experts' plus the router); a multiply-add
  counts 2 FLOPs; decoder layers only (no embedding, final norm or LM head).
* paper conventions, per layer ``4 n d^2 + 2 n^2 d + c n d m`` (MHA projections, full n x n attention):
  ``fastv`` (c = 2, n = all prompt tokens, FastV paper Sec. 4.2), ``pdrop`` (c = 3, n = image tokens
  only, PyramidDrop paper Sec. 4.1) and ``himap`` (c = 2, n = image tokens only, HiMAP's reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .contract import LayerPlan, TokenLayout

PAPER_CONVENTIONS = {
    # name: (FFN matrices c, counts image tokens only)
    "fastv": (2, False),
    "pdrop": (3, True),
    "himap": (2, True),
}


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    router: int = 0  # MoE: experts scored per token (intermediate = top-k x expert width)

    @classmethod
    def from_config(cls, text_config) -> "DecoderShape":
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            hidden=text_config.hidden_size,
            intermediate=text_config.intermediate_size,
            heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            layers=text_config.num_hidden_layers,
        )


def causal_key_sum(n: int) -> int:
    """Σ keys over the n queries of a causal prefill: n (n + 1) / 2."""
    return n * (n + 1) // 2


def layer_flops(shape: DecoderShape, tokens: int, attention_query_rows: int | None = None,
                attention_key_sum: int | None = None, mlp_rows: int | None = None,
                kv_rows: int | None = None) -> float:
    """tokenprune FLOPs of one prefill layer with ``tokens`` rows.

    Layer skip: only ``attention_query_rows`` rows (with ``attention_key_sum`` keys in total) are attention
    queries, only ``mlp_rows`` rows run the MLP; keys and values are projected for ``kv_rows`` rows (default:
    every row; 0 where the attention is skipped for every row).
    """
    q_width = shape.heads * shape.head_dim
    kv_width = shape.kv_heads * shape.head_dim
    query_rows = tokens if attention_query_rows is None else attention_query_rows
    key_sum = causal_key_sum(tokens) if attention_key_sum is None else attention_key_sum
    mlp_rows = tokens if mlp_rows is None else mlp_rows
    kv_projection = 2 * (tokens if kv_rows is None else kv_rows) * shape.hidden * 2 * kv_width
    q_o_projection = 2 * query_rows * shape.hidden * 2 * q_width
    attention = 4 * q_width * key_sum  # scores + weighted values
    mlp = 2 * mlp_rows * shape.hidden * (shape.intermediate * 3 + shape.router)
    return float(kv_projection + q_o_projection + attention + mlp)


def prefill_flops(shape: DecoderShape, layer_tokens: Sequence[int]) -> float:
    """tokenprune FLOPs of a prefill whose layer l sees ``layer_tokens[l]`` tokens."""
    if len(layer_tokens) != shape.layers:
        raise ValueError(f"need one token count per decoder layer ({shape.layers}), got {len(layer_tokens)}")
    return sum(layer_flops(shape, n) for n in layer_tokens)


def planned_layer_flops(shape: DecoderShape, layout: "TokenLayout", plan: "LayerPlan | None" = None) -> float:
    """tokenprune FLOPs of one prefill layer over ``layout`` under ``plan`` (None: the full layer).

    An attention skip removes the skipping (visual) rows' q/o projections and their causal scores (row i sees
    i + 1 keys); keys and values stay. An attention skip for every row (``attn_all_rows``) removes the whole
    attention. An MLP skip removes the skipping rows' MLP.
    """
    tokens = layout.length
    if plan is None or plan.is_identity:
        return layer_flops(shape, tokens)
    computed = (~plan.skipping(layout)).nonzero().flatten()  # rows that are not skipping
    if plan.skip_attn and plan.attn_all_rows:
        query_rows, key_sum, kv_rows = 0, 0, 0
    elif plan.skip_attn:
        query_rows, key_sum, kv_rows = computed.numel(), int((computed + 1).sum()), tokens
    else:
        query_rows, key_sum, kv_rows = tokens, causal_key_sum(tokens), tokens
    mlp_rows = computed.numel() if plan.skip_mlp else tokens
    return layer_flops(shape, tokens, attention_query_rows=query_rows, attention_key_sum=key_sum, mlp_rows=mlp_rows,
                       kv_rows=kv_rows)


def planned_prefill_flops(shape: DecoderShape, layout: "TokenLayout", plans: Mapping[int, object]) -> float:
    """tokenprune prefill FLOPs of a decoder whose layer l runs under ``plans.get(l)`` (no token pruning)."""
    return sum(planned_layer_flops(shape, layout, plans.get(layer)) for layer in range(shape.layers))


def report_flops(shape: DecoderShape, layer_tokens: Sequence[int], planned: Mapping[int, tuple] | None = None) -> float:
    """tokenprune prefill FLOPs from a prefill report's per-layer token counts and the layer plans that ran
    (``planned``: ``{layer: (layout entering it, LayerPlan)}``)."""
    if len(layer_tokens) != shape.layers:
        raise ValueError(f"need one token count per decoder layer ({shape.layers}), got {len(layer_tokens)}")
    planned = planned or {}
    return sum(planned_layer_flops(shape, *planned[layer]) if layer in planned else layer_flops(shape, n)
               for layer, n in enumerate(layer_tokens))


def paper_layer_flops(n: float, hidden: int, intermediate: int, ffn_matrices: int) -> float:
    """``4 n d^2 + 2 n^2 d + c n d m``."""
    return 4 * n * hidden**2 + 2 * n**2 * hidden + ffn_matrices * n * hidden * intermediate


def paper_flops(shape: DecoderShape, convention: str, layer_tokens: Sequence[int], layer_visual: Sequence[int]) -> float:
    """A paper's FLOPs convention summed over layers (``fastv``, ``pdrop`` or ``himap``)."""
    if convention not in PAPER_CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; choose from {sorted(PAPER_CONVENTIONS)}")
    ffn_matrices, image_only = PAPER_CONVENTIONS[convention]
    counts = layer_visual if image_only else layer_tokens
    return sum(paper_layer_flops(n, shape.hidden, shape.intermediate, ffn_matrices) for n in counts)


def all_conventions(shape: DecoderShape, layer_tokens: Sequence[int], layer_visual: Sequence[int]) -> dict[str, float]:
    """Every convention at once, as recorded per sample by the runner."""
    result = {"tokenprune": prefill_flops(shape, layer_tokens)}
    for convention in PAPER_CONVENTIONS:
        result[convention] = paper_flops(shape, convention, layer_tokens, layer_visual)
    return result
