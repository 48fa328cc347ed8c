"""The engine environment contract: variables the operator sets on every engine pod.

One builder (``build_engine_env``, used by the operator's manifests) and one
parser (``EngineEnvironment.from_environ``, used by the engine at start-up,
never at import time). Torch-free.

| variable                    | meaning                                                        |
|-----------------------------|----------------------------------------------------------------|
| MOESHARD_DEPLOYMENT         | MoEDeployment name                                             |
| MOESHARD_NAMESPACE          | its namespace                                                  |
| MOESHARD_REPLICA_INDEX      | DP replica (EP group) index, 0-based                           |
| MOESHARD_POD_INDEX          | this pod's index inside its group (StatefulSet ordinal)        |
| MOESHARD_PODS_PER_GROUP     | pods in one group                                              |
| MOESHARD_GPUS_PER_POD       | engine ranks (GPUs) per pod                                    |
| MOESHARD_GPUS_PER_DOMAIN    | ranks per NVLink domain (hierarchical dispatch above this)     |
| MOESHARD_ATTENTION_TP       | attention tensor-parallel size                                 |
| MOESHARD_EXPERT_EP          | expert-parallel size = world size of the group                 |
| MOESHARD_RENDEZVOUS         | host:port of pod 0 of the group (torch.distributed TCP store)  |
| MOESHARD_PLAN_FILE          | path of the mounted plan.json                                  |
| MOESHARD_PLACEMENT_FILE     | path of the mounted placement.json                             |
| MOESHARD_MODEL_PATH         | checkpoint folder (config.json + safetensors)                  |
| MOESHARD_PORT               | HTTP port of the serving API on rank 0                         |
| MOESHARD_DEVICE             | cuda or cpu                                                    |
| MOESHARD_READY_FILE         | written by local rank 0 once the whole group has loaded and    |
|                             | joined (the pod's readiness probe); empty = none               |

A rank's global index is ``pod_index * gpus_per_pod + local_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from moeshard.core.layout import attention_tp_problem, global_rank

PREFIX = "MOESHARD_"
CONFIG_MOUNT = "/etc/moeshard"  # the ConfigMap (plan.json, placement.json) is mounted here
MODEL_MOUNT = "/models"
RENDEZVOUS_PORT = 29500
READY_FILE = "/tmp/moeshard-ready"  # what the operator's readiness probe of multi-pod groups checks
# Touched by every rank at each step boundary (engine/heartbeat.py; idle ranks step every idle interval):
# the operator's startup probe waits for it, its liveness probe fails when it grows stale (a hung step).
HEARTBEAT_FILE = "/tmp/moeshard-heartbeat"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"  # set by the StatefulSet controller (Kubernetes >= 1.28)


@dataclass(frozen=True)
class EngineEnvironment:
    deployment: str
    namespace: str
    replica_index: int
    pod_index: int
    pods_per_group: int
    gpus_per_pod: int
    gpus_per_domain: int
    attention_tp: int
    expert_ep: int
    rendezvous: str
    plan_file: str
    placement_file: str
    model_path: str
    port: int
    device: str
    ready_file: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "EngineEnvironment":
        """Parse the contract; ValueError names the variable that is missing or wrong."""

        def text(name: str, default: str | None = None) -> str:
            value = environ.get(PREFIX + name, default)
            if value is None or value == "":
                raise ValueError(f"{PREFIX}{name} is not set")
            return value

        def integer(name: str, default: int | None = None, minimum: int = 0) -> int:
            raw = text(name, None if default is None else str(default))
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{PREFIX}{name} must be an integer, got {raw!r}") from None
            if value < minimum:
                raise ValueError(f"{PREFIX}{name} must be >= {minimum}, got {value}")
            return value

        env = cls(
            deployment=text("DEPLOYMENT", "local"),
            namespace=text("NAMESPACE", "default"),
            replica_index=integer("REPLICA_INDEX", 0),
            pod_index=integer("POD_INDEX", 0),
            pods_per_group=integer("PODS_PER_GROUP", 1, minimum=1),
            gpus_per_pod=integer("GPUS_PER_POD", 1, minimum=1),
            gpus_per_domain=integer("GPUS_PER_DOMAIN", 8, minimum=1),
            attention_tp=integer("ATTENTION_TP", 1, minimum=1),
            expert_ep=integer("EXPERT_EP", 1, minimum=1),
            rendezvous=text("RENDEZVOUS", f"127.0.0.1:{RENDEZVOUS_PORT}"),
            plan_file=text("PLAN_FILE", f"{CONFIG_MOUNT}/plan.json"),
            placement_file=text("PLACEMENT_FILE", f"{CONFIG_MOUNT}/placement.json"),
            model_path=text("MODEL_PATH", MODEL_MOUNT),
            port=integer("PORT", 8000, minimum=1),
            device=text("DEVICE", "cuda"),
            ready_file=environ.get(PREFIX + "READY_FILE", ""),
        )
        if env.pods_per_group * env.gpus_per_pod != env.expert_ep:
            raise ValueError(
                f"{PREFIX}PODS_PER_GROUP x {PREFIX}GPUS_PER_POD ({env.pods_per_group} x {env.gpus_per_pod}) "
                f"must equal {PREFIX}EXPERT_EP ({env.expert_ep})"
            )
        problem = attention_tp_problem(env.attention_tp, env.expert_ep, gpus_per_pod=env.gpus_per_pod)
        if problem:
            raise ValueError(f"{PREFIX}ATTENTION_TP: {problem}")
        if env.pod_index >= env.pods_per_group:
            raise ValueError(f"{PREFIX}POD_INDEX ({env.pod_index}) must be < {PREFIX}PODS_PER_GROUP ({env.pods_per_group})")
        if env.device not in ("cuda", "cpu"):
            raise ValueError(f"{PREFIX}DEVICE must be cuda or cpu, got {env.device!r}")
        return env

    def global_rank(self, local_rank: int) -> int:
        """Rank inside the EP group of this pod's ``local_rank``-th GPU."""
        return global_rank(self.pod_index, self.gpus_per_pod, local_rank)

    def to_environ(self) -> dict[str, str]:
        return {
            PREFIX + "DEPLOYMENT": self.deployment,
            PREFIX + "NAMESPACE": self.namespace,
            PREFIX + "REPLICA_INDEX": str(self.replica_index),
            PREFIX + "POD_INDEX": str(self.pod_index),
            PREFIX + "PODS_PER_GROUP": str(self.pods_per_group),
            PREFIX + "GPUS_PER_POD": str(self.gpus_per_pod),
            PREFIX + "GPUS_PER_DOMAIN": str(self.gpus_per_domain),
            PREFIX + "ATTENTION_TP": str(self.attention_tp),
            PREFIX + "EXPERT_EP": str(self.expert_ep),
            PREFIX + "RENDEZVOUS": self.rendezvous,
            PREFIX + "PLAN_FILE": self.plan_file,
            PREFIX + "PLACEMENT_FILE": self.placement_file,
            PREFIX + "MODEL_PATH": self.model_path,
            PREFIX + "PORT": str(self.port),
            PREFIX + "DEVICE": self.device,
            PREFIX + "READY_FILE": self.ready_file,
        }


