"""Layout rules from DESIGN.md: no stdlib shadowing, complete wheel, import boundaries."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "core": "moeshard.core",
    "cli": "moeshard.cli",
    "operator": "moeshard.operator",
    "engine": "moeshard.engine",
    "kernels": "moeshard.kernels",
}


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
        "from moeshard.cli.main import build_parser\n"
        "build_parser().format_help()\n"
        "bad = [m for m in ('torch', 'triton', 'transformers') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing the operator (and building the CLI) imported {result.stdout.strip()}"


# The floors (docs/architecture.md): kernels <- engine -> core <- operator, and
# cli on top naming the planes only as strings. Each package may import only
# the packages listed here (besides itself); third-party names listed under
# FORBIDDEN_THIRD_PARTY may never appear, not even lazily inside a function.
ALLOWED_OURS = {
    "moeshard.core": set(),
    "moeshard.kernels": set(),
    "moeshard.engine": {"moeshard.core", "moeshard.kernels"},
    "moeshard.operator": {"moeshard.core"},
    "moeshard.cli": {"moeshard.core"},
}
FORBIDDEN_THIRD_PARTY = {
    "moeshard.core": {"torch", "triton", "transformers", "safetensors", "kopf", "kubernetes"},
    "moeshard.operator": {"torch", "triton", "transformers", "safetensors"},
    "moeshard.cli": {"torch", "triton", "transformers", "safetensors", "kopf", "kubernetes"},
    "moeshard.kernels": set(),
    "moeshard.engine": {"kopf", "kubernetes"},
}


def _module_name(path: Path) -> tuple[str, str]:
    """(package, dotted module) of a source file under one of the mapped folders."""
    folder = path.relative_to(ROOT).parts[0]
    package = PACKAGES[folder]
    rel = path.relative_to(ROOT / folder).with_suffix("")
    return package, ".".join([package, *[p for p in rel.parts if p != "__init__"]])


def import_graph() -> dict[str, set[str]]:
    """Every module of ours -> the absolute names it imports anywhere in its body (AST, nothing is run)."""
    graph: dict[str, set[str]] = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            _, module = _module_name(path)
            is_package = path.name == "__init__.py"
            names: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = module.split(".")
                        base = base[: len(base) - node.level + (1 if is_package else 0)]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    names.add(target)
                    names.update(f"{target}.{alias.name}" for alias in node.names)
            graph[module] = names
    return graph


def _package_of(name: str) -> str | None:
    for package in ALLOWED_OURS:
        if name == package or name.startswith(package + "."):
            return package
    return None


def test_import_graph_follows_the_floors():
    graph = import_graph()
    assert {"moeshard.core.placement", "moeshard.engine.moe", "moeshard.operator.planner"} <= set(graph)
    violations = []
    for module, names in graph.items():
        package = _package_of(module)
        for name in names:
            target = _package_of(name)
            if target is not None and target != package and target not in ALLOWED_OURS[package]:
                violations.append(f"{module} imports {name}")
            if name.startswith("moeshard.") and target is None:
                violations.append(f"{module} imports {name}, which is no package of ours")
            if name.split(".")[0] in FORBIDDEN_THIRD_PARTY[package]:
                violations.append(f"{module} imports {name}")
    assert not violations, "import rules broken:\n" + "\n".join(sorted(violations))


def test_import_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    # relative import inside the operator (from .api import ...), and a lazy one inside a function
    assert "moeshard.operator.api" in graph["moeshard.operator.planner"]
    assert any(name.startswith("moeshard.engine.") for name in graph["moeshard.engine.cli"])


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


@pytest.mark.parametrize("image,absent", [
    ("engine", ("scipy", "kopf", "kubernetes", "prometheus_api_client", "matplotlib")),
    ("operator", ("torch", "triton", "transformers", "safetensors", "prometheus_client", "huggingface_hub")),
])
def test_cli_parser_builds_with_only_one_images_dependencies(image, absent):
    """Every subcommand's parser is built at start, in both images: no command module may import the other
    image's dependencies at module level (the engine image has no scipy or kopf, the operator image no torch)."""
    code = (
        "import sys\n"
        f"for name in {absent!r}:\n"
        "    sys.modules[name] = None\n"
        "from moeshard.cli.main import build_parser\n"
        "build_parser().format_help()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"{image} image: {result.stderr[-1500:]}"
