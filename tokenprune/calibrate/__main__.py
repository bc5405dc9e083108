"""``python -m tokenprune.calibrate <search> key=value ...``: searches that write a method's policy.

    python -m tokenprune.calibrate layerskip model=qwen25vl_7b model.path=/models/Qwen2.5-VL-7B-Instruct \\
        dataset=synthetic_image n_samples=20 beam_width=1 budget=9

Overrides use Hydra syntax over ``tokenprune/conf/calibrate.yaml`` and the ``model/`` and ``dataset/`` groups.

Layer skip only: ``--export-seed-config PATH`` also writes the searched policy as the seed's config.json keys
(``skip_layer_mlp``, ``skip_layer_attn``, ``mlp_scalars``; an existing JSON object at PATH, e.g. a checkpoint's
config.json, keeps its other keys); with ``--policy FILE`` it converts an existing policy file without searching.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from . import layerskip

# search name -> (primary config in tokenprune/conf, runner taking the composed config)
SEARCHES = {"layerskip": ("calibrate", layerskip.run_from_config)}
USAGE = ("usage: python -m tokenprune.calibrate <search> [key=value ...] [--export-seed-config PATH [--policy FILE]]\n"
         f"searches: {', '.join(SEARCHES)}\n"
         "example: python -m tokenprune.calibrate layerskip model=tiny_llava dataset=synthetic_image "
         "n_samples=20 beam_width=1 budget=4\n"
         "the seed's search and config: python -m tokenprune.calibrate layerskip model=qwen25vl_7b objective=seed "
         "budget=9 --export-seed-config /models/Qwen2.5-VL-7B-seed/config.json")
FLAGS = ("--export-seed-config", "--policy")  # layer skip: seed config.json export / conversion of a policy file


def pop_flags(argv: list[str]) -> dict[str, str]:
    """Remove ``--flag VALUE`` / ``--flag=VALUE`` of ``FLAGS`` from ``argv``; ``{"export_seed_config": ...}``."""
    flags, rest = {}, []
    arguments = iter(argv)
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if name not in FLAGS:
            rest.append(argument)
            continue
        if not equals:
            value = next(arguments, None)
            if value is None or value.startswith("--"):
                raise ValueError(f"{name} needs a path")
        flags[name.removeprefix("--").replace("-", "_")] = value
    argv[:] = rest
    return flags


HELP_FLAGS = ("-h", "--help")


def search_help(name: str, config_name: str) -> str:
    """A search's help: what it does, its fields with their defaults and meanings (its YAML), the groups."""
    conf = Path(__file__).resolve().parent.parent / "conf"
    fields = (conf / f"{config_name}.yaml").read_text()
    groups = {group: sorted(p.stem for p in (conf / group).glob("*.yaml")) for group in ("model", "dataset")}
    return "\n".join([f"usage: python -m tokenprune.calibrate {name} [key=value ...]", "",
                      f"Fields (override as key=value; from tokenprune/conf/{config_name}.yaml):", "", fields.rstrip(),
                      "", *(f"{group}= one of: {', '.join(names)} (and {group}.<field>=...)"
                            for group, names in groups.items())])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS:
        print(USAGE)
        return 0 if argv else 2
    name, overrides = argv[0], argv[1:]
    if name not in SEARCHES:
        print(f"error: unknown search {name!r}; available: {', '.join(SEARCHES)}\n{USAGE}", file=sys.stderr)
        return 2
    config_name, run = SEARCHES[name]
    if any(flag in overrides for flag in HELP_FLAGS):
        print(search_help(name, config_name))
        return 0
    try:
        flags = pop_flags(overrides)
        if "policy" in flags:
            if "export_seed_config" not in flags or overrides:
                raise ValueError("--policy FILE converts a policy file: give it with --export-seed-config PATH only "
                                 "(no search settings)")
            print(layerskip.convert_to_seed_config(flags["policy"], flags["export_seed_config"]))
            return 0
        with initialize_config_module(config_module="tokenprune.conf", version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides)
        run(cfg, **flags)
    except (ValueError, HydraException, OmegaConfBaseException) as error:  # bad configuration: a clear message
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
