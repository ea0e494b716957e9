"""The scripts under ``eval/`` run after a plain ``pip install -e .``: of this repository they import
only the ``mtrl`` package, and only its public names (no ``tests``, no ``_private`` helpers).

Checked statically with ``ast`` (the scripts are not run): every ``import``, ``from ... import``
(at any depth, function bodies included) and every ``module._name`` attribute access on a name
bound by an ``mtrl`` import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVAL_SCRIPTS = sorted((ROOT / "eval").glob("*.py"))
# Top-level names of this repository other than the package: importing them needs the clone.
LOCAL_TOP_LEVEL = {name for name in (p.name if p.is_dir() else p.stem for p in ROOT.iterdir()
                                      if p.is_dir() or p.suffix == ".py")
                   if name.isidentifier() and name != "mtrl"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_problems(source: str, filename: str = "<script>") -> list[str]:
    """What a script imports from this repository that a user's installed ``mtrl`` would not provide."""
    tree = ast.parse(source, filename)
    problems: list[str] = []
    mtrl_names: set[str] = set()  # local names bound to mtrl modules or objects

    def check_module(module: str, line: int) -> bool:
        """True when ``module`` is part of mtrl; records a problem for repository-local or private modules."""
        top = module.split(".")[0]
        if top == "mtrl":
            if any(_private(part) for part in module.split(".")):
                problems.append(f"{filename}:{line}: imports private module {module}")
            return True
        if top in LOCAL_TOP_LEVEL:
            problems.append(f"{filename}:{line}: imports {module}, which is not part of the mtrl package")
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if check_module(alias.name, node.lineno):
                    mtrl_names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                problems.append(f"{filename}:{node.lineno}: relative import (scripts are not in a package)")
                continue
            if check_module(node.module or "", node.lineno):
                for alias in node.names:
                    if _private(alias.name):
                        problems.append(f"{filename}:{node.lineno}: imports private {node.module}.{alias.name}")
                    mtrl_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in mtrl_names:
                problems.append(f"{filename}:{node.lineno}: uses private {ast.unparse(node)}")
    return problems


def test_there_are_scripts():
    assert EVAL_SCRIPTS, "no scripts found under eval/"
    assert "tests" in LOCAL_TOP_LEVEL


@pytest.mark.parametrize("script", EVAL_SCRIPTS, ids=lambda p: p.name)
def test_eval_script_imports_only_public_mtrl(script: Path):
    assert import_problems(script.read_text(encoding="utf-8"), str(script.relative_to(ROOT))) == []


@pytest.mark.parametrize("script", EVAL_SCRIPTS, ids=lambda p: p.name)
def test_eval_script_does_not_edit_sys_path(script: Path):
    """A ``sys.path`` edit is how a script would reach ``tests`` or a source tree instead of the install."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    edits = [n.lineno for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    assert edits == [], f"{script.name}: sys.path used on lines {edits}"


@pytest.mark.parametrize("source, expected", [
    ("from tests.fixtures.models import build_tiny_causal", "not part of the mtrl package"),
    ("import tests.fixtures", "not part of the mtrl package"),
    ("def f():\n    from eval.bench_ppo import main", "not part of the mtrl package"),
    ("from mtrl.rewards.alignment import _tables, token_offsets", "private mtrl.rewards.alignment._tables"),
    ("from mtrl._private import x", "private module mtrl._private"),
    ("import mtrl.rewards.alignment as al\nal._fast_offsets(1, 2, 3)", "private al._fast_offsets"),
    ("from mtrl import alignment\nalignment._tables(None)", "private alignment._tables"),
    ("from . import helpers", "relative import"),
])
def test_checker_catches(source: str, expected: str):
    problems = import_problems(source)
    assert len(problems) == 1 and expected in problems[0], problems


def test_checker_allows_public_and_third_party():
    source = ("import torch\nimport pandas as pd\nfrom mtrl.testing import build_tiny_seq2seq\n"
              "import mtrl.rewards.alignment as al\nal.token_offsets\nfrom mtrl import __version__\npd._libs\n")
    assert import_problems(source) == []
