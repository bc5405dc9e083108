"""Done-when 1 and 6: identity methods give the stock logits exactly; apply() always restores the model."""

import pytest
import torch

import tokenprune as tp
from conftest import hook_snapshot, make_sample, stock_logits, tiny_vlm

IDENTITY_METHODS = [
    ("baseline", {}),
    ("fastv", {"keep_ratio": 1.0}),
    ("pdrop", {"layers": [1, 2, 3], "ratios": [1.0, 1.0, 1.0]}),
    ("random", {"keep_ratio": 1.0}),
    ("uniform", {"keep_ratio": 1.0}),
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name,fields", IDENTITY_METHODS, ids=[m for m, _ in IDENTITY_METHODS])
def test_identity_methods_give_stock_logits_exactly(family, attn, name, fields):
    vlm = tiny_vlm(family, attn)
    inputs = vlm.prepare(make_sample(1))
    reference = stock_logits(vlm, inputs)
    with torch.no_grad():
        stock = vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        with tp.apply(vlm.model, name, **fields):
            logits = vlm.model(**inputs).logits
            pruned = vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True)
    assert torch.equal(logits, reference)  # prefill logits, every row, bitwise
    assert torch.equal(pruned.sequences, stock.sequences)
    for step_pruned, step_stock in zip(pruned.logits, stock.logits):  # every decode step, bitwise
        assert torch.equal(step_pruned, step_stock)


def test_baseline_installs_nothing(family):
    vlm = tiny_vlm(family)
    stock_logits(vlm, vlm.prepare(make_sample(0)))
    before = hook_snapshot(vlm.model)
    with tp.apply(vlm.model, "baseline") as session:
        assert not session.installed
        assert hook_snapshot(vlm.model) == before


def test_apply_restores_the_stock_forward(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(2))
    reference = stock_logits(vlm, inputs)
    before = hook_snapshot(vlm.model)
    with tp.apply(vlm.model, "fastv", keep_ratio=0.25) as session:
        assert session.installed and hook_snapshot(vlm.model) != before
        pruned = stock_logits(vlm, inputs)
    assert hook_snapshot(vlm.model) == before
    assert pruned.shape[1] < reference.shape[1]
    assert torch.equal(stock_logits(vlm, inputs), reference)


def test_apply_restores_after_an_exception(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(3))
    reference = stock_logits(vlm, inputs)
    before = hook_snapshot(vlm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with tp.apply(vlm.model, "pdrop", layers=[1, 3], ratios=[0.5, 0.25]):
            stock_logits(vlm, inputs)
            raise RuntimeError("boom")
    assert hook_snapshot(vlm.model) == before
    assert torch.equal(stock_logits(vlm, inputs), reference)


def test_apply_restores_after_an_exception_inside_the_forward(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(3))
    reference = stock_logits(vlm, inputs)
    before = hook_snapshot(vlm.model)

    class Failing(tp.methods.create("fastv").__class__):
        def select(self, step):
            raise MemoryError("out of memory inside select")

    with pytest.raises(MemoryError):
        with tp.apply(vlm.model, Failing()):
            stock_logits(vlm, inputs)
    assert hook_snapshot(vlm.model) == before
    assert torch.equal(stock_logits(vlm, inputs), reference)


def test_apply_refuses_nesting(family):
    vlm = tiny_vlm(family)
    stock_logits(vlm, vlm.prepare(make_sample(0)))
    before = hook_snapshot(vlm.model)
    with tp.apply(vlm.model, "fastv"):
        with pytest.raises(RuntimeError, match="already applied"):
            with tp.apply(vlm.model, "pdrop", layers=[1], ratios=[0.5]):
                pass
    assert hook_snapshot(vlm.model) == before
