"""The seed's layer-skip search (``python -m tokenprune.calibrate layerskip objective=seed``), on the seed's decoder.

Card: ``shared/methods/layerskip.md`` §2.1 "Search" (seed script B, ``qwen_beam_search_layer.py``). Every policy runs
with layer skip ``semantics: seed`` (the seed's modified Qwen2.5-VL decoder):

* **A run** of a policy: per calibration sample, the prefill's last logits row and ``rows - 1`` free-running greedy
  steps through the KV cache (no stop at end of sequence), ``rows`` logits rows per sample; and the image rows of
  ``hidden_states[l + 1]`` (the output of layer l; for the last layer, after the final norm).
* **Per beam and round**: the parent run (the beam's policy, its scalars applied); every MLP candidate l (not yet
  skipped, ``l >= min_layer``) runs as the beam plus MLP l **at scalar 1** and is scored by the row mean of
  ``KL(parent || candidate)`` over all samples' rows (log-softmax in the logits' dtype, ``batchmean``); its scalar is
  fitted afterwards as ``<H_parent, H_cand> / <H_cand, H_cand>`` over the flattened image rows of
  ``hidden_states[l + 1]`` in float64, rounded to float32 as the seed's ``.float().item()`` does (1.0 when the
  denominator is 0). Every attention candidate is scored the same way, without a scalar.
* **Selection**: the candidates of all beams are pooled (beams in order; per beam the MLP candidates by layer, then
  the attention candidates) and sorted by raw score (a stable sort: ties keep that order; no de-duplication);
  the best ``beam_width`` continue; those whose cost (parent cost + 1.0 per MLP / 0.5 per attention) reaches the
  budget are done. The loop ends when no beam is active (or no candidate is left: the active beams count as done
  if none is); the done beam with the lowest raw score wins.

Scores are incremental (each against its own parent beam) and so not comparable across rounds (card §7 pitfall 5).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.sample import Sample
from ..engine.apply import apply
from ..engine.compat import cache_kwargs, output_cache
from ..engine.contract import IMAGE
from ..methods.layerskip import SEED_FAMILIES, LayerSkip, SkipPolicy
from .layerskip import Candidate, SearchResult, SearchSettings, _version, encode_visual_inputs


@dataclass
class SeedItem:
    sample_id: str
    prompt: dict  # model inputs, vision encoder outputs precomputed
    image_rows: torch.Tensor  # [n_image] rows of the seed's visual mask (image pads)


@dataclass
class SeedRun:
    """What one policy gives on the calibration samples."""

    logits: torch.Tensor  # [n_samples * rows, V] in the model's dtype (CPU)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer l -> [sum n_image, d] of hidden_states[l+1]


def seed_kl(parent: torch.Tensor, candidate: torch.Tensor) -> float:
    """Row mean of KL(parent || candidate) over logits rows ``[N, V]`` (the seed's ``F.kl_div(..., 'batchmean')``)."""
    return float(F.kl_div(F.log_softmax(candidate, dim=-1), F.log_softmax(parent, dim=-1), reduction="batchmean",
                          log_target=True))


def seed_scalar(parent: torch.Tensor, candidate: torch.Tensor) -> float:
    """``<H_parent, H_cand> / <H_cand, H_cand>`` over the flattened rows in float64, rounded to float32 (1.0 for a
    zero denominator)."""
    parent, candidate = parent.reshape(-1).double(), candidate.reshape(-1).double()
    norm = torch.dot(candidate, candidate)
    if norm == 0:
        return 1.0
    return float((torch.dot(parent, candidate) / norm).float())


class SeedCalibration:
    """Calibration samples for the seed's search (batch size 1; the seed's runs use the KV cache)."""

    def __init__(self, vlm, samples: Sequence[Sample], rows: int = 10, progress: bool = False):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"answer_tokens must be an integer >= 1, got {rows!r}")
        if not samples:
            raise ValueError("calibration needs at least one sample (n_samples >= 1)")
        family = vlm.info().family
        if family not in SEED_FAMILIES:
            raise ValueError(f"objective=seed runs the seed's modified Qwen2.5-VL decoder (layer skip semantics "
                             f"'seed'), defined for the model families {list(SEED_FAMILIES)}; got {family!r}: use "
                             "objective=reference")
        self.vlm = vlm
        self.rows = rows
        self.text_model = vlm.adapter.text_model(vlm.model)
        self.layers = list(self.text_model.layers)
        self.forwards = 0  # calibration runs (prefill + rows - 1 steps per sample), for benchmarks
        self.items = []
        for sample in tqdm(samples, desc="calibration inputs", disable=not progress):
            prompt = vlm.prepare(sample)
            image_rows = (prompt.layout.kind == IMAGE).nonzero().flatten()
            if image_rows.numel() == 0:
                raise ValueError(f"calibration sample {sample.id!r} has no image tokens (the seed's visual rows)")
            with torch.no_grad():
                encoded = encode_visual_inputs(vlm.model, prompt)
            self.items.append(SeedItem(str(sample.id), encoded, image_rows))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def run(self, policy: SkipPolicy, hidden_layers: Sequence[int] = ()) -> SeedRun:
        """``policy`` under the seed's decoder: logits rows of every sample, and the image rows of
        ``hidden_states[l + 1]`` for each l in ``hidden_layers``."""
        model = self.vlm.model
        captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in hidden_layers}
        current: dict = {}
        handles = [self._output_module(layer).register_forward_hook(self._keep(layer, captured, current))
                   for layer in hidden_layers]
        logits = []
        try:
            with torch.no_grad(), apply(model, LayerSkip.from_policy(policy, semantics="seed")):
                for item in self.items:
                    current["rows"] = item.image_rows  # the prefill's image rows; decoding steps keep nothing
                    out = model(**item.prompt, use_cache=True, logits_to_keep=1)
                    current.pop("rows")
                    step = out.logits[:, -1]  # [1, V]
                    logits.append(step.cpu())
                    cache = output_cache(out)
                    for _ in range(self.rows - 1):  # free-running greedy steps, no stop at end of sequence
                        token = step.argmax(-1, keepdim=True)  # [1, 1]
                        out = model(input_ids=token, use_cache=True, **cache_kwargs(type(model).forward, cache))
                        step = out.logits[:, -1]
                        logits.append(step.cpu())
                        cache = output_cache(out)
                    self.forwards += 1
        finally:
            for handle in handles:
                handle.remove()
        return SeedRun(torch.cat(logits), {layer: torch.cat(rows) for layer, rows in captured.items()})

    def _output_module(self, layer: int):
        """The module whose output is ``hidden_states[layer + 1]``: layer ``layer``, or the final norm after the last."""
        return self.text_model.norm if layer == self.num_layers - 1 else self.layers[layer]

    @staticmethod
    def _keep(layer: int, captured: dict, current: dict):
        def hook(module, args, output):
            rows = current.get("rows")
            if rows is not None:
                hidden = output[0] if isinstance(output, tuple) else output  # [1, L, d]
                captured[layer].append(hidden[0, rows].cpu())

        return hook

    def describe(self) -> dict:
        return {"model": self.vlm.name, "n_samples": len(self.items), "answer_tokens": self.rows,
                "positions": self.rows * len(self.items), "sample_ids": [item.sample_id for item in self.items],
                "dtype": str(next(self.vlm.model.parameters()).dtype).removeprefix("torch.")}


