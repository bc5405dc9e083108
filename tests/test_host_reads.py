"""No method synchronises the host with the device once per decoder layer or per decoding step.

On a GPU every read of a tensor value back to the host (``int(t)``, ``.tolist()``, ``nonzero``, boolean indexing...)
drains the launch queue, so a read per layer would leave a 28-layer prefill waiting on the host 28 times (the
speed benchmark's prefill ≤ 1.05 × ideal target). ``HostReads`` counts those reads on CPU: for every registered
method the count in one prefill is the same on a 6- and a 12-layer model, and a decoding step adds exactly what it
adds to the stock model (``generate``'s own stopping check).
"""

from collections import Counter
from functools import lru_cache

import pytest
import torch

import tokenprune as tp
from conftest import FAMILIES, make_sample, tiny_vlm
from tokenprune.run.measure import HostReads
from tokenprune.run.runner import model_method_settings

CASES = [(name, {}) for name in tp.methods.available()] + [("layerskip", {"mlp": [3, 4], "attn": [3]})]


def settings(family: str, name: str, fields: dict) -> dict:
    return {**model_method_settings(family, name), **fields}  # the tiny models' layer settings


def prefill_reads(family: str, layers: int, name: str, fields: dict) -> list:
    vlm = tiny_vlm(family, layers=layers)
    inputs = vlm.prepare(make_sample(3))
    with torch.no_grad(), tp.apply(vlm.model, name, **settings(family, name, fields)):
        vlm.model(**inputs)  # warm-up: lazily built tables are not the steady state
        with HostReads() as reads:
            vlm.model(**inputs)
    return reads.calls


@lru_cache(maxsize=None)
def stock_decode_step_reads(family: str) -> int:
    """``decode_step_reads`` of the stock model (the same for every method case: computed once per family)."""
    return decode_step_reads(family, None, {})


def decode_step_reads(family: str, name: str | None, fields: dict) -> int:
    """Host reads of ``generate`` with 3 new tokens minus those with 1: what two decoding steps add."""
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(3))
    counts = []
    for new_tokens in (1, 3):
        context = tp.apply(vlm.model, name, **settings(family, name, fields)) if name else torch.no_grad()
        with torch.no_grad(), context, HostReads() as reads:
            vlm.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        counts.append(len(reads.calls))
    return counts[1] - counts[0]


def test_host_reads_counts_the_reads_that_synchronise():
    x = torch.arange(6)
    with HostReads() as reads:
        int(x.sum()), x.tolist(), x[x > 2], (x > 1).nonzero(), bool((x > 4).any()), x.max().item()
        x + 1, x[1:3], x.sum(), torch.where(x > 2, x, 0)  # stay on the device
    assert [call[0] for call in reads.calls] == ["__int__", "tolist", "boolean index", "nonzero", "__bool__", "item"]
    assert all(call[1].startswith(__file__ + ":") for call in reads.calls)  # the caller, not torch internals


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,fields", CASES, ids=[f"{n}{'-plan' if f else ''}" for n, f in CASES])
def test_prefill_host_reads_do_not_grow_with_depth(family, name, fields):
    shallow, deep = prefill_reads(family, 6, name, fields), prefill_reads(family, 12, name, fields)
    assert len(shallow) == len(deep), (Counter(deep) - Counter(shallow)).most_common(5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,fields", CASES, ids=[f"{n}{'-plan' if f else ''}" for n, f in CASES])
def test_decoding_steps_add_no_host_reads_beyond_the_stock_models(family, name, fields):
    assert decode_step_reads(family, name, fields) == stock_decode_step_reads(family)
