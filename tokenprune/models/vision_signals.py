"""Vision-encoder signals for pre-LLM methods (VisionZip, VisPruner, CDPruner): the shared math behind each model
family's ``SignalSource`` (``engine/vision.py``; the sources live in the family files).

Per visual group: how much attention each LLM-level visual token gets inside the vision encoder, and the encoder's
keys for grouping, recomputed lazily from one encoder layer's own norm and projections, with a float32 softmax,
chunked over query rows (never an ``H x T x T`` map, never eager attention: the encoder keeps its SDPA / flash
kernels):

* **LLaVA** (CLIP, with CLS; ``models/llava.py``): the layer producing the feature layer
  (``vision_feature_layer=-2``: layer 22 of 24). ``scores``: the CLS row's softmax over all ``N + 1`` keys, head
  mean, patch columns ``[N]``. ``keys``: the layer's ``k_proj(layer_norm1(x))`` averaged over heads
  ``[N, head_dim]`` (CLS key in ``cls_key``). ``features``: the layer's output patches ``[N, D]``
  (``hidden_states[-2][1:]``, pre-projector), the CLS feature in ``cls_feature``; ``project`` is the multimodal
  projector, ``post_norm`` the tower's ``post_layernorm``.
* **Qwen2-VL / Qwen2.5-VL / Qwen3-VL** (ViT without CLS, 2x2 patch merger; ``models/qwen2vl.py``,
  ``models/qwen25vl.py``, Qwen3-VL inheriting Qwen2-VL's source): the
  last block (full attention on Qwen2.5-VL's windowed ViT). ``scores``: the softmax with the vision RoPE, head mean,
  summed over all query rows of the block's attention segment (one temporal step), averaged over each 2x2 merge
  unit, window order undone (Qwen2.5-VL) ``[M]``. ``keys``: the block's RoPE'd keys averaged over heads and merge
  unit ``[M, head_dim]``. No features: methods use the post-merger LLM embeddings.

Groups: one per image (LLaVA), one per temporal step of each image / video grid (Qwen), in the order the vision
encoder saw them (its calls in order, then the batch / grid order of each call), token order as the LLM reads
them.
"""

from __future__ import annotations

import torch

from ..engine.contract import GroupSignals, GroupSource
from ..engine.scores import SCORE_CHUNK_BYTES, attention_probabilities, rotate_half
from ..engine.vision import SignalSource


# ---------------------------------------------------------------------------------------------------------
# LLaVA (CLIP vision tower)
# ---------------------------------------------------------------------------------------------------------
def clip_signal_layer(config) -> int:
    """Index of the CLIP encoder layer whose output is the LLaVA feature layer (``hidden_states[f]`` is the output
    of layer ``f - 1``; ``-2`` of 24 layers is layer 22)."""
    feature_layer = config.vision_feature_layer
    layers = config.vision_config.num_hidden_layers
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"vision signals need one vision_feature_layer, got {feature_layer!r}")
    index = layers + feature_layer if feature_layer < 0 else feature_layer - 1
    if not 0 <= index < layers:
        raise ValueError(f"vision_feature_layer={feature_layer} is not the output of an encoder layer "
                         f"(the tower has {layers} layers)")
    return index


def clip_heads(attention, x: torch.Tensor, projection) -> torch.Tensor:
    """``projection(x)`` split into heads: ``x`` ``[B, T, D]`` → ``[B, H, T, head_dim]``."""
    batch, length, _ = x.shape
    return projection(x).view(batch, length, attention.num_heads, attention.head_dim).transpose(1, 2)


