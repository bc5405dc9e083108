"""Layer skip for visual tokens, with a scalar per skipped sublayer (seed: pigmeetsomebody/VLMEvalKit; ShortV).

Card: ``shared/methods/layerskip.md``. In the listed decoder layers the visual rows

* skip the MLP (``mlp``): ``h' = s_l * u``, u the post-attention residual (text rows: ``u + MLP(LN2(u))``);
* stop being attention queries (``attn``): ``u = a_l * h``; their keys and values are still computed and cached,
  so text rows attend to them as usual.

Text rows run the full layer; decoding runs full layers (new tokens are text). That is ``semantics: visual``,
tokenprune's correction of the seed (card §2.2). ``semantics: seed`` is the seed's modified Qwen2.5-VL decoder
(card §2.1): a skipped attention is skipped for every token (no norm, projections or KV-cache entry), in the
prefill and in decoding; a skipped MLP gives every prefill row ``s * u`` plus, on non-image rows, ``MLP(LN2(u))``
(text residuals are scaled too; video pads count as text), and decoding runs the full MLP.

The policy comes inline (``mlp``, ``attn``, ``scalars``, ``attn_scalars``) or from ``policy=<file>``: a policy
JSON / YAML written by ``python -m tokenprune.calibrate layerskip`` (it records its ``semantics``), or a model
``config.json`` (or its directory) carrying the seed's keys ``skip_layer_mlp`` / ``skip_layer_attn`` /
``mlp_scalars``, which runs with ``semantics: seed`` unless ``semantics`` is given.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..engine.contract import IMAGE, VIDEO
from .base import LayerPlan, Method, ModelInfo, check_layer, register

log = logging.getLogger("tokenprune")

OPS = ("mlp", "attn")
POLICY_KEYS = ("skip_layer_mlp", "skip_layer_attn", "mlp_scalars", "attn_scalars")
SEED_KEYS = ("skip_layer_mlp", "skip_layer_attn", "mlp_scalars")  # what the seed's decoder reads from config.json
SEMANTICS = ("visual", "seed")
SEED_FAMILIES = ("qwen25vl",)  # the seed patched Qwen2.5-VL's decoder only (card §2.1)
MODEL_CONFIG_KEYS = ("model_type", "architectures")  # a file with one of these is a model config.json


@dataclass
class SkipPolicy:
    """Which layers skip which sublayer for visual rows, and the scalars (1.0 where absent).

    ``mlp`` / ``attn`` keep the order in which a search selected the layers.
    """

    mlp: tuple[int, ...] = ()
    attn: tuple[int, ...] = ()
    mlp_scalars: dict[int, float] = field(default_factory=dict)
    attn_scalars: dict[int, float] = field(default_factory=dict)

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_fields(cls, mlp, attn, mlp_scalars, attn_scalars, where: str, names: Mapping[str, str]) -> "SkipPolicy":
        """Validated policy; errors read ``{where}.{names[key]}`` (e.g. ``layerskip.mlp[2]``)."""
        layers = {}
        for key, value in (("skip_layer_mlp", mlp), ("skip_layer_attn", attn)):
            name = names[key]
            if value is None:
                value = []
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or isinstance(value, Mapping):
                raise ValueError(f"{where}.{name} must be a list of layer indices, got {value!r}")
            value = list(value)
            for i, layer in enumerate(value):
                check_layer(where, f"{name}[{i}]", layer, minimum=0)
            duplicates = sorted({layer for layer in value if value.count(layer) > 1})
            if duplicates:
                raise ValueError(f"{where}.{name} lists layer(s) {duplicates} more than once: {value}")
            layers[key] = tuple(value)
        scalars = {}
        for key, value, op_key in (("mlp_scalars", mlp_scalars, "skip_layer_mlp"),
                                   ("attn_scalars", attn_scalars, "skip_layer_attn")):
            scalars[key] = _parse_scalars(value, f"{where}.{names[key]}", layers[op_key], f"{where}.{names[op_key]}")
        return cls(layers["skip_layer_mlp"], layers["skip_layer_attn"], scalars["mlp_scalars"], scalars["attn_scalars"])

    @classmethod
    def from_mapping(cls, data: Mapping, where: str) -> "SkipPolicy":
        """From the seed / policy-file keys (``skip_layer_mlp``, ``skip_layer_attn``, ``mlp_scalars``, ``attn_scalars``)."""
        return cls.from_fields(*(data.get(key) for key in POLICY_KEYS), where=where,
                               names={key: key for key in POLICY_KEYS})

    @classmethod
    def load(cls, path: str | Path) -> "SkipPolicy":
        """Read a policy JSON / YAML file, a model ``config.json``, or a directory holding one."""
        return cls.load_with_semantics(path)[0]

    @classmethod
    def load_with_semantics(cls, path: str | Path) -> tuple["SkipPolicy", str, str]:
        """The policy of a file, the semantics it implies and why: the file's ``semantics`` key (policy files of the
        search record it); ``seed`` for a model config.json (the seed's workflow: its keys edited into the
        checkpoint's config); ``visual`` otherwise."""
        where = f"layerskip.policy ({path})"
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text()
        except OSError as error:
            raise ValueError(f"{where}: cannot read the policy file: {error.strerror or error}") from error
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ValueError(f"{where}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping with keys {list(POLICY_KEYS)}, got {type(data).__name__}")
        semantics, reason = "visual", "a policy file without a semantics key"
        if "semantics" in data:
            semantics, reason = data["semantics"], "the file's semantics key"
            if semantics not in SEMANTICS:
                raise ValueError(f"{where}.semantics must be one of {list(SEMANTICS)}, got {semantics!r}")
        elif any(key in data for key in MODEL_CONFIG_KEYS):
            semantics, reason = "seed", "a model config.json with the seed's keys"
        if not any(key in data for key in POLICY_KEYS) and isinstance(data.get("text_config"), Mapping):
            data = data["text_config"]  # a model config.json may carry the keys in its text config
        if not any(key in data for key in POLICY_KEYS):
            raise ValueError(f"{where}: has none of the policy keys {list(POLICY_KEYS)}")
        return cls.from_mapping(data, where), semantics, reason

    # -- derived -----------------------------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        return not (self.mlp or self.attn)

    @property
    def key(self) -> tuple[frozenset[int], frozenset[int]]:
        """Identity of the skipped sets (selection order and scalars aside), for de-duplicating beams."""
        return frozenset(self.mlp), frozenset(self.attn)

    def layers(self, op: str) -> tuple[int, ...]:
        return self.mlp if op == "mlp" else self.attn

    def cost(self, cost_mlp: float, cost_attn: float) -> float:
        return cost_mlp * len(self.mlp) + cost_attn * len(self.attn)

    def plus(self, op: str, layer: int, scalar: float = 1.0) -> "SkipPolicy":
        """This policy with one more skipped sublayer (``op`` = "mlp" or "attn")."""
        if op == "mlp":
            return SkipPolicy(self.mlp + (layer,), self.attn, {**self.mlp_scalars, layer: float(scalar)},
                              dict(self.attn_scalars))
        return SkipPolicy(self.mlp, self.attn + (layer,), dict(self.mlp_scalars),
                          {**self.attn_scalars, layer: float(scalar)})

    def plans(self, semantics: str = "visual") -> dict[int, LayerPlan]:
        """``{layer: LayerPlan}`` for every layer that skips something (``semantics``: "visual" or "seed")."""
        seed = semantics == "seed"
        return {
            layer: LayerPlan(skip_attn=layer in self.attn, skip_mlp=layer in self.mlp,
                             mlp_scale=self.mlp_scalars.get(layer, 1.0), attn_scale=self.attn_scalars.get(layer, 1.0),
                             attn_all_rows=seed, mlp_scales_text=seed, skip_kinds=(IMAGE,) if seed else (IMAGE, VIDEO))
            for layer in sorted(set(self.mlp) | set(self.attn))
        }

    def to_dict(self) -> dict[str, Any]:
        """The policy-file / seed-config form (scalar keys are strings, as in the seed's config)."""
        return {
            "skip_layer_mlp": list(self.mlp),
            "skip_layer_attn": list(self.attn),
            "mlp_scalars": {str(layer): self.mlp_scalars.get(layer, 1.0) for layer in self.mlp},
            "attn_scalars": {str(layer): self.attn_scalars.get(layer, 1.0) for layer in self.attn},
        }

    def to_seed_config(self) -> dict[str, Any]:
        """The seed's config.json keys (``skip_layer_mlp``, ``skip_layer_attn``, ``mlp_scalars`` with string keys)."""
        scaled = {layer: value for layer, value in self.attn_scalars.items() if value != 1.0}
        if scaled:
            raise ValueError(f"attention scalars {scaled} cannot be written as the seed's config: the seed skips a "
                             "listed attention for every token, without a scalar")
        data = self.to_dict()
        return {key: data[key] for key in SEED_KEYS}

    def format(self, digits: int = 4) -> str:
        """Seed-style lines: ``Skipped MLPs: [...]``, ``Skipped Attns: [...]``, ``Scalars: {...}``."""
        mlp_scalars = {layer: round(self.mlp_scalars.get(layer, 1.0), digits) for layer in self.mlp}
        lines = [f"Skipped MLPs: {list(self.mlp)}", f"Skipped Attns: {list(self.attn)}", f"Scalars: {mlp_scalars}"]
        if any(value != 1.0 for value in self.attn_scalars.values()):
            lines.append(f"Attn scalars: { {layer: round(self.attn_scalars[layer], digits) for layer in self.attn} }")
        return "\n".join(lines)


def _parse_scalars(value, name: str, layers: tuple[int, ...], layers_name: str) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping {{layer: scalar}}, got {value!r}")
    scalars = {}
    for key, scalar in value.items():
        try:
            layer = int(key) if not isinstance(key, bool) else None
        except (TypeError, ValueError):
            layer = None
        if layer is None or str(layer) != str(key).strip():
            raise ValueError(f"{name} keys must be layer indices (int or digit strings), got {key!r}")
        if layer not in layers:
            raise ValueError(f"{name} has a scalar for layer {layer}, which {layers_name} does not skip ({list(layers)})")
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or not math.isfinite(scalar):
            raise ValueError(f"{name}[{key!r}] must be a finite number, got {scalar!r}")
        if layer in scalars:
            raise ValueError(f"{name} gives layer {layer} twice")
        scalars[layer] = float(scalar)
    return scalars


@register("layerskip")
@dataclass
class LayerSkip(Method):
    """Visual rows skip the MLP (``mlp``) and/or the attention queries (``attn``) of the listed layers."""

    mlp: list[int] = field(default_factory=list)  # layers whose MLP visual rows skip: h <- scalars[l] * u
    attn: list[int] = field(default_factory=list)  # layers where visual rows are not attention queries
    scalars: dict = field(default_factory=dict)  # {layer: s_l} for MLP-skipped layers (default 1.0)
    attn_scalars: dict = field(default_factory=dict)  # {layer: a_l} for attention-skipped layers (default 1.0)
    policy: str | None = None  # a policy file (JSON / YAML / model config.json) instead of the four fields above
    # "visual" (tokenprune's correction: visual rows only, KV kept) or "seed" (the seed's Qwen2.5-VL decoder);
    # null: "seed" for a model config.json with the seed's keys, the recorded one for a policy file, else "visual"
    semantics: str | None = None

    def __post_init__(self):
        if self.semantics is not None and self.semantics not in SEMANTICS:
            raise ValueError(f"layerskip.semantics must be one of {list(SEMANTICS)} or null (visual, or seed for "
                             f"a seed config.json), got {self.semantics!r}")
        names = {"skip_layer_mlp": "mlp", "skip_layer_attn": "attn", "mlp_scalars": "scalars",
                 "attn_scalars": "attn_scalars"}
        inline = SkipPolicy.from_fields(self.mlp, self.attn, self.scalars, self.attn_scalars, self.name, names)
        self.mlp, self.attn = list(inline.mlp), list(inline.attn)
        self.scalars, self.attn_scalars = dict(inline.mlp_scalars), dict(inline.attn_scalars)
        if self.policy is not None:
            if not inline.is_empty or inline.mlp_scalars or inline.attn_scalars:
                raise ValueError("layerskip: give the policy either as policy=<file> or inline "
                                 "(mlp, attn, scalars, attn_scalars), not both")
            if not isinstance(self.policy, (str, Path)):
                raise ValueError(f"layerskip.policy must be a file path or null, got {self.policy!r}")
            self.policy = str(self.policy)
            self.skip_policy, implied, reason = SkipPolicy.load_with_semantics(self.policy)
            self._layer_names = {op: f"policy ({self.policy}) skip_layer_{op}" for op in OPS}
            self._scalar_name = f"policy ({self.policy}) attn_scalars"
            self.resolved_semantics = self.semantics or implied
            if self.semantics is None and implied == "seed":
                log.info("layerskip: %s is %s: running it with semantics 'seed' (the seed's decoder: a listed "
                         "attention skipped for every token, text residuals scaled too); set "
                         "method.semantics=visual for tokenprune's visual-row skip", self.policy, reason)
        else:
            self.skip_policy = inline
            self._layer_names = {op: op for op in OPS}
            self._scalar_name = f"{self.name}.attn_scalars"
            self.resolved_semantics = self.semantics or "visual"
        if self.resolved_semantics == "seed":
            scaled = {layer: value for layer, value in self.skip_policy.attn_scalars.items() if value != 1.0}
            if scaled:
                raise ValueError(f"{self._scalar_name} {scaled}: semantics 'seed' skips a listed attention for every "
                                 "token, without a scalar (use semantics 'visual' for attention scalars)")
        self._plans = self.skip_policy.plans(self.resolved_semantics)

    @classmethod
    def from_policy(cls, policy: SkipPolicy, semantics: str = "visual") -> "LayerSkip":
        return cls(mlp=list(policy.mlp), attn=list(policy.attn), scalars=dict(policy.mlp_scalars),
                   attn_scalars=dict(policy.attn_scalars), semantics=semantics)

    def validate(self, model: ModelInfo) -> None:
        if self.resolved_semantics == "seed" and model.family not in SEED_FAMILIES:
            raise ValueError(f"layerskip.semantics='seed' is the seed's modified Qwen2.5-VL decoder, defined for the "
                             f"model families {list(SEED_FAMILIES)}; got {model.family!r}: use semantics 'visual' "
                             "(tokenprune's visual-row skip, defined for every family)")
        for op in OPS:
            for i, layer in enumerate(self.skip_policy.layers(op)):
                check_layer(self.name, f"{self._layer_names[op]}[{i}]", layer, model, minimum=0)

    @property
    def uses_layer_plan(self) -> bool:
        return bool(self._plans)  # an empty policy installs nothing: the stock forward runs

    def layer_plan(self, layer: int, layout) -> LayerPlan | None:
        return self._plans.get(layer)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "resolved_policy": self.skip_policy.to_dict(),
                "resolved_semantics": self.resolved_semantics}


def export_seed_config(policy: SkipPolicy, path: str | Path) -> tuple[Path, bool]:
    """Write ``policy`` as the seed's config.json keys. An existing JSON object at ``path`` (e.g. a checkpoint's
    config.json, the seed's workflow) keeps every other key; otherwise a file with the three keys is written.
    Returns the path and whether an existing file was updated."""
    path = Path(path)
    keys = policy.to_seed_config()
    data: dict[str, Any] = {}
    existed = path.is_file()
    if existed:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--export-seed-config {path}: exists and is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"--export-seed-config {path}: exists and is not a JSON object")
    data.update(keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path, existed