def seed_search(calibration: SeedCalibration, budget: float, beam_width: int = 1, cost_mlp: float = 1.0,
                cost_attn: float = 0.5, min_layer: int = 3, ops: Sequence[str] = ("mlp", "attn"),
                progress: bool = False) -> SearchResult:
    """The seed's beam search (``beam_width=1``: its greedy setting) for a policy of cost >= ``budget``."""
    settings = SearchSettings(budget, beam_width, "fixed", cost_mlp, cost_attn, min_layer, tuple(ops))
    if settings.min_layer >= calibration.num_layers:
        raise ValueError(f"min_layer={settings.min_layer} is out of range: the model has {calibration.num_layers} "
                         f"decoder layers (valid 0..{calibration.num_layers - 1})")
    started, forwards = time.perf_counter(), calibration.forwards
    candidates = range(settings.min_layer, calibration.num_layers)
    costs = {"mlp": settings.cost_mlp, "attn": settings.cost_attn}
    active = [Candidate(SkipPolicy(), 0.0, 0.0)]
    done: list[Candidate] = []
    rounds: list[list[Candidate]] = []
    bar = tqdm(desc="layerskip seed search", unit="policy", disable=not progress)
    while active:
        pooled = []
        for beam in active:
            free = {op: [layer for layer in candidates if layer not in beam.policy.layers(op)] if op in settings.ops
                    else [] for op in ("mlp", "attn")}
            parent = calibration.run(beam.policy, free["mlp"])
            for op in ("mlp", "attn"):
                for layer in free[op]:
                    child = beam.policy.plus(op, layer)  # the candidate's own MLP at scale 1
                    run = calibration.run(child, [layer] if op == "mlp" else [])
                    scalar = seed_scalar(parent.hidden[layer], run.hidden[layer]) if op == "mlp" else 1.0
                    pooled.append(Candidate(beam.policy.plus(op, layer, scalar), seed_kl(parent.logits, run.logits),
                                            beam.cost + costs[op], op, layer, scalar))
                    bar.update(1)
        if not pooled:
            warnings.warn(f"layerskip seed search: no candidate sublayer left before the budget {budget:g} was "
                          "reached", stacklevel=2)
            done = done or active
            break
        pooled.sort(key=lambda candidate: candidate.score)  # stable: ties keep the pooled order
        rounds.append(pooled)
        best = pooled[:beam_width]
        bar.set_postfix_str(f"round {len(rounds)}: +{best[0].op} {best[0].layer} (s={best[0].scalar:.4f}) "
                            f"score {best[0].score:.4g} cost {best[0].cost:g}")
        done += [candidate for candidate in best if candidate.cost >= budget]
        active = [candidate for candidate in best if candidate.cost < budget]
    bar.close()
    winner = sorted(done, key=lambda candidate: candidate.score)[0]
    metadata = {**calibration.describe(), "budget": budget, "beam_width": beam_width, "cost": "fixed",
                "cost_mlp": settings.cost_mlp, "cost_attn": settings.cost_attn, "min_layer": settings.min_layer,
                "ops": list(settings.ops), "objective": "seed", "seconds": round(time.perf_counter() - started, 3),
                "forwards": calibration.forwards - forwards, "version": _version()}
    return SearchResult(winner.policy, winner.score, winner.cost, float(budget), rounds, metadata,
                        semantics="seed", objective="seed")
