"""The README's "Adding a method" example really is one working file."""

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
