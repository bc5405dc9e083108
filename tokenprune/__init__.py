"""tokenprune: benchmark visual-token reduction methods on stock Hugging Face vision-language models.

    import tokenprune as tp
    vlm = tp.load_model("qwen25vl_7b", path="/models/Qwen2.5-VL-7B-Instruct")
    method = tp.methods.create("pdrop", layers=[8, 16, 24], ratios=[0.5, 0.25, 0.125])
    with tp.apply(vlm.model, method):
        out = vlm.model.generate(**vlm.prepare(sample), max_new_tokens=16)
"""

from . import methods, models
from .api import apply
from .data import Sample, VideoFrames
from .engine.contract import TokenLayout
from .engine.report import PrefillReport
from .models import load_model

__version__ = "0.1.0"

__all__ = ["PrefillReport", "Sample", "TokenLayout", "VideoFrames", "apply", "load_model", "methods", "models"]
