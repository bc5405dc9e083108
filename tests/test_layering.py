"""Engine v2's structure: the contract is a leaf, no import runs up the layers, the engine has no family branch.

* ``tokenprune/engine/contract.py`` imports nothing of tokenprune: it loads as a standalone file with no tokenprune
  module in ``sys.modules`` (in a fresh interpreter), and its source has no tokenprune import.
* Layers (from every ``import`` in the package, function-level ones included): the engine imports only the
  engine; methods import the engine and methods; model families import the engine, models and data (the
  ``Sample`` type); data imports only data.
* ``grep -riE "qwen|llava|mrope|1d" tokenprune/engine/`` finds nothing but comments.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tokenprune"
CONTRACT = PACKAGE / "engine" / "contract.py"
ALLOWED = {  # layer -> tokenprune layers it may import
    "engine": {"engine"},
    "methods": {"engine", "methods"},
    "models": {"engine", "models", "data"},
    "data": {"data"},
}
FAMILY_WORDS = re.compile(r"qwen|llava|mrope|1d", re.IGNORECASE)


def tokenprune_imports(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` of every tokenprune import in a file (relative imports resolved against ``package``,
    by default the file's own)."""
    package = package or ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] if node.module or not node.level else [f"{module}.{a.name}" for a in node.names]
            found += [(node.lineno, target) for target in targets]
    return [(line, module) for line, module in found if module == "tokenprune" or module.startswith("tokenprune.")]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_contract_imports_nothing_of_tokenprune():
    assert tokenprune_imports(CONTRACT) == []
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('contract', {str(CONTRACT)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['contract'] = module\n"
        "spec.loader.exec_module(module)\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] == 'tokenprune')\n"
        "assert not loaded, loaded\n"
        "assert module.Reduction and module.PrefillStep and module.DecoderInput and module.TokenLayout\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_import_runs_up_the_layers(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    wrong = [f"{path.relative_to(PACKAGE)}:{line} imports {module}"
             for path in files for line, module in tokenprune_imports(path)
             if layer_of(module) not in ALLOWED[layer]]
    assert not wrong, "\n".join(wrong)


def test_the_import_scan_sees_relative_and_function_level_imports(tmp_path):
    """The scan above can fail: a function-level relative import from the engine into models is found."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from ..models import base\n    from . import contract\n    import torch\n")
    assert tokenprune_imports(path, "tokenprune.engine") == [(2, "tokenprune.models"), (3, "tokenprune.engine.contract")]


def family_words_outside_comments(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every match of FAMILY_WORDS outside a ``#`` comment."""
    comments = {}  # line -> column where its comment starts
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.start[1]
    found = []
    for number, line in enumerate(source.splitlines(), start=1):
        for match in FAMILY_WORDS.finditer(line):
            if match.start() < comments.get(number, len(line) + 1):
                found.append((number, line.strip()))
    return found


def test_the_engine_has_no_family_or_rope_kind_branch():
    found = [f"{path.relative_to(PACKAGE)}:{line}: {text}" for path in sorted((PACKAGE / "engine").rglob("*.py"))
             for line, text in family_words_outside_comments(path.read_text())]
    assert not found, "\n".join(found)


def test_the_family_word_scan_can_fail():
    source = 'x = 1  # Qwen2-VL needs this\nif rope == "1d":\n    pass\n"""LLaVA docstring"""\n'
    assert family_words_outside_comments(source) == [(2, 'if rope == "1d":'), (4, '"""LLaVA docstring"""')]