def clip_cls_attention(layer, hidden: torch.Tensor, chunk_bytes: int = SCORE_CHUNK_BYTES) -> torch.Tensor:
    """CLS row of ``layer``'s attention, head mean, patch columns: ``hidden`` ``[B, N + 1, D]`` (the layer input)
    → ``[B, N]`` float32."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)  # [B, N + 1, D]
    queries = clip_heads(attention, normed[:, :1], attention.q_proj)  # [B, H, 1, hd]
    keys = clip_heads(attention, normed, attention.k_proj)  # [B, H, N + 1, hd]
    columns = torch.arange(1, hidden.shape[1], device=hidden.device)
    probs = attention_probabilities(queries, keys, torch.zeros(1, dtype=torch.long, device=hidden.device), columns,
                                    attention.scale, causal=False, heads="mean", chunk_bytes=chunk_bytes)
    return probs[:, 0]  # [B, N]


def clip_mean_keys(layer, hidden: torch.Tensor) -> torch.Tensor:
    """``k_proj(layer_norm1(hidden))`` averaged over heads: ``[B, N + 1, D]`` → ``[B, N + 1, head_dim]`` float32."""
    attention = layer.self_attn
    return clip_heads(attention, layer.layer_norm1(hidden), attention.k_proj).float().mean(dim=1)


def clip_groups(layer, captures: list[dict], chunk_bytes: int) -> list[GroupSignals]:
    """One group per image of every capture ``{"hidden": [B, N + 1, D] layer input, "output": [B, N + 1, D]}``."""
    groups = []
    for call, capture in enumerate(captures):
        hidden, output = capture["hidden"], capture["output"]  # [B, N + 1, D] each
        scores = clip_cls_attention(layer, hidden, chunk_bytes)  # [B, N]
        keys = clip_mean_keys(layer, hidden)  # [B, N + 1, hd]
        for item in range(hidden.shape[0]):
            groups.append(GroupSignals(GroupSource(call, item, 0), scores[item], keys[item, 1:],
                                       output[item, 1:], output[item, 0], keys[item, 0]))
    return groups


# ---------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL (ViT without CLS, 2x2 patch merger)
# ---------------------------------------------------------------------------------------------------------
def vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The ViT's rotary embedding in float32: ``x`` ``[T, H, hd]``, ``cos`` / ``sin`` ``[T, hd]`` (one temporary)."""
    cos, sin = cos.float()[:, None], sin.float()[:, None]
    x = x.float()
    return (rotate_half(x) * sin).addcmul_(x, cos)


