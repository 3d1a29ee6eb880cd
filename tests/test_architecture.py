"""The architecture holds: import-linter's contracts (pyproject.toml), no private names
imported across modules, and only the Triton runtime loads the kernels."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "hdccf_triton").rglob("*.py")) + sorted((REPO / "kernels").glob("*.py"))


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the contracts of pyproject.toml, on the packages under ``root``."""
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", script, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=root, capture_output=True, text=True, timeout=120, env=env)


def test_import_contracts_are_kept():
    out = lint_imports(REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_import_contracts_catch_a_cycle(tmp_path):
    # the same contracts on a copy of the package with one import added against the layers
    for name in ("hdccf_triton", "kernels"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    terms = tmp_path / "hdccf_triton" / "terms.py"
    terms.write_text(terms.read_text() + "\nfrom . import loss  # noqa: E402  (a cycle: loss imports terms)\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "No import cycles between the modules of any package BROKEN" in out.stdout
    assert "The loss is layered" in out.stdout and "BROKEN" in out.stdout


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["hdccf_triton", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path):
    """(imported module, name or None) of every import statement of ``path``, absolute."""
    module = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, path.name == "__init__.py")
            for alias in node.names:
                yield source, alias.name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_name_is_imported_across_modules(path):
    for source, name in _imports(path):
        if name and name.startswith("_") and not name.startswith("__") and source.startswith("hdccf_triton"):
            pytest.fail(f"{path.relative_to(REPO)} imports the private name {name} of {source}")


def test_only_the_triton_runtime_loads_the_kernels():
    loaders = set()
    for path in SOURCES:
        for source, _ in _imports(path):
            if source.startswith("hdccf_triton.kernels") and not path.is_relative_to(REPO / "kernels"):
                loaders.add(path.relative_to(REPO).as_posix())
    assert loaders == {"hdccf_triton/backends/_triton_runtime.py"}
