"""The README's examples run as written: the Python API snippet on tiny_llava, and "Adding a method" is one
working file."""

import re
from pathlib import Path

import torch

import tokenprune as tp
from conftest import make_sample, tiny_vlm
from tokenprune.methods import base

README = Path(__file__).parent.parent / "README.md"


def test_readme_method_example_runs():
    source = re.search(r"```python\n# tokenprune/methods/lastk.py\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    exec(source.replace("from .base import", "from tokenprune.methods.base import"), namespace)
    try:
        vlm = tiny_vlm("tiny_llava")
        with torch.no_grad(), tp.apply(vlm.model, "lastk", keep_ratio=0.25) as session:
            vlm.model(**vlm.prepare(make_sample(3)))
        n = session.last_report.layer_visual[0]
        assert session.last_report.layer_visual[2] == round(n * 0.25)
    finally:
        base._REGISTRY.pop("lastk", None)


def test_readme_python_api_snippet_runs_as_written(capsys):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(source, {})
    answer, layer_visual = capsys.readouterr().out.rsplit(" [", 1)
    assert answer.strip()  # the tiny model answered
    assert [int(n) for n in layer_visual.rstrip("]\n").split(",")] == [144, 72, 36, 18, 18, 18]  # PDrop's schedule
