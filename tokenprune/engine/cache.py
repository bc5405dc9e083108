"""KV-cache surgery of a pruned prefill, and the masks of decoding steps over per-layer cache lengths."""

from __future__ import annotations

import torch

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
            if cache_layer.keys.shape[-2] == length:
                layer_rows = rows
            else:
                layer_rows = torch.stack([_rows_of(cached, wanted, layout.original_length) for cached, wanted, layout
                                          in zip(self.cached[layer], kept, survivors)])
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
