"""Layer skip: wall time of the policy search on the tiny models (done-when: under 5 minutes on 2 CPU cores).

    python benchmarks/layerskip_search.py                          # both tiny models, 20 samples, budget 4, beam 1
    python benchmarks/layerskip_search.py --models tiny_llava --budget 9 --beam-width 2
    python benchmarks/layerskip_search.py --smoke                  # seconds (run by tests/test_layerskip_benchmarks.py)

The tiny models load as ``tp.load_model`` does by default: the packaged trained checkpoint when present, random
weights otherwise (the column "weights" says which). Calibration samples: ``synthetic_image`` split ``train``.
"answers" is the one-off part (greedy answers, reference log-probabilities, vision encoder outputs); "search"
is everything after it; "forwards" counts the policy forwards (candidate scores + scalar fits).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import tokenprune as tp
from tokenprune.calibrate.layerskip import Calibration, search
from tokenprune.data import create_dataset
from tokenprune.methods.layerskip import SkipPolicy
from tokenprune.models.zoo.checkpoints import packaged_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables import load, meta, source, table  # noqa: E402  (registers this script's tables; see benchmarks/tables.py)


def load_default(name: str, device: str = "cpu"):
    weights = "pretrained" if packaged_checkpoint(name) else "random"
    return tp.load_model(name, weights=weights, device=device), weights


def run(name: str, n_samples: int, budget: float, beam_width: int, answer_tokens: int, min_layer: int,
        device: str = "cpu") -> dict:
    torch.manual_seed(0)
    vlm, weights = load_default(name, device)
    dataset = create_dataset("synthetic_image", split="train", limit=n_samples)
    started, cpu_started = time.perf_counter(), time.process_time()
    calibration = Calibration(vlm, [dataset[i] for i in range(n_samples)], answer_tokens=answer_tokens)
    answered = time.perf_counter()
    result = search(calibration, budget=budget, beam_width=beam_width, min_layer=min_layer)
    finished, cpu_finished = time.perf_counter(), time.process_time()
    return {"model": name, "weights": weights, "samples": n_samples, "budget": budget, "beam": beam_width,
            "rounds": len(result.rounds), "forwards": result.calibration["forwards"],
            "answers_s": answered - started, "search_s": finished - answered, "total_s": finished - started,
            "cpu_s": cpu_finished - cpu_started,  # CPU seconds of this process (all its threads): what other jobs
            # on a shared machine inflate far less than the wall times
            "policy": result.policy, "score": result.score, "cost": result.cost,
            "positions": result.calibration.get("positions")}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | weights | samples | budget | beam | rounds | forwards | answers s | search s | total s | "
             "CPU s | policy (MLP; attn) | score | cost |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        policy = f"{list(r['policy'].mlp)}; {list(r['policy'].attn)}"
        cpu = f"{r['cpu_s']:.1f}" if "cpu_s" in r else "—"
        lines.append(f"| {r['model']} | {r['weights']} | {r['samples']} | {r['budget']:g} | {r['beam']} | "
                     f"{r['rounds']} | {r['forwards']} | {r['answers_s']:.1f} | {r['search_s']:.1f} | "
                     f"{r['total_s']:.1f} | {cpu} | {policy} | {r['score']:.3g} | {r['cost']:g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny_llava", "tiny_qwen25vl"])
    parser.add_argument("--n-samples", type=int, default=20)
    parser.add_argument("--budget", type=float, default=4)
    parser.add_argument("--beam-width", type=int, default=1)
    parser.add_argument("--answer-tokens", type=int, default=10)
    parser.add_argument("--min-layer", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="2 samples, budget 1")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n_samples, args.budget, args.answer_tokens, args.min_layer = 2, 1, 3, 4
    rows = [run(name, args.n_samples, args.budget, args.beam_width, args.answer_tokens, args.min_layer)
            for name in args.models]
    print(f"Layer-skip policy search, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}\n")
    print(markdown(rows))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Generated tables (docs/methods/layerskip.md): python benchmarks/tables.py layerskip_search
# ---------------------------------------------------------------------------------------------------------
SEARCH = dict(n_samples=20, budget=4, beam_width=1, answer_tokens=10, min_layer=3)


# The search's score is a float32 KL of ~1e-7 between nearly equal distributions: its third digit moves when an
# unrelated kernel changes its summation order (engine v2 moved tiny_qwen25vl's by 0.35 %), so the staleness check
# compares it within 1 % (a different policy or calibration set changes it by far more).
KL_TOLERANCE = 0.01


@source("layerskip_search", volatile=("answers_s", "search_s", "total_s", "cpu_s"), tolerance={"score": KL_TOLERANCE})
def layerskip_search(quick: bool) -> dict:
    """The policy search on both trained tiny models (20 samples, budget 4); quick: the stored policies' scores."""
    records = []
    if quick:  # re-score each committed policy on the same calibration samples (the search itself takes minutes)
        stored = load("layerskip_search")["records"]
        scores = calibration_scores([(r["model"], r["policy"]) for r in stored], SEARCH["n_samples"],
                                    SEARCH["answer_tokens"])
        return {"meta": meta("quick"), "records": [{"key": r["key"], "score": s} for r, s in zip(stored, scores)]}
    for name in ("tiny_llava", "tiny_qwen25vl"):
        row = run(name, **SEARCH)
        records.append({**{k: v for k, v in row.items() if k != "policy"}, "key": name,
                        "policy": row["policy"].to_dict()})
    return {"meta": meta("python benchmarks/layerskip_search.py"), "records": records}


def calibration_scores(policies: list[tuple[str, dict]], n_samples: int, answer_tokens: int) -> list[float]:
    """The calibration score (mean KL to the original model on the first ``n_samples`` train samples) of each
    (model name, policy mapping)."""
    scores = []
    for model, mapping in policies:
        torch.manual_seed(0)
        vlm, _ = load_default(model)
        dataset = create_dataset("synthetic_image", split="train", limit=n_samples)
        calibration = Calibration(vlm, list(dataset), answer_tokens=answer_tokens)
        scores.append(calibration.score(SkipPolicy.from_mapping(mapping, "stored policy")))
    return scores


def _rows(data: dict) -> list[dict]:
    return [{**r, "policy": SkipPolicy.from_mapping(r["policy"], "stored policy")} for r in data["records"]]


@table("layerskip_search", source="layerskip_search")
def layerskip_search_table(data: dict) -> str:
    load = data["meta"].get("load_average")
    note = (f"\n\nMeasured on {data['meta']['machine']} with a load average of {load} (other jobs): the wall times "
            f"grow with the load, the CPU seconds of the search's own process far less." if load is not None else "")
    return markdown(_rows(data)) + note


@table("layerskip_search_example", source="layerskip_search")
def layerskip_search_example(data: dict) -> str:
    row = next(r for r in _rows(data) if r["model"] == "tiny_llava")
    output = f"layerskip-tiny_llava-synthetic_image-budget{row['budget']:g}.json"
    return "\n".join([
        "```", row["policy"].format(),
        f"Final Score {row['score']:.6g} (mean KL to the original model over {row['positions']} answer positions), "
        f"cost {row['cost']:g} (budget {row['budget']:g})",
        f"policy written to {output}",
        f"evaluate: python -m tokenprune method=layerskip method.policy={output} model=tiny_llava dataset=synthetic_image",
        "```"])


if __name__ == "__main__":
    main()
