"""Done-when 10: every registered method, with its default fields, runs on both tiny families."""

import dataclasses

import pytest
import torch

import tokenprune as tp
from conftest import hook_snapshot, make_sample, tiny_vlm

LAYERS = 32  # deep enough for every method's published default layers


@pytest.mark.parametrize("name", tp.methods.available())
def test_every_registered_method_runs_with_its_defaults(family, name):
    vlm = tiny_vlm(family, layers=LAYERS)
    inputs = vlm.prepare(make_sample(21))
    method = tp.methods.create(name)
    assert dataclasses.is_dataclass(method) and method.name == name
    before = hook_snapshot(vlm.model)
    with torch.no_grad(), tp.apply(vlm.model, method) as session:
        out = vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert hook_snapshot(vlm.model) == before
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    report = session.last_report
    if method.is_noop:
        assert report is None and not session.installed
        return
    assert len(report.layer_tokens) == LAYERS and len(report.layer_visual) == LAYERS
    assert report.layer_visual[0] <= inputs.layout.num_visual
    assert all(b <= a for a, b in zip(report.layer_visual, report.layer_visual[1:]))  # tokens never come back
    assert report.overhead_ms >= 0.0


def test_compose_runs_selections_in_order(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(22))
    composed = tp.methods.Compose([tp.methods.create("uniform", keep_ratio=0.5, layer=1),
                                   tp.methods.create("fastv", layer=3, keep_ratio=0.25)])
    with torch.no_grad(), tp.apply(vlm.model, composed) as session:
        vlm.model(**inputs)
    report = session.last_report
    n = inputs.layout.num_visual
    half = round(n * 0.5)
    quarter = round(half * 0.25)  # FastV ranks the tokens that reach it: its N is the survivors of uniform
    assert report.layer_visual == [n, half, half, quarter, quarter, quarter]
    assert set(report.kept[3]) <= set(report.kept[1])
