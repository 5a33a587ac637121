"""The module layering in pyproject.toml ([tool.importlinter]) holds: `lint-imports` reads
every import statement, function-level ones included, and fails on any upward import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    return str(exe) if exe.is_file() else (shutil.which("lint-imports") or "lint-imports")


def test_import_contracts_are_kept():
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_every_package_is_in_a_layer():
    """A new top-level module must be placed in the contract, or it escapes the check."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    layers = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"][0]["layers"]
    named = {m.strip() for layer in layers for m in layer.split("|")}
    src = REPO_ROOT / "src" / "effusion"
    modules = {f"effusion.{p.stem}" for p in src.iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert modules == named, f"not in a layer: {sorted(modules - named)}; " \
                             f"no such module: {sorted(named - modules)}"
