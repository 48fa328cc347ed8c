"""Layout rules from DESIGN.md: no stdlib shadowing, complete wheel, import boundaries."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"operator": "moeshard.operator", "engine": "moeshard.engine", "kernels": "moeshard.kernels"}


def _modules(folder: str) -> list[str]:
    names = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT / folder).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        names.append(".".join([PACKAGES[folder], *parts]))
    return names


def test_stdlib_operator_not_shadowed_from_repo_root():
    for folder in PACKAGES:
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py shadows the standard library"
    result = subprocess.run(
        [sys.executable, "-c", "import collections, operator; operator.itemgetter(0)"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


def test_operator_modules_never_import_torch():
    modules = _modules("operator")
    assert "moeshard.operator.planner" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from moeshard.operator.cli import build_parser\n"
        "build_parser().format_help()\n"
        "bad = [m for m in ('torch', 'triton', 'transformers') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing the operator (and building the CLI) imported {result.stdout.strip()}"


def _imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside kernels/ stays inside kernels/
                names.add("." * node.level + (node.module or ""))
            else:
                names.add(node.module or "")
    return names


def test_kernels_import_nothing_from_operator_or_engine():
    files = sorted((ROOT / "kernels").rglob("*.py"))
    assert files, "kernels/ is empty"
    for path in files:
        for name in _imported_names(path):
            assert not name.startswith(("moeshard.operator", "moeshard.engine")), f"{path}: imports {name}"
            assert not name.startswith(".."), f"{path}: relative import {name} leaves kernels/"


def test_engine_imports_only_torch_free_operator_modules():
    allowed = {"moeshard.operator.placement", "moeshard.operator.engine_env", "moeshard.operator.naming", "moeshard.operator.cli",
               "moeshard.operator.architectures", "moeshard.operator.api", "moeshard.operator.hardware"}
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for name in _imported_names(path):
            if name.startswith("moeshard.operator"):
                assert name in allowed, f"{path}: imports {name}; the engine may use only {sorted(allowed)}"


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("moeshard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = []
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            target = "moeshard/" + str(path.relative_to(ROOT)).replace(f"{folder}/", f"{folder}/", 1)
            if target not in names:
                missing.append(target)
    assert not missing, f"not in the wheel (list the subpackage in pyproject.toml): {missing}"
    assert any(n.endswith("entry_points.txt") for n in names)
    assert "moeshard/operator/presets/default-deployment.yaml" in names
