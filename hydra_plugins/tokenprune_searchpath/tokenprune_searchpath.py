"""Puts configuration directories outside the package on tokenprune's Hydra search path: ``./conf`` (in the
working directory, e.g. the repository's top-level ``conf/`` with its experiment presets) and every directory
listed in ``$TOKENPRUNE_CONF`` (separated by ``os.pathsep``). They come after the package's own configuration:
a YAML there adds a name (``experiment=pdrop_llava15_7b_textvqa``, ``model=my_vlm``); the package's names keep
their meaning. Only tokenprune's applications are affected.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "tokenprune-user-conf"


def user_conf_dirs() -> list[Path]:
    listed = [Path(p) for p in os.environ.get("TOKENPRUNE_CONF", "").split(os.pathsep) if p]
    return [d.resolve() for d in [*listed, Path.cwd() / "conf"] if d.is_dir()]


class TokenpruneSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        paths = [element.path or "" for element in search_path.get_path()]
        if not any(path.replace("/", ".").endswith("tokenprune.conf") for path in paths):
            return  # another Hydra application
        known = set(paths)
        for directory in dict.fromkeys(user_conf_dirs()):
            if str(directory) not in known and not (directory / "__init__.py").exists():  # not a package's conf
                search_path.append(provider=PROVIDER, path=f"file://{directory}")
