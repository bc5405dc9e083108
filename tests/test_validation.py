"""Done-when 9: invalid input is refused before any model work, with an error naming the field."""

import pytest

import tokenprune as tp
from conftest import make_sample, tiny_vlm


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown method 'fastvv'.*baseline.*fastv.*pdrop"):
        tp.methods.create("fastvv")


def test_unknown_field_names_the_fields():
    with pytest.raises(ValueError, match="no field.*keep_ration.*keep_ratio"):
        tp.methods.create("fastv", keep_ration=0.5)


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), "half", True])
@pytest.mark.parametrize("name,field", [("fastv", "keep_ratio"), ("random", "keep_ratio"), ("uniform", "keep_ratio")])
def test_ratios_outside_zero_one_are_refused(name, field, ratio):
    with pytest.raises(ValueError, match=f"{name}.{field} must be a number in \\(0, 1\\]"):
        tp.methods.create(name, **{field: ratio})


def test_pdrop_fields():
    with pytest.raises(ValueError, match="pdrop.ratios\\[1\\] must be a number in \\(0, 1\\]"):
        tp.methods.create("pdrop", layers=[2, 4], ratios=[0.5, 2.0])
    with pytest.raises(ValueError, match="pdrop.layers must be strictly increasing"):
        tp.methods.create("pdrop", layers=[8, 8, 24], ratios=[0.5, 0.25, 0.125])
    with pytest.raises(ValueError, match="pdrop.layers must be strictly increasing"):
        tp.methods.create("pdrop", layers=[16, 8], ratios=[0.5, 0.25])
    with pytest.raises(ValueError, match="pdrop.ratios must be non-increasing"):
        tp.methods.create("pdrop", layers=[2, 4], ratios=[0.25, 0.5])
    with pytest.raises(ValueError, match="equal lengths"):
        tp.methods.create("pdrop", layers=[2, 4], ratios=[0.5])
    with pytest.raises(ValueError, match="pdrop.positions must be one of"):
        tp.methods.create("pdrop", positions="shift")
    with pytest.raises(ValueError, match="pdrop.layers\\[0\\] must be >= 1"):
        tp.methods.create("pdrop", layers=[0], ratios=[0.5])


def test_fastv_fields():
    with pytest.raises(ValueError, match="fastv.query must be one of"):
        tp.methods.create("fastv", query="first")
    with pytest.raises(ValueError, match="fastv.keep must be a non-negative integer"):
        tp.methods.create("fastv", keep=-3)
    with pytest.raises(ValueError, match="fastv.layer must be >= 1"):
        tp.methods.create("fastv", layer=0)


def _forbid_forward(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("name,fields,pattern", [
    ("fastv", {"layer": 6}, "fastv.layer=6 is out of range: the model has 6 decoder layers"),
    ("pdrop", {"layers": [2, 9], "ratios": [0.5, 0.25]}, "pdrop.layers\\[1\\]=9 is out of range"),
    ("random", {"layer": 40}, "random.layer=40 is out of range"),
])
def test_layer_index_out_of_range_is_refused_before_model_work(family, name, fields, pattern):
    vlm = tiny_vlm(family)
    calls, handle = _forbid_forward(vlm.model)
    try:
        with pytest.raises(ValueError, match=pattern):
            with tp.apply(vlm.model, name, **fields):
                vlm.model(**vlm.prepare(make_sample(0)))
    finally:
        handle.remove()
    assert calls == []


def test_reindex_is_refused_on_mrope():
    vlm = tiny_vlm("tiny_qwen25vl")
    with pytest.raises(ValueError, match="positions='reindex' is defined for 1-D RoPE only"):
        with tp.apply(vlm.model, "pdrop", layers=[1, 2], ratios=[0.5, 0.25], positions="reindex"):
            pass


def test_model_loading_errors():
    with pytest.raises(ValueError, match="unknown model 'llava99'.*tiny_llava"):
        tp.load_model("llava99")
    with pytest.raises(ValueError, match="model.path is required for model=qwen25vl_7b"):
        tp.load_model("qwen25vl_7b")
    with pytest.raises(FileNotFoundError, match="model.path='/nonexistent/ckpt' does not exist"):
        tp.load_model("llava15_7b", path="/nonexistent/ckpt")
    with pytest.raises(ValueError, match="model.weights must be one of"):
        tp.load_model("tiny_llava", weights="trained")
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        tp.load_model("tiny_llava", weights="random", dtype="fp8")


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    vlm = tiny_vlm("tiny_llava")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    with pytest.raises(tp.models.ModelInputError, match="cannot read image .*corrupt.png"):
        vlm.prepare(tp.Sample(id="c", question="what ?", images=[str(corrupt)]))
    with pytest.raises(tp.models.ModelInputError, match="image file not found: .*missing.png"):
        vlm.prepare(tp.Sample(id="m", question="what ?", images=[str(tmp_path / "missing.png")]))