def build_engine_env(
    *,
    deployment: str,
    namespace: str,
    replica_index: int,
    pods_per_group: int,
    gpus_per_pod: int,
    gpus_per_domain: int,
    attention_tp: int,
    expert_ep: int,
    rendezvous_host: str,
    port: int,
    device: str,
    model_path: str = MODEL_MOUNT,
    pod_index_label: str = POD_INDEX_LABEL,
) -> list[dict]:
    """Container ``env`` entries for one engine pod template of a replica group.

    The pod index is not known to the template: it comes from a pod label
    through the downward API (the StatefulSet pod-index label, or the
    LeaderWorkerSet worker-index label).
    """
    fixed = EngineEnvironment(
        deployment=deployment, namespace=namespace, replica_index=replica_index, pod_index=0,
        pods_per_group=pods_per_group, gpus_per_pod=gpus_per_pod, gpus_per_domain=gpus_per_domain,
        attention_tp=attention_tp, expert_ep=expert_ep, rendezvous=f"{rendezvous_host}:{RENDEZVOUS_PORT}",
        plan_file=f"{CONFIG_MOUNT}/plan.json", placement_file=f"{CONFIG_MOUNT}/placement.json",
        model_path=model_path, port=port, device=device, ready_file=READY_FILE,
    ).to_environ()
    env = []
    for name, value in fixed.items():
        if name == PREFIX + "POD_INDEX":
            env.append({
                "name": name,
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{pod_index_label}']"}},
            })
        else:
            env.append({"name": name, "value": value})
    return env
