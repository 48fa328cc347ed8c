"""``moeshard render FILE``: print the objects the operator would create, as multi-document YAML.

Same pure builders as the operator (moeshard.operator.manifests). The owner
reference needs the MoEDeployment's uid, known only once it exists: the file's
``metadata.uid`` is used when present, else a fixed placeholder.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

HELP = "Print the Kubernetes objects the operator would create for a MoEDeployment (multi-document YAML)."
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="YAML file with one MoEDeployment ('-' reads stdin)")
    parser.add_argument("-n", "--namespace", default=None,
                        help="namespace when the file has none (default: 'default')")


def read_input(path: str) -> str:
    """The text of ``path`` ('-': stdin); a missing, unreadable or non-text file is one SpecError line."""
    from ..api import SpecError

    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except IsADirectoryError:
        raise SpecError(path, "is a directory, not a file") from None
    except FileNotFoundError:
        raise SpecError(path, "no such file") from None
    except PermissionError:
        raise SpecError(path, "permission denied") from None
    except UnicodeDecodeError as exc:
        raise SpecError(path, f"is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise SpecError(path, f"cannot be read: {exc.strerror or exc}") from None


def load_documents(path: str) -> list[Any]:
    from ..api import SpecError

    text = read_input(path)
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(path, f"not valid YAML{where}") from None


def render_objects(body: dict[str, Any], namespace: str | None = None) -> list[dict[str, Any]]:
    """Every object for one MoEDeployment body; SpecError/PlanError name the bad field."""
    from ..api import parse_resource
    from ..autoscaling import build_autoscaler
    from ..deployment import Deployment
    from ..manifests import build_all
    from ..planner import plan_for_spec
    from ..weights import build_weights_objects

    from ..api import check_namespace

    spec = parse_resource(body)
    meta = body["metadata"]
    if namespace is not None:
        check_namespace(namespace, "--namespace")
    deployment = Deployment(
        name=meta["name"], namespace=meta.get("namespace") or namespace or "default",
        uid=meta.get("uid") or PLACEHOLDER_UID, spec=spec, plan=plan_for_spec(spec),
    )
    autoscaler = build_autoscaler(deployment)
    return (build_weights_objects(deployment) + build_all(deployment)
            + ([autoscaler] if autoscaler is not None else []))


def run(args: argparse.Namespace) -> int:
    from ..api import KIND, SpecError

    docs = [d for d in load_documents(args.file) if not (isinstance(d, dict) and d.get("kind") not in (None, KIND))]
    if len(docs) != 1:
        raise SpecError("(document)", f"{args.file} must hold exactly one {KIND}, found {len(docs)}")
    objects = render_objects(docs[0], args.namespace)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, width=120))
    return 0
