"""Layer-skip policy search: which sublayers may skip their visual rows, chosen by KL on calibration samples.

Card: ``shared/methods/layerskip.md`` §2.2 (items 4-8).

    calibration = Calibration(vlm, samples, answer_tokens=10)  # the original model's answers + log-probs, once
    result = search(calibration, budget=9, beam_width=1)     # greedy (beam_width=1) or beam search
    print(result.format()); result.save("policy.json")        # then: method=layerskip method.policy=policy.json

* Score(P) = mean over samples x and answer positions t of KL(p_orig(.|x, y_<t) || p_P(.|x, y_<t)), y the original
  model's greedy answer (at most ``answer_tokens``, stopping at EOS, image/video placeholder ids suppressed),
  teacher-forced: one forward per sample.
* Scalars (closed form, float64): under the parent policy, over every calibration visual row,
  ``s_l = sum<y, u> / sum|u|^2 = 1 + sum<MLP_l(LN2(u)), u> / sum|u|^2`` and ``a_l = 1 + sum<Attn_l, h> / sum|h|^2``.
* Search: from the empty policy, every beam proposes each not-yet-skipped (op, layer >= min_layer) with its scalar
  fitted under that beam; candidates are de-duplicated by their skipped sets, ranked by (Score, -cost, layer, op),
  the best ``beam_width`` continue; beams whose cost reaches ``budget`` are done; the best done policy wins.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..data.sample import Sample
from ..engine.apply import apply
from ..engine.contract import TokenLayout
from ..engine.flops import layer_flops, planned_layer_flops
from ..methods.base import LayerPlan
from ..methods.layerskip import OPS, LayerSkip, SkipPolicy

COSTS = ("fixed", "flops")
OP_RANK = {op: rank for rank, op in enumerate(OPS)}  # ties: an MLP skip before an attention skip


# ---------------------------------------------------------------------------------------------------------
# Closed-form scalar
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ScalarFit:
    """Least squares of ``u + delta ≈ s * u`` over many rows: ``s = 1 + sum<delta, u> / sum|u|^2`` (float64).

    ``delta`` is what the skipped sublayer would have added (MLP output, or attention output with u = h).
    No rows, or rows of zeros only: s = 1.
    """

    dot: torch.Tensor | float = 0.0
    norm: torch.Tensor | float = 0.0
    rows: int = 0

    def add(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        """``u``, ``delta``: ``[..., d]`` rows of one batch."""
        u, delta = u.double(), delta.double()
        self.dot = self.dot + (delta * u).sum()
        self.norm = self.norm + (u * u).sum()
        self.rows += u.numel() // max(1, u.shape[-1])

    @property
    def value(self) -> float:
        norm = float(self.norm)
        return 1.0 if norm == 0.0 else 1.0 + float(self.dot) / norm


# ---------------------------------------------------------------------------------------------------------
# Calibration data: the original model's answers and log-probabilities, computed once
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CalibrationItem:
    sample_id: str
    prompt: dict  # the prompt's model inputs (visual rows only depend on it)
    forced: dict  # prompt + answer[:-1], for teacher forcing
    layout: TokenLayout
    answer: torch.Tensor  # [K] the original model's greedy answer (EOS included when reached)
    reference: torch.Tensor  # [K, V] log-probabilities of the original model at the answer positions (>= float32)


class Calibration:
    """Calibration samples prepared for scoring policies (batch size 1, no KV cache)."""

    def __init__(self, vlm, samples: Sequence[Sample], answer_tokens: int = 10, progress: bool = False):
        if isinstance(answer_tokens, bool) or not isinstance(answer_tokens, int) or answer_tokens < 1:
            raise ValueError(f"answer_tokens must be an integer >= 1, got {answer_tokens!r}")
        if not samples:
            raise ValueError("calibration needs at least one sample (n_samples >= 1)")
        self.vlm = vlm
        self.answer_tokens = answer_tokens
        self.layers = list(vlm.adapter.text_model(vlm.model).layers)
        self.forwards = 0  # model forwards run for policies (scores and fits), for benchmarks
        self.items = [self._prepare(sample) for sample in tqdm(samples, desc="calibration answers", disable=not progress)]
        self.positions = sum(item.answer.numel() for item in self.items)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _prepare(self, sample: Sample) -> CalibrationItem:
        prompt = self.vlm.prepare(sample)
        if prompt.layout.num_visual == 0:
            raise ValueError(f"calibration sample {sample.id!r} has no visual tokens")
        length = prompt["input_ids"].shape[1]
        with torch.no_grad():
            generated = self.vlm.model.generate(**prompt, max_new_tokens=self.answer_tokens, do_sample=False,
                                                suppress_tokens=placeholder_ids(self.vlm.model) or None)
            encoded = encode_visual_inputs(self.vlm.model, prompt)  # policies change the decoder only
        answer = generated[0, length:]
        forced = extend_inputs(encoded, answer[:-1])
        item = CalibrationItem(str(sample.id), encoded, forced, prompt.layout, answer, reference=None)
        item.reference = self._log_probs(item)
        return item

    def _log_probs(self, item: CalibrationItem) -> torch.Tensor:
        """``[K, V]`` float32 log-probabilities at the K answer positions (teacher-forced, one forward)."""
        k = item.answer.numel()
        logits = self.vlm.model(**item.forced, use_cache=False, logits_to_keep=k).logits[0]  # [K, V]
        return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)

    # -- scoring -----------------------------------------------------------------------------------------
    def kl_per_position(self, policy: SkipPolicy) -> list[torch.Tensor]:
        """KL(p_orig || p_policy) at every answer position, ``[K_i]`` float64 per sample."""
        result = []
        with torch.no_grad(), apply(self.vlm.model, LayerSkip.from_policy(policy)):
            for item in self.items:
                reference = item.reference.double()
                log_q = self._log_probs(item).double()
                result.append((reference.exp() * (reference - log_q)).sum(-1).clamp(min=0.0))
                self.forwards += 1
        return result

    def score(self, policy: SkipPolicy) -> float:
        """Mean KL over all calibration answer positions; 0 for the empty policy (no forward needed)."""
        if policy.is_empty:
            return 0.0
        return float(sum(kl.sum() for kl in self.kl_per_position(policy))) / self.positions

    # -- scalar fits -------------------------------------------------------------------------------------
    def fit(self, policy: SkipPolicy, mlp_layers: Sequence[int] = (), attn_layers: Sequence[int] = ()
            ) -> tuple[dict[int, float], dict[int, float]]:
        """Closed-form scalars of skipping each MLP in ``mlp_layers`` / attention in ``attn_layers``, each fitted
        alone under ``policy`` (one forward per sample for all layers together)."""
        if set(mlp_layers) & set(policy.mlp) or set(attn_layers) & set(policy.attn):
            raise ValueError("fit: a layer to fit is already skipped by the parent policy")
        mlp_fits = {layer: ScalarFit() for layer in mlp_layers}
        attn_fits = {layer: ScalarFit() for layer in attn_layers}
        if not (mlp_fits or attn_fits):
            return {}, {}
        current: dict[str, Any] = {}
        handles = []
        try:
            with torch.no_grad(), apply(self.vlm.model, LayerSkip.from_policy(policy)):
                for index, fit in mlp_fits.items():
                    handles += self._mlp_probe(self.layers[index], fit, current)
                for index, fit in attn_fits.items():
                    handles += self._attention_probe(self.layers[index], fit, current)
                for item in self.items:
                    current["visual"], current["length"] = item.layout.visual_rows(), item.layout.length
                    self.vlm.model(**item.prompt, use_cache=False, logits_to_keep=1)
                    self.forwards += 1
        finally:
            for handle in handles:
                handle.remove()
        return ({layer: fit.value for layer, fit in mlp_fits.items()},
                {layer: fit.value for layer, fit in attn_fits.items()})

    @staticmethod
    def _mlp_probe(layer, fit: ScalarFit, current: dict) -> list:
        """u = the input of the post-attention norm, delta = the MLP output, visual rows."""
        saved = {}

        def keep_u(module, args):
            u = args[0]
            if u.shape[1] != current["length"]:
                raise RuntimeError("scalar fit: this layer's MLP does not run on every row under the parent policy")
            saved["u"] = u[:, current["visual"]]

        def add(module, args, output):
            fit.add(saved.pop("u"), output[:, current["visual"]])

        return [layer.post_attention_layernorm.register_forward_pre_hook(keep_u), layer.mlp.register_forward_hook(add)]

    @staticmethod
    def _attention_probe(layer, fit: ScalarFit, current: dict) -> list:
        """h = the layer input, delta = the attention output, visual rows."""
        saved = {}

        def keep_h(module, args, kwargs):
            saved["h"] = (args[0] if args else kwargs["hidden_states"])[:, current["visual"]]

        def add(module, args, output):
            attention = output[0] if isinstance(output, tuple) else output
            fit.add(saved.pop("h"), attention[:, current["visual"]])

        return [layer.register_forward_pre_hook(keep_h, with_kwargs=True), layer.self_attn.register_forward_hook(add)]

    # -- costs -------------------------------------------------------------------------------------------
    def flops_costs(self) -> tuple[float, float]:
        """(cost_mlp, cost_attn) = (1, FLOPs saved by one attention skip / by one MLP skip) over these prompts."""
        shape = self.vlm.adapter.decoder_shape(self.vlm.adapter.text_config(self.vlm.model))
        saved_mlp = saved_attn = 0.0
        for item in self.items:
            full = layer_flops(shape, item.layout.length)
            saved_mlp += full - planned_layer_flops(shape, item.layout, LayerPlan(skip_mlp=True))
            saved_attn += full - planned_layer_flops(shape, item.layout, LayerPlan(skip_attn=True))
        return 1.0, saved_attn / saved_mlp

    def describe(self) -> dict[str, Any]:
        return {"model": self.vlm.name, "n_samples": len(self.items), "answer_tokens": self.answer_tokens,
                "positions": self.positions, "sample_ids": [item.sample_id for item in self.items],
                "dtype": str(next(self.vlm.model.parameters()).dtype).removeprefix("torch.")}


def placeholder_ids(model) -> list[int]:
    """Image / video placeholder token ids: never part of an answer (teacher forcing would read them as visual slots)."""
    config = model.config
    ids = (getattr(config, name, None) for name in ("image_token_id", "video_token_id", "image_token_index"))
    return sorted({int(i) for i in ids if i is not None})


def encode_visual_inputs(model, inputs: dict) -> dict:
    """``inputs`` with the vision encoder's outputs precomputed (the stock ``mm_encoder_outputs`` argument, as
    ``generate`` does) in place of the pixels, so that the many forwards of one calibration sample run the vision
    encoder once. The grids stay (positions need them). Models without that argument get ``inputs`` unchanged."""
    supports = getattr(model, "_supports_mm_encoder_outputs", None)
    if supports is None or not supports():
        return dict(inputs)
    encoded, outputs = dict(inputs), {}
    for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        encoder = getattr(model.base_model, f"get_{modality}_features", None)
        if inputs.get(pixels) is None or encoder is None:
            continue
        arguments = {key: inputs[key] for key in inspect.signature(encoder).parameters if key in inputs}
        outputs[modality] = encoder(**arguments, return_dict=True)
        encoded.pop(pixels)
    if outputs:
        encoded["mm_encoder_outputs"] = outputs
    return encoded


def extend_inputs(inputs: dict, tokens: torch.Tensor) -> dict:
    """``inputs`` with ``tokens`` (``[n]``) appended to the prompt: input_ids, attention_mask (ones) and any other
    per-token tensor (e.g. Qwen2.5-VL's ``mm_token_type_ids``: zeros = text)."""
    length = inputs["input_ids"].shape[1]
    extended = dict(inputs)
    extended["input_ids"] = torch.cat([inputs["input_ids"], tokens[None].to(inputs["input_ids"])], dim=1)
    for key, value in inputs.items():
        if key == "input_ids" or not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[1] != length:
            continue
        fill = 1 if key == "attention_mask" else 0
        extended[key] = torch.nn.functional.pad(value, (0, tokens.numel()), value=fill)
    return extended


# ---------------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """A scored policy and the sublayer it added to its parent beam (``op``/``layer`` None for the start)."""

    policy: SkipPolicy
    score: float
    cost: float
    op: str | None = None
    layer: int | None = None
    scalar: float = 1.0

    def rank_key(self) -> tuple:
        return (self.score, -self.cost, -1 if self.layer is None else self.layer, OP_RANK.get(self.op, -1))


@dataclass
class SearchResult:
    policy: SkipPolicy
    score: float
    cost: float
    budget: float
    rounds: list[list[Candidate]] = field(default_factory=list)  # every scored candidate, per round, best first
    calibration: dict = field(default_factory=dict)  # settings and calibration metadata (card §2.2 item 8)
    semantics: str = "visual"  # the layer-skip semantics the policy was searched (and is to be evaluated) with
    objective: str = "reference"  # reference (card §2.2) or seed (the seed's search, layerskip_seed.py)

    def to_dict(self) -> dict[str, Any]:
        return {**self.policy.to_dict(), "semantics": self.semantics, "score": self.score, "cost": self.cost,
                "calibration": self.calibration}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def format(self) -> str:
        """The seed's lines plus the score and the cost."""
        if self.objective == "seed":
            scalars = {layer: self.policy.mlp_scalars.get(layer, 1.0) for layer in self.policy.mlp}
            return (f"Final Score: {self.score}\nSkipped MLPs: {list(self.policy.mlp)}\n"
                    f"Skipped Attns: {list(self.policy.attn)}\nScalars: {scalars}\n"
                    f"(the seed's search: the score is the last round's KL to its parent beam, row mean over "
                    f"{self.calibration.get('positions', '?')} free-running rows; cost {self.cost:g}, budget "
                    f"{self.budget:g}; semantics: seed)")
        return (f"{self.policy.format()}\n"
                f"Final Score {self.score:.6g} (mean KL to the original model over "
                f"{self.calibration.get('positions', '?')} answer positions), cost {self.cost:g} (budget {self.budget:g})")


@dataclass
class SearchSettings:
    budget: float
    beam_width: int = 1
    cost: str = "fixed"  # fixed: cost_mlp / cost_attn; flops: cost_mlp = 1, cost_attn from analytic FLOPs
    cost_mlp: float = 1.0
    cost_attn: float = 0.5
    min_layer: int = 3
    ops: tuple[str, ...] = OPS

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not self.budget >= 0 \
                or not math.isfinite(self.budget):
            raise ValueError(f"budget must be a finite number >= 0, got {self.budget!r}")
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {list(COSTS)}, got {self.cost!r}")
        for name in ("cost_mlp", "cost_attn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.min_layer, bool) or not isinstance(self.min_layer, int) or self.min_layer < 0:
            raise ValueError(f"min_layer must be an integer >= 0, got {self.min_layer!r}")
        self.ops = tuple(self.ops)
        if not self.ops or any(op not in OPS for op in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops must be a non-empty subset of {list(OPS)}, got {list(self.ops)}")


def search(calibration: Calibration, budget: float, beam_width: int = 1, cost: str = "fixed", cost_mlp: float = 1.0,
           cost_attn: float = 0.5, min_layer: int = 3, ops: Sequence[str] = OPS, progress: bool = False) -> SearchResult:
    """Greedy (``beam_width=1``) or beam search for the policy of cost >= ``budget`` with the lowest Score."""
    settings = SearchSettings(budget, beam_width, cost, cost_mlp, cost_attn, min_layer, tuple(ops))
    if settings.min_layer >= calibration.num_layers:
        raise ValueError(f"min_layer={settings.min_layer} is out of range: the model has {calibration.num_layers} "
                         f"decoder layers (valid 0..{calibration.num_layers - 1})")
    if settings.cost == "flops":
        settings.cost_mlp, settings.cost_attn = calibration.flops_costs()
    started, forwards = time.perf_counter(), calibration.forwards
    costs = (settings.cost_mlp, settings.cost_attn)
    start = Candidate(SkipPolicy(), 0.0, 0.0)
    rounds: list[list[Candidate]] = []
    done: list[Candidate] = []
    beams = [start]
    if start.cost >= budget - 1e-9:
        done, beams = [start], []
    bar = tqdm(desc="layerskip search", unit="policy", disable=not progress)
    while beams:
        proposals = _propose(calibration, beams, settings)
        if not proposals:
            warnings.warn(f"layerskip search: no candidate sublayer left before the budget {budget:g} was reached; "
                          f"returning the best policy found (cost {max(b.cost for b in beams):g})", stacklevel=2)
            done += beams
            break
        scored = []
        for parent, op, layer, scalar in proposals:
            child = parent.policy.plus(op, layer, scalar)
            scored.append(Candidate(child, calibration.score(child), child.cost(*costs), op, layer, scalar))
            bar.update(1)
        scored.sort(key=Candidate.rank_key)
        rounds.append(scored)
        beams = scored[:beam_width]
        best = beams[0]
        bar.set_postfix_str(f"round {len(rounds)}: +{best.op} {best.layer} (s={best.scalar:.4f}) "
                            f"score {best.score:.4g} cost {best.cost:g}")
        done += [beam for beam in beams if beam.cost >= budget - 1e-9]
        beams = [beam for beam in beams if beam.cost < budget - 1e-9]
    bar.close()
    winner = min(done, key=Candidate.rank_key)
    metadata = {**calibration.describe(), **dataclasses.asdict(settings), "ops": list(settings.ops),
                "seconds": round(time.perf_counter() - started, 3), "forwards": calibration.forwards - forwards,
                "version": _version()}
    return SearchResult(winner.policy, winner.score, winner.cost, float(budget), rounds, metadata)


def _propose(calibration: Calibration, beams: list[Candidate], settings: SearchSettings) -> list[tuple]:
    """(parent, op, layer, scalar) for every beam's not-yet-skipped sublayers, de-duplicated by skipped sets
    (the first proposer, i.e. the better-ranked beam, keeps a duplicate)."""
    candidate_layers = range(settings.min_layer, calibration.num_layers)
    proposals, seen = [], set()
    for beam in beams:
        free = {op: [layer for layer in candidate_layers if layer not in beam.policy.layers(op)] if op in settings.ops
                else [] for op in OPS}
        mlp_scalars, attn_scalars = calibration.fit(beam.policy, free["mlp"], free["attn"])
        scalars = {"mlp": mlp_scalars, "attn": attn_scalars}
        for layer in candidate_layers:
            for op in settings.ops:
                if layer not in scalars[op]:
                    continue
                key = beam.policy.plus(op, layer).key
                if key in seen:
                    continue
                seen.add(key)
                proposals.append((beam, op, layer, scalars[op][layer]))
    return proposals


def _version() -> str:
    from .. import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------------
# Random policies of equal cost (the baseline a search must beat)
# ---------------------------------------------------------------------------------------------------------
def random_policies(calibration: Calibration, like: SkipPolicy, count: int, min_layer: int = 3, seed: int = 0
                    ) -> list[SkipPolicy]:
    """``count`` distinct random policies with as many MLP and attention skips as ``like`` (so equal cost), over
    layers ``>= min_layer``, none equal to ``like``; each op added in random order with its scalar fitted under
    the policy so far (as the search fits them)."""
    rng = random.Random(seed)
    layers = list(range(min_layer, calibration.num_layers))
    possible = math.comb(len(layers), len(like.mlp)) * math.comb(len(layers), len(like.attn)) - 1
    if count > possible:
        raise ValueError(f"only {possible} other policies with {len(like.mlp)} MLP and {len(like.attn)} attention "
                         f"skips exist over layers {min_layer}..{calibration.num_layers - 1}; asked for {count}")
    keys, drawn = {like.key}, []
    while len(drawn) < count:
        mlp, attn = rng.sample(layers, len(like.mlp)), rng.sample(layers, len(like.attn))
        key = (frozenset(mlp), frozenset(attn))
        if key not in keys:
            keys.add(key)
            order = [("mlp", layer) for layer in mlp] + [("attn", layer) for layer in attn]
            rng.shuffle(order)
            drawn.append(order)
    return [fit_policy(calibration, order) for order in drawn]


def fit_policy(calibration: Calibration, order: Sequence[tuple[str, int]]) -> SkipPolicy:
    """The policy skipping ``order``'s (op, layer) pairs, adding them one at a time, each scalar fitted under the
    policy built so far."""
    policy = SkipPolicy()
    for op, layer in order:
        mlp, attn = calibration.fit(policy, [layer] if op == "mlp" else [], [layer] if op == "attn" else [])
        policy = policy.plus(op, layer, (mlp if op == "mlp" else attn)[layer])
    return policy



# ---------------------------------------------------------------------------------------------------------
# From the Hydra config (python -m tokenprune.calibrate layerskip ...)
# ---------------------------------------------------------------------------------------------------------
OBJECTIVES = ("reference", "seed")


def run_from_config(cfg, export_seed_config: str | None = None) -> tuple[SearchResult, Path]:
    """Load the model and the calibration split, search, print the seed-style policy and write the policy JSON
    (and, with ``export_seed_config``, the policy as the seed's config.json keys)."""
    from omegaconf import OmegaConf

    from ..data import create_dataset
    from ..data.base import dataset_class
    from ..methods.layerskip import export_seed_config as write_seed_config
    from ..models import load_model, model_options
    from .layerskip_seed import SeedCalibration, seed_search

    if OmegaConf.is_missing(cfg, "budget"):
        raise ValueError("budget is required: the cost at which the search stops, e.g. budget=9 "
                         "(an MLP skip costs cost_mlp=1.0, an attention skip cost_attn=0.5)")
    config = OmegaConf.to_container(cfg, resolve=True)
    objective = config.get("objective", "reference")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    settings = SearchSettings(config["budget"], config["beam_width"], config["cost"], config["cost_mlp"],
                              config["cost_attn"], config["min_layer"], tuple(config["ops"] or ()))
    if objective == "seed" and settings.cost != "fixed":
        raise ValueError("objective=seed uses the seed's fixed costs (cost=fixed, cost_mlp / cost_attn), got "
                         f"cost={settings.cost!r}")
    n_samples = config["n_samples"]
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    dataset_fields = dict(config["dataset"])
    dataset_name = dataset_fields.pop("name")
    known = {f.name for f in dataclasses.fields(dataset_class(dataset_name))}
    if config["split"] is not None:
        if "split" in known:
            dataset_fields["split"] = config["split"]
        else:
            warnings.warn(f"dataset {dataset_name!r} has no split: calibration samples may overlap evaluation ones",
                          stacklevel=2)
    if "n_samples" in known:  # a synthetic stream: generate exactly the calibration samples
        dataset_fields.update(limit=n_samples, n_samples=None)
    dataset = create_dataset(dataset_name, **dataset_fields)
    if len(dataset) < n_samples:
        raise ValueError(f"n_samples={n_samples} but dataset {dataset_name!r} has only {len(dataset)} samples")

    model = config["model"]
    torch.manual_seed(config["seed"])
    vlm = load_model(model["name"], path=model.get("path"), weights=model.get("weights", "pretrained"),
                     dtype=model.get("dtype", "float32"), device=model.get("device", "auto"),
                     attn_implementation=model.get("attn_implementation", "sdpa"), options=model_options(model))
    if settings.min_layer >= vlm.info().num_layers:  # before the calibration answers are computed
        raise ValueError(f"min_layer={settings.min_layer} is out of range: the model has {vlm.info().num_layers} "
                         f"decoder layers (valid 0..{vlm.info().num_layers - 1})")
    calibration_samples = [dataset[i] for i in range(n_samples)]
    if objective == "seed":
        calibration = SeedCalibration(vlm, calibration_samples, config["answer_tokens"], progress=config["progress"])
        result = seed_search(calibration, settings.budget, settings.beam_width, settings.cost_mlp, settings.cost_attn,
                             settings.min_layer, settings.ops, progress=config["progress"])
    else:
        calibration = Calibration(vlm, calibration_samples, config["answer_tokens"], progress=config["progress"])
        result = search(calibration, progress=config["progress"], **dataclasses.asdict(settings))
        result.calibration["objective"] = objective
    result.calibration.update(
        model={key: model.get(key) for key in ("name", "path", "weights", "dtype", "attn_implementation")},
        dataset={"name": dataset_name, **dataset_fields}, split=dataset_fields.get("split"), seed=config["seed"])
    output = config["output"] or f"layerskip-{model['name']}-{dataset_name}-budget{settings.budget:g}.json"
    path = result.save(output)
    print(result.format())
    print(f"policy written to {path} (semantics: {result.semantics})")
    if export_seed_config is not None:
        print(seed_config_message(result.policy, export_seed_config, result.semantics, write_seed_config))
    print(f"evaluate: python -m tokenprune method=layerskip method.policy={path} model={model['name']} "
          f"dataset={dataset_name}")
    return result, path


def seed_config_message(policy: SkipPolicy, path: str | Path, semantics: str, write) -> str:
    """Write ``policy`` as the seed's config.json keys (``write``: ``methods.layerskip.export_seed_config``) and say
    what was written."""
    written, updated = write(policy, path)
    message = (f"seed config keys (skip_layer_mlp, skip_layer_attn, mlp_scalars) "
               f"{'set in the existing' if updated else 'written to'} {written}")
    if semantics != "seed":
        message += (f"\nnote: this policy was searched with semantics {semantics!r}; the seed's decoder (and "
                    "tokenprune reading this config) runs it with the seed's semantics")
    return message


def convert_to_seed_config(policy_file: str, path: str) -> str:
    """``--policy FILE --export-seed-config PATH``: an existing policy (any file ``method.policy`` reads) written as
    the seed's config.json keys, without a search."""
    from ..methods.layerskip import export_seed_config as write_seed_config

    method = LayerSkip(policy=policy_file)
    return seed_config_message(method.skip_policy, path, method.resolved_semantics, write_seed_config)
