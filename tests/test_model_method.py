"""Per-(model, method) settings (``conf/model_method/<model>_<method>.yaml``): every registered method's YAML
defaults run on every family's 6-layer tiny model, as ``method=`` and as a ``run.compare`` entry; explicit fields
win."""

import dataclasses
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

import tokenprune as tp
from tokenprune.models import available_models
from tokenprune.run.runner import MODEL_METHOD_DIR, build_plan, model_method_settings

TINY = sorted(adapter.tiny_model for adapter in tp.models.adapters())
MODEL_CONF = Path(tp.__file__).parent / "conf" / "model"


def plan(tmp_path: Path, *overrides: str):
    with initialize_config_module("tokenprune.conf", version_base=None):
        cfg = compose("config", overrides=[f"run.output_dir={tmp_path}", "run.progress=false", *overrides])
    return build_plan(cfg)


@lru_cache(maxsize=None)
def model_info(name: str):
    weights = yaml.safe_load((MODEL_CONF / f"{name}.yaml").read_text())["weights"]
    return tp.load_model(name, device="cpu", weights=weights).info()


def test_every_settings_file_names_a_model_and_a_method_and_only_their_fields():
    files = sorted(MODEL_METHOD_DIR.glob("*.yaml"))
    assert files
    for path in files:
        model, method = next((m, path.stem[len(m) + 1:]) for m in available_models() if path.stem.startswith(m + "_"))
        assert method in tp.methods.available(), path.name
        fields = yaml.safe_load(path.read_text())
        assert fields and "name" not in fields
        assert fields == model_method_settings(model, method)
        tp.methods.create(method, **fields)  # known fields with valid values
        assert path.read_text().startswith("# @package method\n"), path.name


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", tp.methods.available())
def test_every_method_default_fits_the_tiny_models(tmp_path, model, method):
    """``python -m tokenprune method=<any> model=<tiny>`` passes the model-dependent checks (layer ranges)."""
    main = plan(tmp_path, f"model={model}", f"method={method}").methods
    label, created = list(main.items())[-1]
    assert created.name == method
    created.validate(model_info(model))  # raises on an out-of-range layer
    settings = model_method_settings(model, method)
    fields = dataclasses.asdict(created)
    assert all((list(fields[key]) if isinstance(value, list) else fields[key]) == value
               for key, value in settings.items())
    # the same method as a compare entry gets the same settings
    compared = plan(tmp_path, f"model={model}", "method=baseline", f"run.compare=[{method}]").methods
    assert compared[label] == created


def test_the_papers_defaults_stay_for_real_models(tmp_path):
    himap = plan(tmp_path, "model=qwen25vl_7b", "model.weights=random", "method=himap").methods["himap"]
    assert (himap.text_layer, himap.image_layer) == (2, 8)


def test_explicit_fields_win_over_the_model_settings(tmp_path):
    methods = plan(tmp_path, "method=himap", "method.image_layer=5",
                   "run.compare=[{name: himap, image_layer: 3}, {name: prunevid, stage2_layer: 1}]").methods
    assert [m.image_layer for m in methods.values() if m.name == "himap"] == [5, 3]
    assert list(methods) == ["baseline", "himap(image_layer=5)", "himap(image_layer=3)", "prunevid(stage2_layer=1)"]
    assert plan(tmp_path, "method=pdrop").methods["pdrop(layers=[1,2,3])"].layers == [1, 2, 3]
