"""moeshard.kernels imports nothing from moeshard.operator or moeshard.engine (STYLE.md rule 11)."""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def test_kernels_do_not_import_operator_or_engine():
    offenders = []
    files = sorted(KERNELS.rglob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(("moeshard.operator", "moeshard.engine"))]
    assert offenders == []
