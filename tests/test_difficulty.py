"""The difficulty filter (``tokenprune/run/difficulty.py``) on synthetic correctness vectors (card ``downsample.md``
§8.6): A and B partition the samples the unpruned model solves, samples without a downsample result are left out,
a method's missing results count wrong, with the filter model = the target model the unpruned model scores 100 %
and downsampling 0 % on A, and TextVQA counts as correct from 2 matching annotators (VQA accuracy 0.6) on."""

import random
from pathlib import Path

import pytest

import tokenprune as tp
from tokenprune.data.scorers import VQAAccuracy
from tokenprune.run.difficulty import analysis, correct, format_analysis, sections, split


def vectors(seed: int, n: int = 200):
    rng = random.Random(seed)
    ids = [f"s{i}" for i in range(n)]
    baseline = {i: rng.choice([0.0, 0.3, 0.6, 1.0]) for i in ids}
    downsample = {i: rng.choice([0.0, 1.0]) for i in ids if rng.random() > 0.05}  # a few missing
    downsample.update({ids[0]: None})  # one failed
    method = {i: rng.choice([0.0, 0.6, 1.0]) for i in ids if rng.random() > 0.1}
    return ids, baseline, downsample, method


@pytest.mark.parametrize("seed", range(3))
def test_difficult_and_simple_partition_the_solved_samples(seed):
    ids, baseline, downsample, _ = vectors(seed)
    parts = split(baseline, downsample)
    solved = {i for i in ids if baseline[i] >= 0.5}
    assert set(parts.solved) == solved
    assert not set(parts.difficult) & set(parts.simple)
    assert set(parts.difficult) | set(parts.simple) | set(parts.skipped) == solved
    assert set(parts.skipped) == {i for i in solved if downsample.get(i) is None}  # missing or failed: left out
    assert all(downsample[i] < 0.5 for i in parts.difficult) and all(downsample[i] >= 0.5 for i in parts.simple)


def test_by_hand():
    baseline = {"a": 1.0, "b": 1.0, "c": 0.6, "d": 0.3, "e": 1.0, "f": 1.0}
    downsample = {"a": 0.0, "b": 1.0, "c": 0.3, "d": 1.0, "e": None}  # f: not run, e: failed
    method = {"a": 1.0, "b": 0.0, "c": 0.6, "d": 1.0}  # e, f: missing
    result = analysis(baseline, downsample, {"m": method, "downsample": downsample, "baseline": baseline})
    parts = result["split"]
    assert (parts.solved, parts.difficult, parts.simple, parts.skipped) == (
        ["a", "b", "c", "e", "f"], ["a", "c"], ["b"], ["e", "f"])
    m = result["methods"]["m"]
    assert (m["difficult"]["n"], m["difficult"]["correct"], m["difficult"]["accuracy"]) == (2, 2, 100.0)
    assert m["difficult"]["delta"] == pytest.approx(0.0)  # (1 - 1) and (0.6 - 0.6)
    assert (m["simple"]["correct"], m["simple"]["delta"]) == (0, -1.0)
    # the whole set: 6 samples, right on a, c, d (e, f missing count wrong); Δ = (0 - 1 + 0 + 0.7 - 1 - 1) / 6
    assert (m["all"]["n"], m["all"]["correct"]) == (6, 3)
    assert m["all"]["delta"] == pytest.approx((0 - 1 + 0 + 0.7 - 1 - 1) / 6)
    # filter = target model: the unpruned model 100 % on A and B, downsampling 0 % on A and 100 % on B
    assert result["methods"]["baseline"]["difficult"]["accuracy"] == 100.0
    assert result["methods"]["downsample"]["difficult"]["accuracy"] == 0.0
    assert result["methods"]["downsample"]["simple"]["accuracy"] == 100.0
    table = format_analysis(result, "synthetic", tokens={"m": (36.0, 9.0)})
    assert "difficult (downsampling wrong): 2" in table and "| m | 36.0 / 9.0 | 50.0 (" in table


