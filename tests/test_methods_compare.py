"""benchmarks/methods_compare.py: the comparison of every method at equal retained tokens (docs/methods/compare.md)
holds every method, every run on every sample, and commands that compose to the measured methods (that the
document is what the records render to, and that the first samples measure again the same, is tests/test_tables.py's
check of every generated table)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import methods_compare  # noqa: E402


@pytest.fixture(scope="module")
def committed() -> dict:
    return methods_compare._tables.load(methods_compare.NAME)


def test_every_run_holds_every_method_on_every_sample(committed):
    runs = committed["runs"]
    assert sorted(runs) == sorted(f"{m}/{g}" for m in methods_compare.MODELS for g in methods_compare.GROUPS)
    for name, run in runs.items():  # every method ran on every sample, the unpruned model first
        assert run["labels"][0] == "baseline" and len(run["labels"]) == len(run["specs"]) + 1
        assert run["samples"] == methods_compare.SAMPLES
        records = [r for r in committed["records"] if r["run"] == name]
        assert len(records) == run["samples"] and all(set(r["runs"]) == set(run["labels"]) for r in records)
    for model in methods_compare.MODELS:  # the unpruned model agrees between a model's runs
        methods_compare.combined(committed, model)


def test_the_documented_commands_compose_to_the_measured_methods(committed):
    from hydra import compose, initialize_config_module

    from tokenprune.run.runner import build_plan

    for run in committed["runs"].values():
        override = methods_compare.compare_override(run["specs"])
        with initialize_config_module("tokenprune.conf", version_base=None):
            cfg = compose("config", overrides=["run.progress=false", *run["overrides"], override])
        assert list(build_plan(cfg, resolve_output_dir=False).methods) == run["labels"]


def test_every_method_is_in_the_comparison():
    import tokenprune as tp

    names = {spec["name"] for _, _, specs in methods_compare.BLOCKS.values() for spec in specs}
    video_only = {"prunevid"}
    not_reduction = {"baseline", "layerskip"}  # layer skip removes computation, not tokens
    assert names == set(tp.methods.available()) - video_only - not_reduction
