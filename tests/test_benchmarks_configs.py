"""Every registered dataset has exactly one YAML in conf/dataset whose fields and defaults are the dataclass's."""

import dataclasses
from pathlib import Path

import pytest
import yaml

import tokenprune as tp
from tokenprune.data import available_datasets, dataset_class

CONF = Path(tp.__file__).parent / "conf" / "dataset"
REQUIRED = "???"  # Hydra's marker for a field the user must set (no usable default)


def defaults(cls) -> dict:
    values = {}
    for f in dataclasses.fields(cls):
        if f.init:
            values[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return values


def test_every_dataset_has_a_yaml_and_every_yaml_a_dataset():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == available_datasets()


@pytest.mark.parametrize("name", available_datasets())
def test_yaml_fields_and_defaults_equal_the_dataclass(name):
    config = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert config.pop("name") == name
    expected = defaults(dataset_class(name))
    assert sorted(config) == sorted(expected)
    assert {k: v for k, v in config.items() if v != REQUIRED} == {k: v for k, v in expected.items()
                                                                 if config[k] != REQUIRED}
