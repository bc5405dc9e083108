"""``python -m tokenprune``: the Hydra entry point (thin: config → runner)."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .run.runner import ConfigError, run_benchmark


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        run_benchmark(cfg, command_has_arguments=bool(HydraConfig.get().overrides.task))
    except ConfigError as error:
        print(f"tokenprune: configuration error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