def qwen_block_qk(block, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE'd queries and keys of a ViT block from its own norm and the query / key rows of its qkv projection (the
    values are never computed): ``hidden`` ``[T, D]`` (window order) → two ``[T, H, hd]`` float32."""
    attention = block.attn
    length = hidden.shape[0]
    normed = block.norm1(hidden)  # [T, D]
    weight, bias = attention.qkv.weight, attention.qkv.bias  # [3D, D], [3D]: q, k, v rows
    dim = weight.shape[0] // 3
    cos, sin = position_embeddings
    projected = []
    for part in (0, 1):
        rows = slice(part * dim, (part + 1) * dim)
        x = torch.nn.functional.linear(normed, weight[rows], None if bias is None else bias[rows])
        projected.append(vision_rope(x.view(length, attention.num_heads, -1), cos, sin))
    return projected[0], projected[1]


def qwen_received_attention(block, hidden: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings,
                            chunk_bytes: int = SCORE_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention each patch receives in ``block`` (head mean, summed over the query rows of its own attention
    segment, ``cu_seqlens``) and its head-mean RoPE'd key: ``hidden`` ``[T, D]`` → ``[T]``, ``[T, hd]`` float32,
    window order. One segment at a time: queries and keys exist for one segment only."""
    cos, sin = position_embeddings
    bounds = cu_seqlens.tolist()
    received, mean_keys = [], []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        queries, keys = qwen_block_qk(block, hidden[start:stop], (cos[start:stop], sin[start:stop]))  # [n, H, hd]
        length, heads = keys.shape[:2]
        queries, keys = queries.transpose(0, 1)[None], keys.transpose(0, 1)[None]  # [1, H, n, hd]
        total = torch.zeros(length, device=hidden.device)
        step = max(1, chunk_bytes // (4 * heads * length * 2))  # query rows whose scores and softmax fit the budget
        for first in range(0, length, step):  # a running sum: one [n] partial at a time
            rows = torch.arange(first, min(length, first + step), device=hidden.device)
            total += attention_probabilities(queries[:, :, rows], keys, rows, None, block.attn.scaling, causal=False,
                                             heads="mean", reduce="sum", chunk_bytes=chunk_bytes)[0]
        received.append(total)
        mean_keys.append(keys[0].mean(dim=0))
        del queries, keys
    return torch.cat(received), torch.cat(mean_keys)


def merge_units(values: torch.Tensor, window_index: torch.Tensor, unit: int) -> torch.Tensor:
    """Average each merge unit of ``unit`` consecutive window-ordered rows and undo the window permutation:
    ``[T, ...]`` → ``[T / unit, ...]`` in LLM-token order."""
    pooled = values.reshape(values.shape[0] // unit, unit, *values.shape[1:]).mean(dim=1)
    return pooled[torch.argsort(window_index)]


def merge_units_in_order(values: torch.Tensor, unit: int, window_index: torch.Tensor | None) -> torch.Tensor:
    """``merge_units`` without a window permutation where the ViT has none (``window_index`` None)."""
    if window_index is None:
        return values.reshape(values.shape[0] // unit, unit, *values.shape[1:]).mean(dim=1)
    return merge_units(values, window_index, unit)


def qwen_block_hooks(visual, record) -> list:
    """Capture hooks on a Qwen ViT: its ``grid_thw`` (pre-hook) and the inputs of its last block."""
    pending = {}

    def capture_grid(module, args, kwargs):
        pending["grid_thw"] = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]

    def capture_block(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        record({"hidden": hidden, "cu_seqlens": kwargs["cu_seqlens"],
                "position_embeddings": kwargs["position_embeddings"], "grid_thw": pending["grid_thw"]})

    return [visual.register_forward_pre_hook(capture_grid, with_kwargs=True),
            visual.blocks[-1].register_forward_hook(capture_block, with_kwargs=True)]


def qwen_vit_groups(visual, captures: list[dict], chunk_bytes: int, window_index=None) -> list[GroupSignals]:
    """One group per temporal step of every grid of every capture (``qwen_block_hooks``): received attention and
    head-mean keys of the last block per merge unit, in LLM-token order. ``window_index(grid_thw)``: the ViT's
    window permutation (Qwen2.5-VL), None for a ViT without windows (Qwen2-VL)."""
    block = visual.blocks[-1]
    unit = visual.spatial_merge_size ** 2
    groups = []
    for call, capture in enumerate(captures):
        hidden, grid_thw = capture["hidden"], capture["grid_thw"]
        order = None if window_index is None else window_index(grid_thw).to(hidden.device)
        received, keys = qwen_received_attention(block, hidden, capture["cu_seqlens"], capture["position_embeddings"],
                                                 chunk_bytes)  # [T], [T, hd]
        scores = merge_units_in_order(received, unit, order)  # [T / 4]
        keys = merge_units_in_order(keys, unit, order)  # [T / 4, hd]
        start = 0
        for item, (frames, height, width) in enumerate(grid_thw.tolist()):
            size = height * width // unit
            for frame in range(frames):
                groups.append(GroupSignals(GroupSource(call, item, frame), scores[start:start + size],
                                           keys[start:start + size]))
                start += size
    return groups


# ---------------------------------------------------------------------------------------------------------
# A standalone trace (tests, notebooks): the family's own source around any forward calls
# ---------------------------------------------------------------------------------------------------------
class VisionTrace:
    """Capture what the vision encoder computes in the forward calls made inside ``with``; signals on demand.

        with VisionTrace(model, "llava") as trace:
            model(**inputs)
        groups = trace.groups()  # computed now, once: list[GroupSignals] in encoder order

    The family's own ``SignalSource`` (what ``tokenprune.apply`` installs for methods that need the signals); the
    hooks only keep references to the capture layer's inputs and are removed on exit, even on error.
    ``chunk_bytes`` bounds the float32 score block materialised at once.
    """

    def __init__(self, model, family: str, chunk_bytes: int = SCORE_CHUNK_BYTES):
        from .base import adapter_named

        self.model = model
        self.source: SignalSource = adapter_named(family).vision_signal_source(model)
        self.chunk_bytes = chunk_bytes
        self.captures: list[dict] = []
        self._handles: list = []
        self._groups: list[GroupSignals] | None = None

    @property
    def has_cls(self) -> bool:
        return self.source.has_cls

    def __enter__(self) -> "VisionTrace":
        self._handles = self.source.hook(self.model, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, capture: dict) -> None:
        self.captures.append(capture)
        self._groups = None

    @torch.no_grad()
    def groups(self) -> list[GroupSignals]:
        if self._groups is None:
            self._groups = self.source.compute(self.model, self.captures, self.chunk_bytes)
        return self._groups

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-projector features ``[..., D]`` to LLM embeddings (LLaVA's projector)."""
        return self.source.project(self.model, features)
