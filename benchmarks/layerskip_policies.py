"""Layer skip: the searched policy against random policies of equal cost (KL and held-out accuracy).

    python benchmarks/layerskip_policies.py                        # both tiny models: 20 train samples, budget 3
    python benchmarks/layerskip_policies.py --models tiny_qwen25vl --budget 2 --random 10 --heldout 48
    python benchmarks/layerskip_policies.py --smoke                # seconds (run by tests/test_layerskip_benchmarks.py)

The search runs on ``synthetic_image`` split ``train`` (calibration); every policy is then scored on the split
``test`` (held out): mean KL to the unskipped model over its greedy answers (teacher-forced, as in the search)
and exact-match accuracy of greedy generation with the dataset's scorer. Random policies have as many MLP (and
attention) skips as the searched one, over the same candidate layers, with scalars fitted the same way.
The tiny models load as ``tp.load_model`` does by default (trained checkpoint if packaged, else random weights;
column "weights"): on random weights accuracy is meaningless and only the KL columns say anything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import tokenprune as tp
from tokenprune.calibrate.layerskip import Calibration, random_policies, search
from tokenprune.data import create_dataset
from tokenprune.methods.layerskip import LayerSkip, SkipPolicy
from tokenprune.models.zoo.checkpoints import packaged_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables import load, meta, source, table  # noqa: E402  (registers this script's tables; see benchmarks/tables.py)
from layerskip_search import KL_TOLERANCE, calibration_scores  # noqa: E402


def accuracy(vlm, dataset, policy: SkipPolicy) -> float:
    correct = []
    with torch.no_grad(), tp.apply(vlm.model, LayerSkip.from_policy(policy)):
        for sample in dataset:
            inputs = vlm.prepare(sample)
            out = vlm.model.generate(**inputs, max_new_tokens=dataset.max_new_tokens, do_sample=False)
            prediction = vlm.decode(out[0, inputs["input_ids"].shape[1]:])
            correct.append(dataset.scorer.score(prediction, sample))
    return 100.0 * sum(correct) / len(correct)


def run(name: str, n_samples: int, heldout: int, budget: float, ops: list[str], min_layer: int, count: int,
        answer_tokens: int) -> dict:
    torch.manual_seed(0)
    weights = "pretrained" if packaged_checkpoint(name) else "random"
    vlm = tp.load_model(name, weights=weights, device="cpu")
    train = create_dataset("synthetic_image", split="train", limit=n_samples)
    test = create_dataset("synthetic_image", split="test", limit=heldout)
    calibration = Calibration(vlm, list(train), answer_tokens=answer_tokens)
    result = search(calibration, budget=budget, min_layer=min_layer, ops=ops)
    randoms = random_policies(calibration, result.policy, count=count, min_layer=min_layer, seed=0)
    held_out = Calibration(vlm, list(test), answer_tokens=answer_tokens)
    rows = []
    every_layer = tuple(range(calibration.num_layers))
    extremes = [("every visual sublayer skipped (s = 1)", SkipPolicy(mlp=every_layer, attn=every_layer))]
    for label, policy in [("none (full model)", SkipPolicy()), ("searched", result.policy)] + \
            [(f"random {i + 1}", p) for i, p in enumerate(randoms)] + extremes:
        rows.append({"label": label, "policy": policy, "cost": policy.cost(1.0, 0.5),
                     "calibration_kl": calibration.score(policy), "heldout_kl": held_out.score(policy),
                     "accuracy": accuracy(vlm, test, policy)})
    return {"model": name, "weights": weights, "rows": rows, "budget": budget, "n_samples": n_samples,
            "heldout": heldout}


def markdown(report: dict) -> str:
    rows = report["rows"]
    randoms = [r for r in rows if r["label"].startswith("random ")]
    searched = next(r for r in rows if r["label"] == "searched")
    lines = [f"{report['model']} ({report['weights']} weights): search on {report['n_samples']} train samples, "
             f"budget {report['budget']:g}; held out: {report['heldout']} test samples", "",
             "| policy | MLP skips | attention skips | cost | calibration KL | held-out KL | held-out accuracy % |",
             "|---|---|---|---:|---:|---:|---:|"]

    def line(r: dict) -> str:
        return (f"| {r['label']} | {list(r['policy'].mlp)} | {list(r['policy'].attn)} | {r['cost']:g} | "
                f"{r['calibration_kl']:.3g} | {r['heldout_kl']:.3g} | {r['accuracy']:.1f} |")

    extremes = [r for r in rows if r["label"].startswith("every")]
    lines += [line(r) for r in rows if r not in extremes]
    if randoms:  # the median row closes the random block
        lines.append(f"| random (median of {len(randoms)}) | | | {randoms[0]['cost']:g} | "
                     f"{statistics.median(r['calibration_kl'] for r in randoms):.3g} | "
                     f"{statistics.median(r['heldout_kl'] for r in randoms):.3g} | "
                     f"{statistics.median(r['accuracy'] for r in randoms):.1f} |")
    lines += [line(r) for r in extremes]
    if randoms:
        beaten = sum(searched["calibration_kl"] < r["calibration_kl"] for r in randoms)
        lines += ["", f"searched policy: lower calibration KL than {beaten}/{len(randoms)} random policies, lower "
                      f"held-out KL than {sum(searched['heldout_kl'] < r['heldout_kl'] for r in randoms)}/{len(randoms)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny_llava", "tiny_qwen25vl"])
    parser.add_argument("--n-samples", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=48)
    parser.add_argument("--budget", type=float, default=3)
    parser.add_argument("--ops", nargs="+", default=["mlp"], choices=["mlp", "attn"])
    parser.add_argument("--min-layer", type=int, default=0)
    parser.add_argument("--random", type=int, default=10, help="random policies of equal cost")
    parser.add_argument("--answer-tokens", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="2 + 2 samples, budget 1, 2 random policies")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n_samples, args.heldout, args.budget, args.random, args.answer_tokens = 2, 2, 1, 2, 3
    reports = [run(name, args.n_samples, args.heldout, args.budget, args.ops, args.min_layer, args.random,
                   args.answer_tokens) for name in args.models]
    print("\n\n".join(markdown(report) for report in reports))
    return reports


# ---------------------------------------------------------------------------------------------------------
# Generated tables (README.md, docs/methods/layerskip.md): python benchmarks/tables.py layerskip_policies
# ---------------------------------------------------------------------------------------------------------
SETTINGS = dict(n_samples=20, heldout=200, budget=3, ops=["mlp"], min_layer=0, count=10, answer_tokens=10)


@source("layerskip_policies", tolerance={"calibration_kl": KL_TOLERANCE})  # see layerskip_search.KL_TOLERANCE
def layerskip_policies(quick: bool) -> dict:
    """Searched vs 10 random layer-skip policies of equal cost on the trained tiny models (200 held-out samples);
    quick: the committed searched policies' calibration KL."""
    records = []
    if quick:  # the committed searched policies' calibration KL, recomputed
        stored = [r for r in load("layerskip_policies")["records"] if r["label"] == "searched"]
        scores = calibration_scores([(r["model"], r["policy"]) for r in stored], SETTINGS["n_samples"],
                                    SETTINGS["answer_tokens"])
        return {"meta": meta("quick"),
                "records": [{"key": r["key"], "calibration_kl": s} for r, s in zip(stored, scores)]}
    for name in ("tiny_llava", "tiny_qwen25vl"):
        report = run(name, **SETTINGS)
        for row in report["rows"]:
            records.append({**row, "key": f"{name}/{row['label']}", "model": name, "weights": report["weights"],
                            "policy": row["policy"].to_dict()})
    return {"meta": meta("python benchmarks/layerskip_policies.py --heldout 200"), "records": records}


