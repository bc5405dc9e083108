"""Issue 17, "configuration a user can extend without touching the package": the top-level conf/ on Hydra's search
path with experiment presets (each valid on its model's real architecture), the package's own experiment=embedded
without it, and a user's model YAML defining a new named model of a registered family, with no Python."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import tokenprune as tp
from tokenprune.models.zoo.checkpoints import packaged_checkpoint
from tokenprune.run.results import read_records
from tokenprune.run.runner import _create_method, build_plan

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "conf" / "experiment").glob("*.yaml"))
PAPER_PRESETS = {"fastv", "pdrop", "himap", "prunevid", "layerskip"}  # one per seed method

pytestmark = pytest.mark.skipif(not PRESETS, reason="the repository's top-level conf/ is not there (installed package)")


def compose_with(*overrides: str, return_hydra_config: bool = False):
    with initialize_config_module("tokenprune.conf", version_base=None):
        return compose("config", overrides=["run.output_dir=unused", *overrides],
                       return_hydra_config=return_hydra_config)


def test_there_is_one_paper_preset_per_seed_method_and_a_budget_sweep():
    names = {p.stem for p in PRESETS}
    assert {name.split("_")[0] for name in names} >= PAPER_PRESETS
    assert "sweep_budgets" in names


@pytest.mark.parametrize("preset", [p.stem for p in PRESETS if p.stem != "sweep_budgets"], ids=str)
def test_each_paper_preset_is_valid_on_its_models_real_architecture(preset, monkeypatch):
    """The preset's method fields pass every model-dependent check against the architecture of the official model
    (layer ranges, RoPE kind), as a run would check them before loading that model."""
    monkeypatch.setenv("TOKENPRUNE_CONF", str(ROOT / "conf"))
    cfg = compose_with(f"experiment={preset}", "model.weights=random",
                       "method.policy=null" if preset.startswith("layerskip") else "run.seed=0")  # no policy file here
    from tokenprune.run.checks import check_methods, check_model

    method_name = preset.split("_")[0]
    assert cfg.method.name == method_name and cfg.model.name in tp.models.available_models()
    assert cfg.dataset.name in tp.data.available_datasets() and not cfg.dataset.name.startswith("synthetic")
    model = check_model(OmegaConf.to_container(cfg.model, resolve=True))
    method = _create_method(OmegaConf.to_container(cfg.method, resolve=True), "method")
    check_methods({"method": method}, model.info)
    if method_name == "pdrop":  # the paper's schedule, as the issue names it
        assert (cfg.model.name, cfg.dataset.name) == ("llava15_7b", "textvqa_val")
        assert (method.layers, method.ratios, method.positions) == ([8, 16, 24], [0.5, 0.25, 0.125], "reindex")


def test_the_layer_skip_preset_refuses_to_start_without_its_searched_policy(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENPRUNE_CONF", str(ROOT / "conf"))
    monkeypatch.chdir(tmp_path)  # no policy file here
    from tokenprune.run.runner import ConfigError

    cfg = compose_with("experiment=layerskip_qwen25vl_7b_textvqa", "model.weights=random", "dataset=synthetic_image")
    with pytest.raises(ConfigError, match=r"layerskip.policy \(layerskip-qwen25vl_7b-textvqa_val-budget9.json\): "
                                          "cannot read the policy file"):
        build_plan(cfg)


def test_the_embedded_preset_needs_no_top_level_conf(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKENPRUNE_CONF", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./conf here: the package's configuration alone
    cfg = compose_with("experiment=embedded", return_hydra_config=True)
    assert cfg.run.compare == "embedded"
    assert not any("tokenprune-user-conf" in str(e) for e in cfg.hydra.runtime.config_sources)


USER_MODEL = """\
name: my_tiny_llava
family: llava
path: {path}
weights: pretrained
dtype: float32
device: cpu
attn_implementation: sdpa
processor: {{num_additional_image_tokens: 1}}
"""


def test_a_users_model_yaml_defines_a_new_named_model_without_python(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "my_tiny_llava.yaml").write_text(USER_MODEL.format(path=packaged_checkpoint("tiny_llava")))
    assert "my_tiny_llava" not in tp.models.available_models()

    # through the search path ($TOKENPRUNE_CONF): checked before any model work, like a named model
    monkeypatch.setenv("TOKENPRUNE_CONF", str(conf))
    plan = build_plan(compose_with("model=my_tiny_llava", "method=pdrop", "method.layers=[1,2,3]"))
    assert plan.model["family"] == "llava" and plan.identity["model"]["name"] == "my_tiny_llava"
    bad = compose_with("model=my_tiny_llava", "method=fastv", "method.layer=9")
    with pytest.raises(ValueError, match="fastv.layer=9 is out of range: the model has 6 decoder layers"):
        build_plan(bad)
    monkeypatch.delenv("TOKENPRUNE_CONF")

    # through --config-dir, on the command line, end to end (its processor options reach the processor)
    from hydra.core.global_hydra import GlobalHydra
    from transformers import AutoProcessor

    seen = {}
    load = AutoProcessor.from_pretrained
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda path, **kw: seen.update(kw) or load(path, **kw))
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["tokenprune", "--config-dir", str(conf), "model=my_tiny_llava", "method=fastv",
                                      "dataset.limit=1", "run.max_new_tokens=1", "run.progress=false",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    runpy.run_module("tokenprune", run_name="__main__", alter_sys=False)
    assert seen == {"num_additional_image_tokens": 1}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model"] == "my_tiny_llava"
    assert all(run["score"] is not None for run in read_records(tmp_path / "run")[0]["runs"].values())


def test_a_users_model_must_name_a_registered_family(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "nameless.yaml").write_text("name: nameless\npath: /models/x\n")
    monkeypatch.setenv("TOKENPRUNE_CONF", str(conf))
    from tokenprune.run.runner import ConfigError

    with pytest.raises(ConfigError, match="model='nameless' is unknown; .*give its YAML a 'family'"):
        build_plan(compose_with("model=nameless"))
