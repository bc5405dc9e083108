"""KV-cache surgery of a pruned prefill, the masks of decoding steps over per-layer cache lengths, and the cache
entry of a layer whose attention every row skips."""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .contract import PruningInputError, TokenLayout


class CacheLedger:
    """Which original prompt rows each layer's cache holds (per sample), so that a later selection with
    ``prune_cache_before`` can drop its pruned rows from the caches of the earlier layers."""

    def __init__(self):
        self.cached: dict[int, list[torch.Tensor]] = {}  # layer -> [original rows it cached] per sample

    def record(self, layer: int, layouts: list[TokenLayout]) -> None:
        self.cached[layer] = [layout.original for layout in layouts]

    def prune_below(self, cache, index: int, rows: torch.Tensor, length: int, survivors: list[TokenLayout]) -> None:
        """Keep only the survivors in the caches of the layers below ``index``.

        ``rows`` ``[B, L']`` indexes the sequence of ``length`` rows that entered this selection; ``survivors``: the
        layouts after it. A layer whose cache is ``length`` long holds exactly those rows; a longer one (cached before
        an earlier selection without ``prune_cache_before``) is mapped through the original rows it cached.
        """
        kept = [layout.original for layout in survivors]
        for layer in range(min(index, len(cache.layers))):
            cache_layer = cache.layers[layer]
            device = cache_layer.keys.device  # the layer's own device (a model spread over devices)
            if cache_layer.keys.shape[-2] == length:
                layer_rows = rows.to(device)
            else:
                layer_rows = torch.stack([_rows_of(cached.to(device), wanted.to(device), layout.original_length)
                                          for cached, wanted, layout in zip(self.cached[layer], kept, survivors)])
            gather = layer_rows[:, None, :, None].expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[-1])
            cache_layer.keys = cache_layer.keys.gather(2, gather)
            cache_layer.values = cache_layer.values.gather(2, gather)
            self.cached[layer] = kept


def _rows_of(cached: torch.Tensor, wanted: torch.Tensor, original_length: int) -> torch.Tensor:
    """Positions in ``cached`` (original row indices of a cache's rows) of each of ``wanted``'s original rows."""
    inverse = torch.full((original_length,), -1, dtype=torch.long, device=cached.device)
    inverse[cached] = torch.arange(cached.numel(), device=cached.device)
    rows = inverse[wanted]
    if int((inverse >= 0).sum()) != cached.numel() or bool((rows < 0).any()):
        raise PruningInputError("cannot prune an earlier layer's cache: its rows do not map one-to-one to original "
                                "rows (a pre-LLM merge with shared first members?)")
    return rows


def cached_keys(cache, layer: int, b: int, length: int) -> torch.Tensor | None:
    """Layer ``layer``'s cached keys of sample ``b`` ``[1, KVH, L, hd]`` if they cover exactly ``length`` rows."""
    if cache is None or layer >= len(cache.layers):
        return None
    keys = cache.layers[layer].keys
    if keys is None or keys.shape[-2] != length:
        return None
    return keys[b : b + 1]


def decode_mask(hidden: torch.Tensor, layer_length: int, query_length: int, attn_implementation: str):
    """Mask for ``query_length`` new rows over a layer cache of ``layer_length`` (+ the new rows); None when the
    backend's own causal rule is right (one query sees everything; flash attention aligns masks bottom-right)."""
    if query_length == 1 or "flash" in str(attn_implementation):
        return None
    kv_length = layer_length + query_length
    rows = torch.arange(query_length, device=hidden.device)[:, None] + layer_length
    columns = torch.arange(kv_length, device=hidden.device)[None, :]
    hidden_keys = columns > rows  # [q, kv]
    mask = torch.zeros(query_length, kv_length, dtype=hidden.dtype, device=hidden.device)
    mask = mask.masked_fill(hidden_keys, torch.finfo(hidden.dtype).min)
    return mask[None, None].expand(hidden.shape[0], 1, -1, -1)


class SkippedAttentionLayer(CacheLayerMixin):
    """The KV-cache entry of a layer whose attention every row skips (layer skip ``semantics: seed``): no keys or
    values, only the number of rows that passed the layer.

    The stock code reads the cache length from layer 0 (``Cache.get_seq_length()``: ``generate``'s input slicing,
    the masks, a family's decode positions) and so does the engine's prefill detection. A layer without any KV entry
    would report 0 there; this entry reports the rows that went through it, which is every row of the sequence, so
    each of those readers gets the right length whichever layers skip their attention.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False  # nothing to allocate

    def __init__(self, length: int = 0):
        super().__init__()
        self.length = length
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a layer whose attention every row skips stores no keys or values")

    def add_rows(self, rows: int) -> None:
        self.length += rows

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): give the number of rows to remove as a negative integer")
        self.length -= abs(tokens_to_remove)

    def reset(self) -> None:
        self.length = 0

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def reorder_cache(self, beam_idx) -> None:
        pass  # the row count does not depend on the batch

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices) -> None:
        pass


def count_skipped_attention(cache, layer: int, rows: int) -> None:
    """Record that ``rows`` new rows passed ``layer`` without attention: its cache entry becomes (or stays) a
    ``SkippedAttentionLayer`` counting them. No cache (``use_cache=False``): nothing to record."""
    if cache is None:
        return
    layers = cache.layers
    if layer >= len(layers):  # a lazily grown DynamicCache: fill the gap with the layers it would have made
        make = getattr(cache, "layer_class_to_replicate", None)
        if make is None:
            raise PruningInputError(f"the KV cache has no entry for layer {layer} and cannot grow one")
        layers.extend(make() for _ in range(layer + 1 - len(layers)))
    entry = layers[layer]
    if not isinstance(entry, SkippedAttentionLayer):
        if entry.get_seq_length() > 0:
            raise PruningInputError(f"layer {layer}'s attention is skipped for every row, but its KV cache already "
                                    "holds keys and values (a cache filled under another policy?)")
        entry = layers[layer] = SkippedAttentionLayer()
    entry.add_rows(rows)
