"""Generate the MoEDeployment CustomResourceDefinition from the pydantic models.

``build_crd()`` returns the CRD as a dict: apiextensions.k8s.io/v1, a
structural openAPIV3Schema with every ``$ref`` inlined and every description
kept (they are ``kubectl explain``'s text), status and scale subresources,
printer columns, the short name ``moed``, and CEL ``x-kubernetes-validations``
mirroring the cross-field rules that api.py enforces in Python (SPEC_RULES
below; tests evaluate both on the same bad specs).
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from pydantic import BaseModel

from .api import (
    AUTOSCALING_TARGETS, ENGINE_ARCHITECTURES, GROUP, KIND, MAX_NAME_LENGTH, MAX_QUALIFIED_NAME_LENGTH,
    MAX_STABILIZATION_SECONDS, NAME_PATTERN, PLURAL, QUALIFIED_NAME_PATTERN, SHORT_NAMES, SINGULAR, VERSION,
    MoEDeploymentSpec, MoEDeploymentStatus,
)
from moeshard.core.engine_env import RENDEZVOUS_PORT
from moeshard.core.architectures import PRESETS
from moeshard.core.hardware import PROFILES

CRD_NAME = f"{PLURAL}.{GROUP}"
_ENGINE_PRESETS = sorted(k for k, p in PRESETS.items() if p.architecture in ENGINE_ARCHITECTURES)
# Root rule (only metadata.name and generateName are visible to CEL there): child objects take the name.
NAME_RULE = {
    "rule": f"self.metadata.name.matches('{NAME_PATTERN.pattern}') && size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    "message": f"metadata.name must be a lowercase DNS label starting with a letter, at most {MAX_NAME_LENGTH} "
               "characters (child objects and Services take this name)",
}


def qualified_keys_rule(field: str) -> dict[str, str]:
    """CEL twin of api.check_qualified_names: every key of the map ``field`` is a label/annotation key."""
    pattern = QUALIFIED_NAME_PATTERN.replace("\\", "\\\\")  # a CEL string literal escapes backslashes
    return {
        "rule": f"!has(self.{field}) || self.{field}.all(k, k.matches('{pattern}') && "
                f"size(k) <= {MAX_QUALIFIED_NAME_LENGTH})",
        "message": f"{field} keys must be qualified names ([prefix/]name, name at most 63 characters)",
        "fieldPath": f".{field}",
    }


def _cel_list(values) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _cel_map(values: dict[str, int]) -> str:
    return "{" + ", ".join(f"'{k}': {v}" for k, v in sorted(values.items())) + "}"


_EXPERTS = (
    f"(has(self.model.preset) ? {_cel_map({k: p.num_experts for k, p in PRESETS.items()})}[self.model.preset]"
    " : self.model.architecture.numExperts)"
)
_HEADS = (
    f"(has(self.model.preset) ? {_cel_map({k: p.num_attention_heads for k, p in PRESETS.items()})}[self.model.preset]"
    " : self.model.architecture.numAttentionHeads)"
)
_REDUNDANT = "(has(self.loadBalancing) && has(self.loadBalancing.redundantSlots) ? self.loadBalancing.redundantSlots : 0)"
_GPUS_PER_NODE = (
    "(has(self.hardware.custom) && has(self.hardware.custom.gpusPerNode) ? self.hardware.custom.gpusPerNode"
    f" : {_cel_map({k: p.gpus_per_node for k, p in PROFILES.items()})}[self.hardware.profile])"
)
_GPUS_PER_DOMAIN = (
    "(has(self.custom) && has(self.custom.gpusPerDomain) ? self.custom.gpusPerDomain"
    f" : {_cel_map({k: p.gpus_per_domain for k, p in PROFILES.items()})}[self.profile])"
)
_NODE_IN_HARDWARE = (
    "(has(self.custom) && has(self.custom.gpusPerNode) ? self.custom.gpusPerNode"
    f" : {_cel_map({k: p.gpus_per_node for k, p in PROFILES.items()})}[self.profile])"
)
_MODEL_KNOWN = "(has(self.model.preset) || has(self.model.architecture))"
_HAS_EP = "has(self.parallelism) && has(self.parallelism.expertEP)"
_HAS_TP = "has(self.parallelism) && has(self.parallelism.attentionTP)"

# (JSON path of the object the rule sits on, rule) -> message. Python twins: api.py validators.
SPEC_RULES: dict[str, list[dict[str, str]]] = {
    "spec": [
        {
            "rule": f"!({_HAS_EP}) || !{_MODEL_KNOWN} || ({_EXPERTS} + {_REDUNDANT}) % self.parallelism.expertEP == 0",
            "message": "parallelism.expertEP must divide numExperts + loadBalancing.redundantSlots",
            "fieldPath": ".parallelism.expertEP",
        },
        {
            "rule": f"!({_HAS_EP}) || !{_MODEL_KNOWN} || self.parallelism.expertEP <= {_EXPERTS}",
            "message": "parallelism.expertEP must not exceed the model's number of experts",
            "fieldPath": ".parallelism.expertEP",
        },
        {
            "rule": f"!({_HAS_TP}) || self.parallelism.attentionTP <= {_GPUS_PER_NODE}",
            "message": "parallelism.attentionTP must not exceed the GPUs of one node: a TP group stays inside one pod",
            "fieldPath": ".parallelism.attentionTP",
        },
        {
            "rule": f"!({_HAS_TP}) || !{_MODEL_KNOWN} || {_HEADS} % self.parallelism.attentionTP == 0",
            "message": "parallelism.attentionTP must divide the model's attention heads",
            "fieldPath": ".parallelism.attentionTP",
        },
    ],
    "spec.model": [
        {"rule": "has(self.preset) != has(self.architecture)", "message": "set exactly one of preset and architecture"},
        {
            "rule": f"!has(self.preset) || self.preset in {_cel_list(_ENGINE_PRESETS)}",
            "message": f"the engine serves {', '.join(ENGINE_ARCHITECTURES)} models; `moeshard plan --preset` still plans the others",
            "fieldPath": ".preset",
        },
        {
            "rule": f"!has(self.architecture) || self.architecture.type in {_cel_list(ENGINE_ARCHITECTURES)}",
            "message": f"the engine serves {', '.join(ENGINE_ARCHITECTURES)} models",
            "fieldPath": ".architecture.type",
        },
    ],
    "spec.loadBalancing": [
        {"rule": "!has(self.interval) || self.interval.matches('[1-9]')", "message": "interval must be longer than zero",
         "fieldPath": ".interval"},
        {"rule": "!has(self.window) || self.window.matches('[1-9]')", "message": "window must be longer than zero",
         "fieldPath": ".window"},
    ],
    "spec.engine": [
        {"rule": f"!has(self.port) || self.port != {RENDEZVOUS_PORT}",
         "message": f"port {RENDEZVOUS_PORT} is the torch.distributed rendezvous port", "fieldPath": ".port"},
    ],
    "spec.model.architecture": [
        {
            "rule": "(!has(self.firstDenseLayers) || self.firstDenseLayers == 0) && "
                    "(!has(self.sharedExperts) || self.sharedExperts == 0)",
            "message": "the engine serves only models whose every layer is routed MoE without shared experts",
            "fieldPath": ".firstDenseLayers",
        },
        {"rule": "self.topK <= self.numExperts", "message": "topK must not exceed numExperts", "fieldPath": ".topK"},
        {
            "rule": "!has(self.firstDenseLayers) || self.firstDenseLayers < self.numLayers",
            "message": "firstDenseLayers must leave at least one MoE layer",
            "fieldPath": ".firstDenseLayers",
        },
    ],
    "spec.hardware": [
        {
            "rule": f"{_GPUS_PER_DOMAIN} <= {_NODE_IN_HARDWARE} || {_GPUS_PER_DOMAIN} % {_NODE_IN_HARDWARE} == 0",
            "message": "gpusPerDomain must be a multiple of gpusPerNode",
            "fieldPath": ".custom.gpusPerDomain",
        },
    ],
    "spec.engine.scheduling": [qualified_keys_rule("nodeSelector"), qualified_keys_rule("topologyAnnotations")],
    "spec.parallelism": [
        {
            "rule": "!has(self.attentionTP) || !has(self.expertEP) || self.expertEP % self.attentionTP == 0",
            "message": "attentionTP must divide expertEP",
            "fieldPath": ".attentionTP",
        },
    ],
    # Python twins: AutoscalingSpec._bounds and AutoscalingTarget._exactly_one in api.py.
    "spec.autoscaling": [
        {"rule": "(has(self.minReplicas) ? self.minReplicas : 1) <= self.maxReplicas",
         "message": "minReplicas must not exceed maxReplicas", "fieldPath": ".minReplicas"},
        {"rule": "!has(self.minReplicas) || self.minReplicas > 0 || (has(self.engine) && self.engine == 'keda')",
         "message": "minReplicas 0 needs engine keda: an HPA cannot scale to zero", "fieldPath": ".minReplicas"},
        {"rule": "!has(self.wakeQuery) || (has(self.engine) && self.engine == 'keda')",
         "message": "wakeQuery (a KEDA trigger) needs engine keda", "fieldPath": ".wakeQuery"},
        {"rule": "!has(self.scaleDownStabilization) || duration(self.scaleDownStabilization) <= "
                 f"duration('{MAX_STABILIZATION_SECONDS}s')",
         "message": "scaleDownStabilization must not exceed 1h (the HPA's limit)",
         "fieldPath": ".scaleDownStabilization"},
    ],
    "spec.autoscaling.target": [
        {"rule": " + ".join(f"(has(self.{t}) ? 1 : 0)" for t in AUTOSCALING_TARGETS) + " == 1",
         "message": f"set exactly one of {', '.join(AUTOSCALING_TARGETS)}"},
    ],
}


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """Resolve $ref, collapse Optional (anyOf with null), drop titles: a structural schema."""
    if isinstance(schema, list):
        return [_inline(s, defs) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].split("/")[-1]])
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        target.update(extra)
        return _inline(target, defs)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            merged = dict(options[0])
            merged.update({k: v for k, v in schema.items() if k != "anyOf"})
            return _inline(merged, defs)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("title", "$defs") or (key == "additionalProperties" and not isinstance(value, dict)):
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2020 (pydantic) -> OpenAPI v3.0 (Kubernetes): a bound plus a boolean flag.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key == "default" and (value is None or value == {} or value == []):
            continue
        if key == "properties":
            out[key] = {name: _inline(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _inline(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _schema_of(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _inline(raw, raw.get("$defs", {}))


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.split(".")[1:]:
        node = node["properties"][part]
    return node


def _default_sections(model: type[BaseModel], schema: dict[str, Any]) -> None:
    """``default: {}`` on every section built by a default factory, recursively.

    The API server then fills a missing section with its fields' defaults, so
    ``.spec.parallelism.replicas`` (the scale subresource, the DP column) always has a value.
    """
    for name, info in model.model_fields.items():
        factory = info.default_factory
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            node = schema["properties"][info.alias or name]
            node["default"] = {}
            _default_sections(factory, node)


def spec_schema() -> dict[str, Any]:
    schema = _schema_of(MoEDeploymentSpec)
    _default_sections(MoEDeploymentSpec, schema)
    for path, rules in SPEC_RULES.items():
        _at({"properties": {"spec": schema}}, "x." + path).setdefault("x-kubernetes-validations", []).extend(
            copy.deepcopy(rules)
        )
    return schema


def status_schema() -> dict[str, Any]:
    schema = _schema_of(MoEDeploymentStatus)
    schema["x-kubernetes-preserve-unknown-fields"] = True  # the balancer and later parts add fields
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "moeshard", "app.kubernetes.io/part-of": "moeshard"},
            "annotations": {"moeshard.io/generated-by": "moeshard crd (from moeshard.operator.api)"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR, "shortNames": SHORT_NAMES},
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.parallelism.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.preset"},
                        {"name": "Hardware", "type": "string", "jsonPath": ".spec.hardware.profile"},
                        {"name": "TP", "type": "integer", "jsonPath": ".status.plan.attentionTP"},
                        {"name": "EP", "type": "integer", "jsonPath": ".status.plan.expertEP"},
                        {"name": "DP", "type": "integer", "jsonPath": ".spec.parallelism.replicas"},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A Mixture-of-Experts model served by MoEShard: planned into attention TP, "
                            "expert EP and DP replicas, run as NVLink-domain-sized engine pod groups, with hot "
                            "experts replicated from measured load.",
                            "required": ["spec"],
                            "x-kubernetes-validations": [dict(NAME_RULE)],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version: moeshard.io/v1alpha1."},
                                "kind": {"type": "string", "description": "MoEDeployment."},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `moeshard crd` from moeshard/operator/api.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