def test_textvqa_is_correct_from_two_matching_annotators():
    scorer = VQAAccuracy()

    def score(matches: int) -> float:
        return scorer.score("red", tp.Sample(id="t", question="?", answer=["red"] * matches + ["blue"] * (10 - matches)))

    assert score(2) == pytest.approx(0.6) and correct(score(2))
    assert score(1) == pytest.approx(0.3) and not correct(score(1))


def test_sections_from_run_records():
    """Records as the runner writes them: a downsample run with its own baseline, a method in another run, a
    sample that failed before any method ran and a failed method run."""
    run_a = [{"id": "a", "error": None, "runs": {"baseline": {"score": 1.0, "error": None},
                                                "downsample": {"score": 0.0, "error": None}}},
             {"id": "b", "error": None, "runs": {"baseline": {"score": 1.0, "error": None},
                                                "downsample": {"score": 1.0, "error": None}}},
             {"id": "c", "error": "ModelInputError: bad image", "runs": {}}]
    run_b = [{"id": "a", "error": None, "runs": {"baseline": {"score": 1.0, "error": None},
                                                "fastv": {"score": None, "error": "out of memory"}}},
             {"id": "b", "error": None, "runs": {"baseline": {"score": 1.0, "error": None},
                                                "fastv": {"score": 1.0, "error": None}}}]
    rows = [{"label": "baseline", "method": "baseline", "records": run_a, "record_label": "baseline"},
            {"label": "downsample", "method": "downsample", "records": run_a, "record_label": "downsample",
             "visual_tokens": 9.0, "visual_tokens_layer_mean": 9.0},
            {"label": "fastv", "method": "fastv", "records": run_b, "record_label": "fastv", "visual_tokens": 36.0,
             "visual_tokens_layer_mean": 9.0}]
    text = "\n".join(sections(rows, "tiny"))
    assert "solved by the unpruned model: 2; difficult (downsampling wrong): 1; simple: 1" in text
    assert "| fastv | 36.0 / 9.0 | 50.0 (-50.0 [" in text  # the failed run on a counts wrong (all: 1 of 2)
    assert "| downsample | 9.0 / 9.0 | 50.0 (-50.0 [" in text and "| 0.0 (-100.0) |" in text  # 0 % on A, one sample
    assert sections(rows[:1] + rows[2:], "tiny") == []  # no downsample run: no table


def test_the_report_shows_the_difficult_subset_of_real_runs(tmp_path):
    """Two runs of the trained tiny LLaVA on the same samples — downsample (with its unpruned run) and FastV, both at
    a quarter of the visual tokens — and the report's difficult-subset table, checked against the records."""
    from hydra import compose, initialize_config_module

    from tokenprune.run.report import collect, write_report
    from tokenprune.run.results import read_records
    from tokenprune.run.runner import run_benchmark

    def run(name: str, *overrides: str) -> Path:
        with initialize_config_module("tokenprune.conf", version_base=None):
            cfg = compose("config", overrides=[f"run.output_dir={tmp_path / name}", "run.progress=false",
                                               "run.max_new_tokens=1", "dataset.limit=8", *overrides])
        run_benchmark(cfg)
        return tmp_path / name

    downsample = run("downsample", "method=downsample", "method.budget=0.25")
    run("fastv", "method=fastv", "method.keep_ratio=0.25")
    (group,) = collect([tmp_path])
    records = {r["id"]: r for r in read_records(downsample)}
    solved = [i for i, r in records.items() if r["runs"]["baseline"]["score"] >= 0.5]
    difficult = [i for i in solved if records[i]["runs"]["downsample"]["score"] < 0.5]
    text = "\n".join(group.difficulty())
    assert f"solved by the unpruned model: {len(solved)}; difficult (downsampling wrong): {len(difficult)}" in text
    assert "| fastv(keep_ratio=0.25) | 144.0 / 72.0 |" in text  # 36 from layer 2 of 6: (2·144 + 4·36) / 6 = 72
    assert "| downsample | 36.0 / 36.0 |" in text  # 12² → 6² tokens from the encoder
    assert (len(group.runs[0].records), len(records)) == (8, 8)
    report = write_report([tmp_path], tmp_path / "report").read_text()
    assert "Difficult subset of" in report
