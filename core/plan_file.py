"""plan.json: the operator's chosen layout, mounted into every engine pod and checked by the engine.

The operator writes the plan (``Plan.to_json()`` of moeshard.operator.planner)
into the deployment's ConfigMap; the engine reads the ``chosen`` section at
start-up and refuses to join a group whose environment disagrees with it (an
operator and an engine image of different versions, or an edited pod), and
takes its slots per rank from it when no placement file exists yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeshard.core.engine_env import PREFIX, EngineEnvironment
from moeshard.core.errors import UserError


class PlanFileError(UserError):
    """plan.json is unreadable or disagrees with the engine environment; the message names the field."""


@dataclass(frozen=True)
class PlanFile:
    """The fields of plan.json's ``chosen`` section that the engine relies on."""

    attention_tp: int
    expert_ep: int
    pods_per_replica: int
    gpus_per_pod: int
    slots_per_gpu: int
    domains_per_replica: int

    @property
    def ranks_per_domain(self) -> int:
        return self.expert_ep // self.domains_per_replica

    @classmethod
    def from_json(cls, text: str | bytes) -> "PlanFile":
        try:
            data: Any = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanFileError(f"plan.json: not valid JSON: {exc}") from None
        chosen = data.get("chosen") if isinstance(data, dict) else None
        if not isinstance(chosen, dict):
            raise PlanFileError("plan.json: chosen: missing")
        values = {}
        for field, key in (("attention_tp", "attentionTP"), ("expert_ep", "expertEP"),
                           ("pods_per_replica", "podsPerReplica"), ("gpus_per_pod", "gpusPerPod"),
                           ("slots_per_gpu", "slotsPerGpu"), ("domains_per_replica", "domainsPerReplica")):
            value = chosen.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanFileError(f"plan.json: chosen.{key}: must be a positive integer, got {value!r}")
            values[field] = value
        return cls(**values)

    @classmethod
    def read(cls, path: str | Path) -> "PlanFile | None":
        """The plan at ``path``; None when there is no file (a local group without an operator)."""
        path = Path(path)
        if not path.is_file():
            return None
        return cls.from_json(path.read_bytes())

    def check_environment(self, env: EngineEnvironment) -> None:
        """Raise PlanFileError naming the first MOESHARD_* variable that disagrees with the plan."""
        for var, got, want in (
            ("EXPERT_EP", env.expert_ep, self.expert_ep),
            ("ATTENTION_TP", env.attention_tp, self.attention_tp),
            ("PODS_PER_GROUP", env.pods_per_group, self.pods_per_replica),
            ("GPUS_PER_POD", env.gpus_per_pod, self.gpus_per_pod),
            # ranks of the group per NVLink domain: a group smaller than its domain is one domain
            ("GPUS_PER_DOMAIN", min(env.gpus_per_domain, env.expert_ep), self.ranks_per_domain),
        ):
            if got != want:
                raise PlanFileError(f"{PREFIX}{var} ({got}) disagrees with plan.json ({want}); "
                                    "the operator and the engine image may be of different versions")
