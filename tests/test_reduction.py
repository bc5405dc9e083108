"""The one reduction result (``Reduction`` with ``MergedRows``): its rules by hand, its checks, and the engine
applying it before the decoder and at a layer input on every family — logits equal to references that merge the
embeddings / hidden states, positions and side inputs (Qwen3-VL's DeepStack features) by hand and run the stock
decoder layers one by one; cached decoding after a merge equals recomputing the merged prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tokenprune as tp
from conftest import make_sample, tiny_vlm
from helpers import final_logits, forced_choice, forced_generation, layers_by_hand, prompt_so_far, stock_decoder_call
from tokenprune.engine.contract import (IMAGE, TEXT, DecoderInput, MergedRows, Reduction, TokenLayout, VisualGroup)
from tokenprune.methods.base import Method

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WEIGHTS = (0.25, 0.75)  # unequal, so a swapped or uniform weighting is caught


# ---------------------------------------------------------------------------------------------------------
# The rules, by hand
# ---------------------------------------------------------------------------------------------------------
def hand_layout() -> TokenLayout:
    """8 rows: text, text, four visual rows of a 2 x 2 grid (cells 0..3), text, text."""
    kind = torch.tensor([TEXT, TEXT, IMAGE, IMAGE, IMAGE, IMAGE, TEXT, TEXT])
    group = torch.tensor([-1, -1, 0, 0, 0, 0, -1, -1])
    cell = torch.tensor([-1, -1, 0, 1, 2, 3, -1, -1])
    return TokenLayout(kind, group, cell, torch.arange(8), (VisualGroup(IMAGE, 0, 0, 2, 2),), 8, 4)


def test_reduction_rules_by_hand():
    x = torch.arange(8 * 2, dtype=torch.float32).view(8, 2)  # row r = [2r, 2r + 1]
    positions = torch.tensor([[0, 1, 2, 2, 3, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]])  # [2, 8]
    merged = MergedRows(sources=torch.tensor([5, 2, 3, 4]), into=torch.tensor([0, 0, 1, 1]),
                        weights=torch.tensor([0.75, 0.25, 0.5, 0.5]), anchor=torch.tensor([2, 2]))
    reduction = Reduction(keep=torch.tensor([0, 1, 6, 7]), merged=merged, meta={"note": 1})
    # merged row 0 = 0.25 row 2 + 0.75 row 5, merged row 1 = rows 3 and 4 halved; both before row 2's place
    assert torch.equal(reduction.order(8), torch.tensor([0, 1, 4, 5, 2, 3]))
    expected = torch.stack([x[0], x[1], 0.25 * x[2] + 0.75 * x[5], 0.5 * x[3] + 0.5 * x[4], x[6], x[7]])
    assert torch.equal(reduction.hidden(x), expected)
    values = torch.full((2, 2), -1.0)  # the method's own values replace the sums for the hidden states only
    with_values = Reduction(reduction.keep, MergedRows(merged.sources, merged.into, merged.weights, merged.anchor,
                                                       values=values))
    assert torch.equal(with_values.hidden(x)[2:4], values) and torch.equal(with_values.rows(x, 0), expected)
    # positions, "mean": rounded member means, half to even (rows 2, 5: (2 + 3) / 2 = 2.5 -> 2; (2 + 3) / 2 -> 2)
    assert reduction.positions(positions).tolist() == [[0, 1, 2, 2, 4, 5], [0, 1, 2, 2, 4, 5]]
    first = Reduction(reduction.keep, MergedRows(merged.sources, merged.into, merged.weights, merged.anchor,
                                                 positions="first"))
    assert first.positions(positions).tolist() == [[0, 1, 2, 2, 4, 5], [0, 1, 2, 3, 4, 5]]
    # layout: kind / group / original of the first member (rows 2 and 3); cell only when the members share it
    layout = reduction.layout(hand_layout())
    assert layout.original.tolist() == [0, 1, 2, 3, 6, 7] and layout.kind.tolist() == [0, 0, 1, 1, 0, 0]
    assert layout.cell.tolist() == [-1, -1, -1, -1, -1, -1] and layout.meta == {"note": 1}
    single = Reduction(torch.tensor([0, 1, 6, 7]), MergedRows(torch.tensor([3, 2, 4, 5]), torch.tensor([0, 1, 2, 3]),
                                                               torch.ones(4), torch.tensor([2, 2, 2, 2])))
    assert single.layout(hand_layout()).cell.tolist() == [-1, -1, 1, 0, 2, 3, -1, -1]
    # DecoderInput.reduced: side inputs merge with the reduction's weights
    side = x * 10
    seq = DecoderInput(x[None], positions[None], hand_layout(), side={1: side[None]})
    out = seq.reduced(reduction)
    assert torch.equal(out.side[1][0], reduction.rows(side, 0)) and torch.equal(out.embeds[0], expected)


@pytest.mark.parametrize("change,pattern", [
    (dict(keep=torch.tensor([1, 0])), "strictly ascending"),
    (dict(keep=torch.tensor([0, 8])), r"rows outside \[0, 8\)"),
    (dict(sources=torch.tensor([2, 9])), r"sources outside \[0, 8\)"),
    (dict(into=torch.tensor([0, 0]), anchor=torch.tensor([2, 2])), "a merged row has no member"),
    (dict(anchor=torch.tensor([9])), r"anchor outside \[0, 8\]"),
    (dict(weights=torch.tensor([1.0, float("nan")])), "weights not finite"),
    (dict(positions="middle"), "MergedRows.positions must be one of"),
    (dict(prune_cache_before=True), "prune_cache_before cannot be combined with merged rows"),
])
def test_malformed_reductions_are_refused(change, pattern):
    merged = dict(sources=torch.tensor([2, 3]), into=torch.tensor([0, 0]), weights=torch.tensor([0.5, 0.5]),
                  anchor=torch.tensor([2]), positions="mean")
    keep, extra = torch.tensor([0, 1, 4, 5, 6, 7]), {}
    for key, value in change.items():
        if key == "keep":
            keep = value
        elif key == "prune_cache_before":
            extra[key] = value
        else:
            merged[key] = value
    with pytest.raises(ValueError, match=pattern):
        Reduction(keep, MergedRows(**merged), **extra).check(8, "test.select", "at layer 1")


# ---------------------------------------------------------------------------------------------------------
# The engine applies it: references by hand on every family
# ---------------------------------------------------------------------------------------------------------
def pair_merge(layout: TokenLayout, positions: str, current_positions: torch.Tensor) -> Reduction:
    """Every two consecutive visual rows → one row (weights 0.25, 0.75) at the first one's place; text rows kept.
    ``positions``: a MergedRows rule, or "second": the second member's positions given as a tensor."""
    visual = layout.visual_rows()
    pairs = visual[: visual.numel() // 2 * 2].view(-1, 2)  # [M, 2]
    if positions == "second":
        positions = current_positions[0][:, pairs[:, 1]]  # [P, M]
    is_member = torch.zeros(layout.length, dtype=torch.bool)
    is_member[pairs.flatten()] = True
    merged = MergedRows(sources=pairs.flatten(), into=torch.arange(pairs.shape[0]).repeat_interleave(2),
                        weights=torch.tensor(WEIGHTS).repeat(pairs.shape[0]), anchor=pairs[:, 0], positions=positions)
    return Reduction(keep=(~is_member).nonzero().flatten(), merged=merged)


@dataclass
class PairMergeBefore(Method):
    positions: str = "mean"
    name = "pair_merge_before"

    def before_llm(self, seq):
        return pair_merge(seq.layout, self.positions, seq.positions)


@dataclass
class PairMergeAt(Method):
    layer: int = 2
    positions: str = "mean"
    name = "pair_merge_at"

    def prune_layers(self, layout):
        return [self.layer]

    def select(self, step):
        return pair_merge(step.layout, self.positions, step.positions)


def merge_by_hand(x: torch.Tensor, pairs: list[tuple[int, int]], keep: list[int]) -> tuple[torch.Tensor, list]:
    """``x`` ``[L, ...]``: kept rows and pair sums at the first member's place, in order; and the rows' origins."""
    first = {a: (a, b) for a, b in pairs}
    rows, origins = [], []
    for r in range(x.shape[0]):
        if r in first:
            a, b = first[r]
            rows.append(WEIGHTS[0] * x[a] + WEIGHTS[1] * x[b])
            origins.append((a, b))
        elif r in keep:
            rows.append(x[r])
            origins.append((r,))
    return torch.stack(rows), origins


def merged_positions(positions: torch.Tensor, origins: list, rule: str = "mean") -> torch.Tensor:
    """``[P, L]`` → ``[P, L']``: a pair gets its members' mean position, rounded half to even (Python's round), or
    its first / second member's."""
    if rule in ("first", "second"):
        member = 0 if rule == "first" else -1
        return torch.tensor([[int(p[origin[member]]) for origin in origins] for p in positions])
    return torch.tensor([[round(sum(int(p[i]) for i in origin) / len(origin)) for origin in origins]
                         for p in positions])


def pairs_and_keep(layout: TokenLayout) -> tuple[list[tuple[int, int]], list[int]]:
    visual = layout.visual_rows().tolist()
    pairs = [(visual[i], visual[i + 1]) for i in range(0, len(visual) // 2 * 2, 2)]
    members = {r for pair in pairs for r in pair}
    return pairs, [r for r in range(layout.length) if r not in members]


def test_pre_llm_merge_equals_a_hand_built_reference(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(41))
    call = stock_decoder_call(vlm, inputs)
    pairs, keep = pairs_and_keep(inputs.layout)
    embeds, origins = merge_by_hand(call["embeds"][0], pairs, keep)
    positions = merged_positions(call["positions"][0], origins)
    side = {layer: merge_by_hand(values[0], pairs, keep)[0][None] for layer, values in call["side"].items()}
    with torch.no_grad():
        reference = final_logits(vlm, layers_by_hand(vlm, embeds[None], positions[None], side,
                                                     range(len(vlm.adapter.layers(vlm.model)))))
        with tp.apply(vlm.model, PairMergeBefore()) as session:
            logits = vlm.model(**inputs).logits[0]
    report = session.last_report
    n = inputs.layout.num_visual
    assert report.tokens_entering_decoder == inputs.layout.length - n // 2 and report.visual_entering_decoder == n // 2
    assert torch.equal(logits, reference)  # bitwise: the same kernels on the same numbers


def test_merge_at_a_layer_equals_a_hand_built_reference(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(42))
    call = stock_decoder_call(vlm, inputs)
    layers = len(vlm.adapter.layers(vlm.model))
    pairs, keep = pairs_and_keep(inputs.layout)
    with torch.no_grad():
        # layers 0, 1 on the whole prompt; the layer-2 input (side inputs of layers 1 and 2 added) merged by hand
        hidden = layers_by_hand(vlm, call["embeds"], call["positions"], call["side"], range(2))
        if 2 in call["side"]:
            hidden = hidden + call["side"][2]
        hidden, origins = merge_by_hand(hidden[0], pairs, keep)
        side = {layer: merge_by_hand(values[0], pairs, keep)[0][None] for layer, values in call["side"].items()
                if layer > 2}
        references = {}
        for rule in ("mean", "first", "second"):
            positions = merged_positions(call["positions"][0], origins, rule)
            references[rule] = final_logits(vlm, layers_by_hand(vlm, hidden[None], positions[None], side,
                                                                range(2, layers)))
            with tp.apply(vlm.model, PairMergeAt(layer=2, positions=rule)) as session:
                logits = vlm.model(**inputs).logits[0]
            assert torch.equal(logits, references[rule]), rule  # bitwise: the same kernels on the same numbers
    # the position rule reaches the rotary tables: other positions, other logits
    assert not torch.equal(references["first"], references["second"])
    n = inputs.layout.num_visual
    assert session.last_report.layer_visual == [n, n] + [n // 2] * (layers - 2)


def test_cached_generation_after_a_merge_equals_recomputing_the_merged_prefill(family):
    vlm = tiny_vlm(family)
    inputs = vlm.prepare(make_sample(43))
    steps = 4
    with torch.no_grad(), tp.apply(vlm.model, PairMergeAt(layer=2)):
        out = vlm.model.generate(**inputs, **forced_generation(vlm, steps))
    prompt_length = inputs["input_ids"].shape[1]
    for step in range(steps):
        extended = prompt_so_far(inputs, out.sequences, step)
        with torch.no_grad(), tp.apply(vlm.model, PairMergeAt(layer=2)):
            recomputed = vlm.model(**extended, use_cache=False).logits[:, -1]  # the whole merged prefill again
        torch.testing.assert_close(out.logits[step], recomputed, rtol=1e-5, atol=1e-5)
        assert forced_choice(vlm, recomputed) == int(out.sequences[0, prompt_length + step])
