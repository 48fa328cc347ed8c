"""The seam between the operator and an inference engine.

The operator owns topology: pod groups sized by the NVLink domain, Services,
PDBs, affinity, ComputeDomains, rolling and restarts (manifests.py,
handlers.py). What runs inside a group's pods is the engine's business, and
everything the operator needs to know about it goes through one
``EngineBackend``:

    which architectures it serves          architectures, check_model
    the pod's containers and volumes       pod(deployment, group, context)
    how an hf:// checkpoint is downloaded  fetch_container(deployment) (the operator's download Job)
    what the ConfigMap holds for it        config_data(deployment, placement)
    whether it takes an expert placement   takes_placement
    how to read its per-expert load        expert_load_query(name, namespace, window)

``spec.engine.backend`` picks one by name (``BACKENDS`` in __init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from moeshard.core.architectures import ModelArchitecture

if TYPE_CHECKING:
    from moeshard.core.placement import Placement

    from ..deployment import Deployment, GroupRef


@dataclass(frozen=True)
class PodContext:
    """Topology facts about one group that the engine's pods need, decided by the operator."""

    rendezvous_host: str  # DNS name of pod 0 of the group
    pod_index_label: str  # pod label holding the pod's index inside its group
    compute_domain_claim: str | None  # resource claim of the group's ComputeDomain, if any


@dataclass
class EnginePod:
    """The engine's part of a pod template: containers, init containers and volumes."""

    containers: list[dict[str, Any]]
    init_containers: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)


class EngineBackend(Protocol):
    """What the operator needs from an inference engine (see the module docstring)."""

    name: str
    architectures: tuple[str, ...]
    takes_placement: bool

    def check_model(self, arch: ModelArchitecture, where: str) -> None:
        """Raise ValueError (message starting with ``where``) when the engine cannot serve ``arch``."""

    def pod(self, d: "Deployment", group: "GroupRef", context: PodContext) -> EnginePod:
        """Containers, init containers and volumes of every pod of ``group``."""

    def fetch_container(self, d: "Deployment") -> dict[str, Any]:
        """The container that downloads ``spec.model.weights`` (hf://) into the volume ``model`` at the engine's
        model folder; the operator runs it once per checkpoint in a Job whose claim the pods then mount."""

    def config_data(self, d: "Deployment", placement: "Placement | None") -> dict[str, str]:
        """The ConfigMap's data; ``placement`` None leaves the live placement alone."""

    def expert_load_query(self, name: str, namespace: str, window: str) -> str:
        """PromQL of the per-(layer, expert) token increase of one deployment over ``window``."""
