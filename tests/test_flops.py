"""Done-when 8: analytic FLOPs reproduce the PyramidDrop paper's LLaVA-1.5-7B figures; the tokenprune
convention matches a hand count."""

import pytest

from tokenprune.engine.flops import DecoderShape, all_conventions, layer_flops, paper_flops, prefill_flops
from tokenprune.models.llava import llava15_config

LLAVA7B = DecoderShape.from_config(llava15_config("7b").text_config)


def _pdrop_tflops(layer_visual):
    return paper_flops(LLAVA7B, "pdrop", [0] * 32, layer_visual) / 1e12


def test_llava15_7b_shape():
    assert (LLAVA7B.hidden, LLAVA7B.intermediate, LLAVA7B.layers, LLAVA7B.heads) == (4096, 11008, 32, 32)


def test_pdrop_paper_convention_reproduces_table_1():
    full = [576] * 32
    pdrop = [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    fastv_k2_r50 = [576] * 2 + [288] * 30
    assert round(_pdrop_tflops(full), 2) == 3.82
    assert round(_pdrop_tflops(pdrop), 2) == 1.78
    assert round(_pdrop_tflops(fastv_k2_r50), 2) == 2.01


def test_pdrop_paper_convention_llava_next():
    n = 2880
    assert round(_pdrop_tflops([n] * 32), 1) == 20.8
    assert round(_pdrop_tflops([n] * 8 + [n // 2] * 8 + [n // 4] * 8 + [n // 8] * 8), 2) == 9.46
    assert round(_pdrop_tflops([n] * 2 + [n // 2] * 30), 1) == 10.6


def test_himap_convention_ratio_matches_the_card():
    full = paper_flops(LLAVA7B, "himap", [0] * 32, [576] * 32)
    himap = paper_flops(LLAVA7B, "himap", [0] * 32, [576] * 2 + [288] * 6 + [72] * 24)
    assert round(100 * himap / full, 1) == 24.6


def test_tokenprune_convention_by_hand():
    shape = DecoderShape(hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, layers=2)
    n = 5
    projections = 2 * n * 8 * (8 + 4 + 4 + 8)  # q, k, v (GQA: 4 wide), o
    attention = 4 * 8 * (n * (n + 1) // 2)  # scores + values over causal keys 1..n
    mlp = 2 * n * 8 * 16 * 3
    assert layer_flops(shape, n) == projections + attention + mlp
    assert prefill_flops(shape, [5, 3]) == layer_flops(shape, 5) + layer_flops(shape, 3)
    with pytest.raises(ValueError, match="one token count per decoder layer"):
        prefill_flops(shape, [5])
    conventions = all_conventions(shape, [5, 3], [2, 1])
    assert set(conventions) == {"tokenprune", "fastv", "pdrop", "himap"}
    assert conventions["fastv"] == sum(4 * m * 64 + 2 * m * m * 8 + 2 * m * 8 * 16 for m in (5, 3))


def test_layer_skip_accounting_removes_exactly_the_skipped_rows():
    shape = DecoderShape(hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, layers=1)
    full = layer_flops(shape, 10)
    no_visual_mlp = layer_flops(shape, 10, mlp_rows=4)
    assert full - no_visual_mlp == 2 * 6 * 8 * 16 * 3


# The published architectures' decoder shapes (config.json values): (hidden, intermediate, layers, heads, kv heads,
# head_dim, router); MoE: top-k x expert width and the router's experts.
SHAPES = {
    "llava15_7b": (4096, 11008, 32, 32, 32, 128, 0),
    "qwen2vl_7b": (3584, 18944, 28, 28, 4, 128, 0),
    "qwen25vl_7b": (3584, 18944, 28, 28, 4, 128, 0),
    "qwen3vl_4b": (2560, 9728, 36, 32, 8, 128, 0),
    "qwen3vl_8b": (4096, 12288, 36, 32, 8, 128, 0),
    "qwen3vl_30b_a3b": (2048, 8 * 768, 48, 32, 4, 128, 128),
}


def test_every_named_architecture_has_its_familys_decoder_shape():
    import tokenprune as tp

    for name in tp.models.available_models():
        spec = tp.models.model_spec(name)
        config = spec.random_config()
        shape = tp.models.adapter_named(spec.family).decoder_shape(config.get_text_config())
        assert shape.layers == config.get_text_config().num_hidden_layers, name
        if name in SHAPES:
            assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads, shape.head_dim,
                    shape.router) == SHAPES[name], name
