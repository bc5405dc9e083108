"""Published benchmarks read through Hugging Face ``datasets``: one module per benchmark (loader, prompt, scorer).

Each registers a dataset config name (``textvqa_val``, ``mme``, ``pope``, ``gqa``, ``scienceqa_img``,
``mmbench_en``, ``mmbench_cn``, ``chartqa``, ``ocrbench``, ``egoschema``, ``mvbench``, ``videomme``) and reads
either the hub copy (lmms-eval's, old name first, then the name it moved to) or a local copy (``dataset.path``).
"""

import importlib
import pkgutil

from .hub import Benchmark, VideoBenchmark, load_split

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "hub":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Benchmark", "VideoBenchmark", "load_split"]