def _policies(data: dict, model: str) -> list[dict]:
    return [{**r, "policy": SkipPolicy.from_mapping(r["policy"], "stored policy")}
            for r in data["records"] if r["model"] == model]


def _ranked(rows: list[dict]) -> dict[str, dict]:
    """none, searched, the best / median / worst random policy by calibration KL, every sublayer skipped."""
    by = {r["label"]: r for r in rows}
    randoms = sorted((r for r in rows if r["label"].startswith("random ")), key=lambda r: r["calibration_kl"])
    return {"none": by["none (full model)"], "searched": by["searched"], "best": randoms[0], "worst": randoms[-1],
            "randoms": randoms, "every": next(r for r in rows if r["label"].startswith("every"))}


def _kl(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


POLICY_HEADER = ("| model | policy | MLP skips | calibration KL | held-out KL | held-out accuracy % |",
                 "|---|---|---|---:|---:|---:|")


@table("layerskip_policies", source="layerskip_policies")
def layerskip_policies_table(data: dict) -> str:
    lines = list(POLICY_HEADER)
    for model in dict.fromkeys(r["model"] for r in data["records"]):
        ranked = _ranked(_policies(data, model))
        randoms = ranked["randoms"]
        layers = len(ranked["every"]["policy"].mlp)

        def row(name: str, r: dict, skips: str | None = None) -> str:
            skips = str(list(r["policy"].mlp)) if skips is None else skips
            return (f"| {model} | {name} | {skips} | {_kl(r['calibration_kl'])} | {_kl(r['heldout_kl'])} | "
                    f"{r['accuracy']:.1f} |")

        lines += [row("none", ranked["none"]), row("searched", ranked["searched"]),
                  row(f"random, best of {len(randoms)} (calibration KL)", ranked["best"]),
                  f"| {model} | random, median of {len(randoms)} | | "
                  f"{_kl(statistics.median(r['calibration_kl'] for r in randoms))} | "
                  f"{_kl(statistics.median(r['heldout_kl'] for r in randoms))} | "
                  f"{statistics.median(r['accuracy'] for r in randoms):.1f} |",
                  row(f"random, worst of {len(randoms)}", ranked["worst"]),
                  row("every visual sublayer skipped", ranked["every"],
                      f"[0..{layers - 1}] + attention [0..{layers - 1}]")]
    return "\n".join(lines)


@table("layerskip_policies_readme", source="layerskip_policies")
def layerskip_policies_readme(data: dict) -> str:
    lines = list(POLICY_HEADER)
    for model in dict.fromkeys(r["model"] for r in data["records"]):
        ranked = _ranked(_policies(data, model))
        randoms, best, searched = ranked["randoms"], ranked["best"], ranked["searched"]
        accuracies = {f"{r['accuracy']:.1f}" for r in randoms}
        median_accuracy = f"{statistics.median(r['accuracy'] for r in randoms):.1f}"
        lines += [
            f"| `{model}` | none | [] | 0 | 0 | {ranked['none']['accuracy']:.1f} |",
            f"| `{model}` | **searched** | {list(searched['policy'].mlp)} | **{_kl(searched['calibration_kl'])}** | "
            f"**{_kl(searched['heldout_kl'])}** | {searched['accuracy']:.1f} |",
            f"| `{model}` | random, median of {len(randoms)} (best) | | "
            f"{_kl(statistics.median(r['calibration_kl'] for r in randoms))} ({_kl(best['calibration_kl'])}) | "
            f"{_kl(statistics.median(r['heldout_kl'] for r in randoms))} "
            f"({_kl(best['heldout_kl'])}) | "
            + (f"{median_accuracy} (all {len(randoms)})" if len(accuracies) == 1 else
               f"{median_accuracy} ({min(r['accuracy'] for r in randoms):.1f}–{max(r['accuracy'] for r in randoms):.1f})")
            + " |",
            f"| `{model}` | every visual sublayer of all {len(ranked['every']['policy'].mlp)} layers (s = 1) | all + all "
            f"attention | {_kl(ranked['every']['calibration_kl'])} | {_kl(ranked['every']['heldout_kl'])} | "
            f"{ranked['every']['accuracy']:.1f} |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
