"""The real kopf operator against the kube emulator over HTTP, driven by the official client."""

from __future__ import annotations

from typing import Any

import pytest

from support.kube_emulator import wait_for

GROUP, VERSION, PLURAL, NAMESPACE = "moeshard.io", "v1alpha1", "moedeployments", "test"

STS = "apps/v1/statefulsets"


def test_create_makes_groups_and_status(start_operator, custom, emulator, check_moed, example):
    start_operator()
    body = check_moed(example("tiny-cpu", **{"spec.parallelism.replicas": 2}))
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
    groups = wait_for(lambda: len(emulator.objects(STS, NAMESPACE)) == 2 and emulator.objects(STS, NAMESPACE),
                      what="2 StatefulSets")
    assert sorted(groups) == ["tiny-r0", "tiny-r1"]
