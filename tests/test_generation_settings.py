"""Each benchmark generates as its lmms-eval task default does, and generation stops at end of turn / stop strings.

The expected values were read from lmms-eval's task files (EvolvingLMMs-Lab/lmms-eval, ``lmms_eval/tasks/...``,
``generation_kwargs``); every task decodes greedily (``do_sample: false``, temperature 0), as tokenprune always does.
"until" strings are applied as stop strings; the TaskConfig default ``until: ["\\n\\n"]`` of tasks that give none is
not, since neither lmms-eval's llava_hf nor its qwen2_5_vl model applies it.
"""

from types import SimpleNamespace

import pytest
import torch

import tokenprune as tp
from tokenprune.data import dataset_class
from tokenprune.data.synthetic import SyntheticImageQA
from tokenprune.run.measure import cut_at_stop, end_of_turn_ids, measure_generation

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BASELINE = tp.methods.create("baseline")

LMMS_EVAL = {  # dataset: (max_new_tokens, stop strings, lmms-eval task file)
    "textvqa_val": (1024, ["ASSISTANT:"], "textvqa/_default_template_textvqa_yaml"),  # no max_new_tokens: llava_hf's 1024
    "mme": (16, [], "mme/mme.yaml"),
    "pope": (128, [], "pope/pope.yaml"),
    "gqa": (16, [], "gqa/gqa.yaml"),
    "scienceqa_img": (16, [], "scienceqa/scienceqa_img.yaml"),
    "mmbench_en": (1024, ["ASSISTANT:"], "mmbench/_default_template_mmbench_en_yaml"),
    "mmbench_cn": (256, [], "mmbench/_default_template_mmbench_cn_yaml"),
    "chartqa": (16, [], "chartqa/chartqa.yaml"),
    "ocrbench": (128, [], "ocrbench/ocrbench.yaml"),
    "egoschema": (16, [], "egoschema/_default_template_yaml"),
    "mvbench": (16, [], "mvbench/_default_template_yaml"),
    "videomme": (16, [], "videomme/videomme.yaml"),
    "mmmu_val": (128, [], "mmmu/_default_template_yaml"),
    "mmmu_dev": (128, [], "mmmu/_default_template_yaml"),
}


@pytest.mark.parametrize("name", sorted(LMMS_EVAL))
def test_benchmark_generation_settings_are_lmms_evals(name):
    import dataclasses

    cls = dataset_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    max_new_tokens, stop, source = LMMS_EVAL[name]
    assert fields["max_new_tokens"].default == max_new_tokens
    assert fields["stop"].default_factory() == stop
    assert cls.generation_source == f"lmms_eval/tasks/{source}"


def test_every_benchmark_states_where_its_settings_come_from():
    from tokenprune.data import available_datasets

    benchmarks = [n for n in available_datasets() if getattr(dataset_class(n), "generation_source", None) is not None
                  and n not in ("jsonl", "synthetic_image", "synthetic_video")]
    assert sorted(benchmarks) == sorted(LMMS_EVAL)


def test_end_of_turn_ids_join_the_tokenizer_and_the_generation_config():
    vlm = SimpleNamespace(processor=SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=151645)),
                          model=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[151645, 151643])))
    assert end_of_turn_ids(vlm) == [151645, 151643]  # Qwen2.5-VL-Instruct: <|im_end|>, <|endoftext|>
    llava = SimpleNamespace(processor=SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=2)),
                            model=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2)))
    assert end_of_turn_ids(llava) == [2]


def test_cut_at_stop():
    assert cut_at_stop("B\nASSISTANT: C", ["ASSISTANT:"]) == "B\n"
    assert cut_at_stop("red", []) == "red"


@pytest.fixture(scope="module")
def trained_llava():
    return tp.load_model("tiny_llava")


def test_generation_stops_at_end_of_turn_so_short_answers_cost_nothing_extra(trained_llava):
    vlm = trained_llava
    sample = SyntheticImageQA(limit=1)[0]
    inputs = vlm.prepare(sample)
    measured = measure_generation(vlm, inputs, BASELINE, max_new_tokens=64, eos_token_id=end_of_turn_ids(vlm))
    ids = measured.output_ids[0].tolist()
    assert len(ids) < 64 and ids[-1] in end_of_turn_ids(vlm)  # one word, then end of turn: nothing more is generated
    assert vlm.decode(measured.output_ids[0]).strip() == sample.answer


def test_generation_stops_at_a_stop_string(trained_llava):
    vlm = trained_llava
    sample = SyntheticImageQA(limit=1)[0]
    inputs = vlm.prepare(sample)
    eos = end_of_turn_ids(vlm)
    free = measure_generation(vlm, inputs, BASELINE, max_new_tokens=8, eos_token_id=eos)
    assert free.output_ids.shape[1] == 2  # the answer word, then end of turn
    answer = vlm.decode(free.output_ids[0][:1]).strip()
    stopped = measure_generation(vlm, inputs, BASELINE, max_new_tokens=8, eos_token_id=eos, stop_strings=[answer])
    assert stopped.output_ids.shape[1] == 1  # stopped as soon as the text ended with the stop string
    assert cut_at_stop(vlm.decode(stopped.output_ids[0]), [answer]).strip() == ""


def _cells(markdown: str, header: str, column: str) -> dict[str, str]:
    """``dataset name -> cell`` of one column of the Markdown table whose header row starts with ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    cells = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        values = [c.strip() for c in line.strip("|").split("|")]
        cells[values[0].strip("`")] = values[names.index(column)]
    return cells


def test_the_dataset_tables_state_each_benchmarks_settings():
    import dataclasses
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for document in ("README.md", "docs/datasets.md"):
        cells = _cells((root / document).read_text(), "| config name (`dataset=`) |", "generation: max new tokens, stop")
        for name, (max_new_tokens, stop, _) in LMMS_EVAL.items():
            assert cells[name] == f"{max_new_tokens}" + (", stop " + ", ".join(f"`{s}`" for s in stop) if stop else ""), \
                (document, name)
    sources = _cells((root / "docs/datasets.md").read_text(), "| `dataset=` | `max_new_tokens` |",
                     "lmms-eval task file (`EvolvingLMMs-Lab/lmms-eval`)")
    limits = _cells((root / "docs/datasets.md").read_text(), "| `dataset=` | `max_new_tokens` |", "`max_new_tokens`")
    for name, (max_new_tokens, _, source) in LMMS_EVAL.items():
        assert sources[name].startswith(f"`lmms_eval/tasks/{source}`") and limits[name] == str(max_new_tokens)
    assert {f.name for f in dataclasses.fields(dataset_class("mmmu_val"))} >= {"max_new_tokens", "stop"}
