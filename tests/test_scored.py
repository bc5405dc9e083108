"""The scored base (``methods/scored.py``): top-k, ties (the lower row first), counts per pool, no scoring when a pool
keeps all or none of its rows, the reduction fields — by hand; FastV, PDrop, HiMAP, random and uniform are built on it
(their own tests, unchanged, check that their selections did not move)."""

from dataclasses import dataclass, field

import pytest
import torch

import tokenprune as tp
from tokenprune.engine.contract import IMAGE, TEXT, PrefillStep, TokenLayout, VisualGroup
from tokenprune.methods.scored import ScoredMethod


def layout() -> TokenLayout:
    """2 text rows, two images of 4 rows (rows 2-5 and 6-9), 2 text rows."""
    kind = torch.tensor([TEXT] * 2 + [IMAGE] * 8 + [TEXT] * 2)
    group = torch.tensor([-1, -1] + [0] * 4 + [1] * 4 + [-1, -1])
    cell = torch.tensor([-1, -1, 0, 1, 2, 3, 0, 1, 2, 3, -1, -1])
    groups = (VisualGroup(IMAGE, 0, 0, 2, 2), VisualGroup(IMAGE, 1, 0, 2, 2))
    return TokenLayout(kind, group, cell, torch.arange(12), groups, 12, 8)


def step() -> PrefillStep:
    return PrefillStep(1, torch.zeros(1, 12, 4), torch.arange(12)[None, None], layout(), scorer=None, stats={})


@dataclass
class HandScored(ScoredMethod):
    scores: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # pool size -> kept (else all)
    per_group: bool = False
    calls: list = field(default_factory=list)
    name = "hand_scored"

    def __post_init__(self):
        self.pool = "group" if self.per_group else "visual"

    def prune_layers(self, layout):
        return [1]

    def score(self, step):
        self.calls.append(step.layer)
        return torch.tensor(self.scores, dtype=torch.float32)

    def count(self, step, num_rows):
        return self.counts.get(num_rows, num_rows)

    def reduction_fields(self, step):
        return {"reindex_positions": True}


def kept(method) -> list[int]:
    reduction = method.select(step())
    assert reduction.reindex_positions  # the reduction fields reach the Reduction
    return reduction.keep.tolist()


TEXT_ROWS = [0, 1, 10, 11]


def test_top_k_over_every_visual_row_with_ties_to_the_lower_row():
    #          rows: 2    3    4    5    6    7    8    9
    scores = [0.1, 0.5, 0.5, 0.2, 0.5, 0.9, 0.0, 0.3]
    assert kept(HandScored(scores, {8: 3})) == sorted(TEXT_ROWS + [7, 3, 4])  # 0.9, then the first two 0.5s
    assert kept(HandScored(scores, {8: 4})) == sorted(TEXT_ROWS + [7, 3, 4, 6])


def test_one_top_k_per_group():
    scores = [0.1, 0.5, 0.5, 0.2, 0.5, 0.9, 0.0, 0.3]
    assert kept(HandScored(scores, {4: 1}, per_group=True)) == sorted(TEXT_ROWS + [3, 7])  # per group: its best


def test_no_scoring_when_a_pool_keeps_all_or_none_of_its_rows():
    everything, nothing = HandScored([0.0] * 8, {8: 8}), HandScored([0.0] * 8, {8: 0})
    assert kept(everything) == list(range(12)) and kept(nothing) == TEXT_ROWS
    assert everything.calls == [] and nothing.calls == []
    more = HandScored([0.0] * 8, {8: 100})  # counts above the pool size keep the pool
    assert kept(more) == list(range(12)) and more.calls == []
    once = HandScored([0.3, 0.2, 0.1, 0.0, 0.3, 0.2, 0.1, 0.0], {4: 2}, per_group=True)
    assert kept(once) == sorted(TEXT_ROWS + [2, 3, 6, 7]) and once.calls == [1]  # one score call for both pools


def test_a_bad_pool_is_refused():
    method = HandScored([0.0] * 8, {8: 3})
    method.pool = "image"
    with pytest.raises(ValueError, match=r"pool must be one of \['visual', 'group'\], got 'image'"):
        method.select(step())


@pytest.mark.parametrize("name", ["fastv", "pdrop", "himap", "random", "uniform"])
def test_the_attention_and_baseline_methods_are_scored(name):
    assert isinstance(tp.methods.create(name), ScoredMethod)
