"""Differences between the transformers versions tokenprune supports (>= 5.17, < 6).

transformers 5.24 renamed the KV-cache keyword of the decoder forwards from ``past_key_values`` to ``cache``
(the old name is still accepted, with a deprecation warning, and ignored when both are given). tokenprune
reads whichever the caller used and passes the cache on under the name the receiving function declares.
"""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def cache_keyword(function) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword under which ``function`` (a forward or a mask builder)
    takes the KV cache in the installed transformers."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def cache_argument(kwargs: dict):
    """The KV cache in a forward's keyword arguments, under either name (None: no cache)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def set_cache_argument(kwargs: dict, function, cache) -> None:
    """Put ``cache`` into ``kwargs`` under ``function``'s keyword, removing the other name."""
    kwargs.pop("past_key_values", None)
    kwargs.pop("cache", None)
    kwargs.update(cache_kwargs(function, cache))


def output_cache(output):
    """The KV cache a model output returns (``output.cache`` from 5.24 on, ``output.past_key_values`` before),
    read without tripping the deprecated alias's warning; None when the output carries none."""
    present = output.keys()  # the fields that are set; a plain key lookup, no alias translation
    for name in ("cache", "past_key_values"):
        if name in present:
            return output[name]
    return None


def cache_kwargs(function, cache) -> dict:
    """``{keyword: cache}`` under the keyword ``function`` declares, for calls such as ``layer(..., **cache_kwargs(...))``."""
    return {cache_keyword(function): cache}
