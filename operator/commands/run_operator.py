"""``moeshard operator``: run the kopf operator for MoEDeployments.

Namespaced (``--namespace``, repeatable, globs allowed as in kopf) or
cluster-wide (``--all-namespaces``). With peering (the default), several
instances may run: kopf's peering objects (``kopf.dev`` ClusterKopfPeering or
KopfPeering, installed by the Helm chart) let exactly one act at a time.
kopf pauses *every* peer whose priority ties with another live peer's, so
instances must have distinct priorities: the chart runs a StatefulSet and
passes each pod's ordinal as ``--pod-index``, which lowers its priority by
that much (pod 0 acts, pod 1 takes over when pod 0 leaves or its entry expires).
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any

HELP = "Run the MoEDeployment operator (kopf): reconcile engine pod groups and rebalance experts."
DEFAULT_PEERING = "moeshard"


def configure(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="watch this namespace (repeatable; kopf globs such as 'team-*' work)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--peering", default=DEFAULT_PEERING,
                        help="kopf peering object name: instances with the same name elect one active "
                             f"(default {DEFAULT_PEERING!r})")
    parser.add_argument("--standalone", action="store_true",
                        help="no peering: for a single instance or local runs")
    parser.add_argument("--priority", type=int, default=0,
                        help="peering priority; the highest-priority instance acts (ties pause everyone)")
    parser.add_argument("--pod-index", type=_pod_index, default=0, metavar="N",
                        help="this instance's ordinal among its replicas (the chart passes the StatefulSet "
                             "pod index): the peering priority becomes PRIORITY - N, distinct per pod")
    parser.add_argument("--resync", type=float, default=60.0, metavar="SECONDS",
                        help="re-reconcile a settled deployment this often (default 60)")
    parser.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                        help="re-reconcile this often while groups start or roll (default 5)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="kopf liveness endpoint ('' disables)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def _pod_index(text: str) -> int:
    """``--pod-index``: a non-negative integer (an unexpanded ``$(POD_INDEX)`` is refused by name)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--pod-index: expected the pod's ordinal (a non-negative integer), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--pod-index: must be >= 0, got {value}")
    return value


def load_handlers() -> list[str]:
    """Import the handler modules (registering them with kopf); returns the names imported."""
    names = ["moeshard.operator.handlers", "moeshard.operator.balancer_handlers"]
    loaded = []
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name or name.endswith(".handlers"):
                raise
            continue  # the balancer is optional in this build
        loaded.append(name)
    return loaded


def operator_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``kopf.run`` from the parsed command line."""
    import kopf

    from ..handlers import OperatorConfig

    config = OperatorConfig(resync_seconds=args.resync, progress_seconds=args.progress_interval,
                            peering_mandatory=not args.standalone)
    return {
        "clusterwide": bool(args.all_namespaces),
        "namespaces": list(args.namespaces or []),
        "standalone": bool(args.standalone),
        "peering_name": None if args.standalone else args.peering,
        "priority": args.priority - args.pod_index,
        "liveness_endpoint": args.liveness or None,
        "memo": kopf.Memo(config=config),
    }


def run(args: argparse.Namespace) -> int:
    import logging

    import kopf

    from kubernetes.config import ConfigException

    from moeshard.core.errors import CommandError
    from ..kube import kube_from_config

    # Fail fast, in one line, when there is no cluster to talk to (kopf would retry forever).
    try:
        kube_from_config()
    except (ConfigException, OSError) as exc:
        raise CommandError(
            f"no Kubernetes credentials: not in a cluster, and the kubeconfig "
            f"({os.environ.get('KUBECONFIG', '~/.kube/config')}) gives none: {exc}"
        ) from None
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_handlers()
    kopf.configure(verbose=args.verbose)
    kopf.run(**operator_kwargs(args))
    return 0
