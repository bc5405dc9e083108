"""The positions rule every method follows (``methods/base.py: resolve_positions``) and the per-sample budget helpers
of the pre-LLM methods (``methods/common.py``), by hand."""

import pytest
import torch

from tokenprune.engine.contract import ModelInfo, TokenLayout, VisualSpec
from tokenprune.methods.base import resolve_positions
from tokenprune.methods.common import complete_group_rows, group_rows, group_shares, sample_count

LLAVA = ModelInfo(num_layers=2, rope="1d", family="llava", reindex_positions=True)
QWEN = ModelInfo(num_layers=2, rope="mrope", family="qwen25vl", reindex_positions=False)


def test_positions_rule():
    assert resolve_positions("m", "auto", "reindex", LLAVA) == "reindex"  # official LLaVA re-packs
    assert resolve_positions("m", "auto", "keep", LLAVA) == "keep"  # official code keeps gaps (DART)
    assert resolve_positions("m", "auto", "reindex", QWEN) == "keep"  # mRoPE: original positions
    assert resolve_positions("m", "auto", "keep", QWEN) == "keep"
    assert resolve_positions("m", "keep", "reindex", LLAVA) == "keep"
    assert resolve_positions("m", "reindex", "keep", LLAVA) == "reindex"
    with pytest.raises(ValueError, match=r"m.positions='reindex' \(contiguous re-numbering\) is not defined for the "
                                         r"qwen25vl family \(mrope\); use positions='auto' or 'keep'"):
        resolve_positions("m", "reindex", "reindex", QWEN)
    with pytest.raises(ValueError, match=r"m.positions must be one of \['auto', 'keep', 'reindex'\], got 'repack'"):
        resolve_positions("m", "repack", "reindex", LLAVA)


def layout_of(sizes: list[int], text: int = 2) -> TokenLayout:
    """text, then one image of ``size`` tokens (a 1 x size grid) per entry, then text."""
    ids = [5] * text + [1] * sum(sizes) + [5] * text
    spec = VisualSpec(image_token_id=1, image_grids=tuple((1, 1, size) for size in sizes))
    return TokenLayout.from_input_ids(torch.tensor(ids), spec)


def test_a_sample_budget_is_split_over_the_groups_by_size():
    layout = layout_of([6, 6, 6])
    rows = group_rows(layout)
    assert [r.tolist() for r in rows] == [list(range(2, 8)), list(range(8, 14)), list(range(14, 20))]
    assert sample_count(10, layout) == 10 and sample_count(100, layout) == 18
    assert group_shares(10, layout, rows) == [4, 3, 3]  # ties of the remainder go to the earlier group
    assert group_shares(0.5, layout, rows) == [3, 3, 3]  # round(18 * 0.5) = 9
    assert group_shares(1.0, layout, rows) == [6, 6, 6]
    assert group_shares(7, layout_of([2, 3, 5]), group_rows(layout_of([2, 3, 5]))) == [1, 2, 4]


def test_the_count_is_of_the_original_visual_tokens_capped_by_the_current_ones():
    layout = layout_of([8])
    thinned = layout.gather(torch.tensor([0, 1, 2, 3, 4, 5, 11]))  # 4 of 8 visual rows left
    assert thinned.num_visual == 4 and thinned.original_num_visual == 8
    assert sample_count(0.25, thinned) == 2  # a quarter of the original 8
    assert sample_count(6, thinned) == 4
    with pytest.raises(ValueError, match="group 0 has 4 of its 8 tokens: run m before any other reduction"):
        complete_group_rows(thinned, "m")
    assert [r.tolist() for r in complete_group_rows(layout, "m")] == [list(range(2, 10))]
    assert complete_group_rows(layout_of([3]), "m")[0].tolist() == [2, 3, 4]
