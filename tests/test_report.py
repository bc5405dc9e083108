"""Issue 17, "reports that never mix what cannot be compared": runs grouped by their identity (model, weights,
checkpoint, dtype; dataset, split, exact sample ids; result-changing settings), each delta beside the baseline it
was paired with, mixed groups as separate tables; plots with units, ranges, run labels and nothing clipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from hydra import compose, initialize_config_module

from tokenprune.run.report import (clipped_texts, collect, delta_figure, flops_unit, pareto_figure, write_report,
                                   _plot_rows)
from tokenprune.run.results import RESULTS_FILE, SUMMARY_FILE, read_records
from tokenprune.run.runner import run_benchmark

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DAY = "2026-01-01"  # run directories named as Hydra names them: long labels for the plots


def run(root: Path, name: str, *overrides: str) -> Path:
    with initialize_config_module("tokenprune.conf", version_base=None):
        cfg = compose("config", overrides=[f"run.output_dir={root / DAY / name}", "run.progress=false",
                                           "run.max_new_tokens=1", *overrides])
    run_benchmark(cfg)
    return root / DAY / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    dirs = {
        "A": run(root, "12-00-00_tiny_llava_fastv_synthetic_image", "method=fastv", "dataset.limit=3"),
        "D": run(root, "12-05-00_tiny_llava_random_synthetic_image", "method=random", "dataset.limit=3"),
        "B": run(root, "12-10-00_tiny_llava_fastv_synthetic_image", "method=fastv", "dataset.limit=3",
                 "model.weights=random"),
        "C": run(root, "12-15-00_tiny_llava_fastv_synthetic_image", "method=fastv", "dataset.limit=2",
                 "dataset.seed=1"),  # other samples
    }
    # P: A cut short (a partial run: two of its three samples, no summary yet)
    dirs["P"] = root / DAY / "12-20-00_tiny_llava_fastv_synthetic_image"
    shutil.copytree(dirs["A"], dirs["P"])
    lines = (dirs["P"] / RESULTS_FILE).read_text().splitlines()
    (dirs["P"] / RESULTS_FILE).write_text("\n".join(lines[:2]) + "\n")
    (dirs["P"] / SUMMARY_FILE).unlink()
    # F: D whose baseline gave another answer on one sample (as a nondeterministic GPU kernel may): same identity
    # as A and D, but its deltas were paired with a different baseline
    dirs["F"] = root / DAY / "12-25-00_tiny_llava_random_synthetic_image"
    shutil.copytree(dirs["D"], dirs["F"])
    records = read_records(dirs["F"])
    records[0]["runs"]["baseline"]["score"] = 1.0 - records[0]["runs"]["baseline"]["score"]
    (dirs["F"] / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    (dirs["F"] / SUMMARY_FILE).unlink()
    names = {key: f"{DAY}/{path.name}" for key, path in dirs.items()}
    return root, dirs, names


def test_runs_are_grouped_by_identity_and_deltas_stay_beside_their_baseline(runs):
    root, dirs, names = runs
    groups = collect([root])
    members = sorted(sorted(r.name for r in g.runs) for g in groups)
    assert members == sorted([sorted([names["A"], names["D"], names["F"]]), [names["B"]], [names["C"]], [names["P"]]])

    shared = next(g for g in groups if len(g.runs) == 3)
    labels = [row.label for row in shared.rows]
    assert labels == [f"baseline [{names['A']}]", "fastv", "random", f"baseline [{names['F']}]", f"random [{names['F']}]"]
    baseline_a = shared.rows[0]
    assert sorted(r.name for r in baseline_a.runs) == sorted([names["A"], names["D"]])  # same per-sample scores
    # F's delta is against F's own baseline (recomputed from its records), not A's
    records = read_records(dirs["F"])
    own = [r["runs"]["random"]["score"] - r["runs"]["baseline"]["score"] for r in records]
    assert shared.rows[4].entry["paired_delta"]["mean"] == pytest.approx(100 * sum(own) / len(own))
    assert shared.rows[4].entry["paired_delta"]["mean"] != pytest.approx(shared.rows[2].entry["paired_delta"]["mean"])

    tables = {frozenset(r.name for r in g.runs): g.table() for g in groups}
    random_weights = tables[frozenset([names["B"]])]
    assert "weights random" in random_weights and "checkpoint random(seed=0" in random_weights
    assert "weights pretrained" in tables[frozenset([names["C"]])]
    assert "2 samples" in tables[frozenset([names["C"]])]
    assert f"partial runs: {names['P']} (2 of 3)" in tables[frozenset([names["P"]])]
    assert tables[frozenset([names["A"], names["D"], names["F"]])].count("| baseline [") == 2


def test_plots_say_their_unit_stay_in_range_name_their_runs_and_clip_nothing(runs, tmp_path):
    root, dirs, names = runs
    shared = next(g for g in collect([root]) if len(g.runs) == 3)
    rows = _plot_rows(shared)
    for x in ("visual_tokens_layer_mean", "flops"):
        figure = pareto_figure(rows, x, shared.title)
        axis = figure.axes[0]
        assert axis.get_ylabel() == "accuracy (%)" and axis.get_ylim() == (0.0, 100.0)
        if x == "flops":
            assert axis.get_xlabel() == "prefill MFLOPs (tokenprune convention)"  # the tiny model: 406 M
        legend = [text.get_text() for text in figure.legends[0].get_texts()]
        assert legend and all(any(names[k] in label for k in "ADF") for label in legend), legend
        assert clipped_texts(figure) == []
        plt.close(figure)
    figure = delta_figure(rows, shared.title)
    ticks = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert ticks and all(names["A"] in t or names["D"] in t or names["F"] in t for t in ticks)
    assert clipped_texts(figure) == []
    plt.close(figure)
    assert flops_unit([3.82e12]) == ("TFLOPs", 1e12) and flops_unit([9.5e9, 2e9]) == ("GFLOPs", 1e9)

    report = write_report([root], tmp_path / "report").read_text()
    assert report.count("### synthetic_image · tiny_llava") == 4
    assert len(list((tmp_path / "report").glob("*_flops.png"))) == 4


def test_a_metric_in_points_gets_its_own_unit_and_range():
    from tokenprune.data.benchmarks.mme import MMEScore
    from tokenprune.data.benchmarks.ocrbench import OCRBenchScore

    assert (MMEScore.headline_unit, MMEScore.headline_range) == ("points", (0.0, 2000.0))
    assert OCRBenchScore.headline_range == (0.0, 1000.0)
    row = {"label": "baseline", "run": "r", "metrics": {"perception_score": 1510.7}, "headline": "perception_score",
           "headline_unit": "points", "headline_range": [0.0, 2000.0], "flops": {"tokenprune": 3.82e12},
           "visual_tokens_layer_mean": 576.0}
    figure = pareto_figure([row], "flops")
    axis = figure.axes[0]
    assert axis.get_ylabel() == "perception_score (points)" and axis.get_ylim() == (0.0, 2000.0)
    assert axis.get_xlabel() == "prefill TFLOPs (tokenprune convention)"
    plt.close(figure)
