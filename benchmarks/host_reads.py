"""Host reads in one prefill per registered method (each one a host-device synchronisation on a GPU), on CPU.

    python benchmarks/host_reads.py          # both tiny test architectures, 6 and 12 decoder layers

Counted with ``tokenprune.run.measure.HostReads`` on the test-size tiny models (random weights, 36 visual tokens),
after a warm-up call, with the tiny models' layer settings (``conf/model_method``). A count that differs between
6 and 12 layers would be a read per layer (``tests/test_host_reads.py`` fails on it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.models.zoo import tiny
from tokenprune.run.measure import HostReads
from tokenprune.run.runner import model_method_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables import meta, source, table  # noqa: E402  (registers this script's table; see benchmarks/tables.py)

FAMILIES = {"tiny_qwen25vl": (tiny.tiny_qwen25vl_config, tiny.tiny_qwen25vl_processor),
            "tiny_llava": (tiny.tiny_llava_config, tiny.tiny_llava_processor)}
PLAN = {"mlp": [3, 4], "attn": [3]}  # layer skip with 3 planned sublayers (without a policy it plans nothing)


def cases() -> list[tuple[str, str, dict]]:
    """(column, method, fields): the stock model, every registered method, layer skip with a plan."""
    names = [n for n in tp.methods.available() if n not in ("baseline", "layerskip")]
    return [("stock", "baseline", {})] + [(n, n, {}) for n in names] + \
        [("layerskip (3 planned sublayers)", "layerskip", PLAN)]


def model(family: str, layers: int):
    config, processor = FAMILIES[family]
    adapter = tp.models.adapter_named(tp.models.model_spec(family).family)
    built = adapter.build_random(config(layers=layers), torch.float32, "sdpa", seed=0).eval()
    return tp.models.VLM(name=family, model=built, processor=processor(), adapter=adapter)


def count(vlm, family: str, method: str, fields: dict) -> int:
    image = Image.fromarray((np.random.default_rng(3).random((168, 168, 3)) * 255).astype("uint8"))
    inputs = vlm.prepare(tp.Sample(id="3", question="what colour is the square at the top left ?", images=[image]))
    settings = {**model_method_settings(family, method), **fields}
    with torch.no_grad(), tp.apply(vlm.model, method, **settings):
        vlm.model(**inputs)  # warm-up: lazily built tables are not the steady state
        with HostReads() as reads:
            vlm.model(**inputs)
    return len(reads.calls)


def measure(depths: tuple[int, ...] = (6, 12)) -> list[dict]:
    records = []
    for family in FAMILIES:
        for layers in depths:
            vlm = model(family, layers)
            for column, method, fields in cases():
                records.append({"key": f"{family}/{layers}/{column}", "family": family, "layers": layers,
                                "column": column, "reads": count(vlm, family, method, fields)})
    return records


def markdown(records: list[dict]) -> str:
    columns = list(dict.fromkeys(r["column"] for r in records))
    names = {"tiny_qwen25vl": "tiny Qwen2.5-VL", "tiny_llava": "tiny LLaVA-1.5"}
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for family in dict.fromkeys(r["family"] for r in records):
        cells = []
        for column in columns:
            counts = [r["reads"] for r in records if r["family"] == family and r["column"] == column]
            cells.append(str(counts[0]) if len(set(counts)) == 1 else " / ".join(map(str, counts)))
        depths = " or ".join(str(d) for d in dict.fromkeys(r["layers"] for r in records if r["family"] == family))
        lines.append(f"| {names.get(family, family)}, {depths} layers | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@source("host_reads")
def host_reads(quick: bool) -> dict:
    """Host reads per prefill of every registered method on the test-size tiny models (6 and 12 layers); quick: 6."""
    return {"meta": meta("python benchmarks/host_reads.py"), "records": measure((6,) if quick else (6, 12))}


@table("host_reads", source="host_reads")
def host_reads_table(data: dict) -> str:
    return markdown(data["records"])


if __name__ == "__main__":
    print(markdown(measure()))
