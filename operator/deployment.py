"""What every builder sees of one MoEDeployment: identity, validated spec, plan, and its pod groups.

A ``GroupRef`` names one pod group (one EP replica) by role, index and the
plan candidate it runs. Today every group has the role ``serve`` and runs the
chosen candidate; a later prefill/decode split adds roles with their own
candidates without changing the builders' signatures.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeshard.core.hardware import HardwareProfile

from .api import MoEDeploymentSpec
from .planner import Candidate, Plan

ROLE_SERVE = "serve"


@dataclass(frozen=True)
class GroupRef:
    """One pod group: ``role`` (serve), ``index`` among the role's groups, and the plan ``candidate`` it runs."""

    role: str
    index: int
    candidate: Candidate


@dataclass(frozen=True)
class Deployment:
    """One MoEDeployment as the builders see it: identity, validated spec and plan."""

    name: str
    namespace: str
    uid: str
    spec: MoEDeploymentSpec
    plan: Plan

    @property
    def hardware(self) -> HardwareProfile:
        return self.plan.hardware

    @property
    def replicas(self) -> int:
        return self.plan.chosen.replicas

    @property
    def pods_per_replica(self) -> int:
        return self.plan.chosen.pods_per_replica

    @property
    def gpus_per_pod(self) -> int:
        return self.plan.chosen.gpus_per_pod

    @property
    def uses_lws(self) -> bool:
        return self.spec.engine.group_kind == "LeaderWorkerSet"

    def group(self, index: int) -> GroupRef:
        """The serving group at ``index`` (0-based DP replica)."""
        return GroupRef(role=ROLE_SERVE, index=index, candidate=self.plan.chosen)

    def groups(self) -> list[GroupRef]:
        """Every desired group, in index order."""
        return [self.group(r) for r in range(self.replicas)]
