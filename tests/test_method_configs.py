"""Every registered method has exactly one YAML in conf/method whose fields and defaults are the dataclass's."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import tokenprune as tp

CONF = Path(tp.__file__).parent / "conf" / "method"


def test_every_method_has_a_yaml_and_every_yaml_a_method():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == tp.methods.available()


@pytest.mark.parametrize("name", tp.methods.available())
def test_yaml_defaults_equal_the_dataclass_defaults(name):
    config = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)  # seeds: run.seed, else 0
    assert config.pop("name") == name
    defaults = dataclasses.asdict(tp.methods.create(name))
    assert config == defaults
    assert tp.methods.create(name, **config) == tp.methods.create(name)
