"""Admission like a kube-apiserver's: defaulting, structural-schema validation, CEL rules, built-in kinds.

``KubeEmulator`` (kube_emulator.py) calls ``Admission.admit`` on every
create and update; tests call the pieces directly. What a real server does,
and what this does:

* custom resources: the CRD version's ``openAPIV3Schema`` (OpenAPI v3.0, the
  structural dialect, not JSON Schema 2020: ``jsonschema`` would miss the
  extensions) -- ``default`` applied top down before validation (a defaulted
  ``{}`` section gets its own fields' defaults), then ``type`` (with
  ``nullable``, ``x-kubernetes-int-or-string`` and
  ``x-kubernetes-preserve-unknown-fields``), ``enum``, ``pattern``,
  ``minimum``/``maximum`` (with the v3.0 boolean ``exclusiveMinimum``),
  ``minLength``/``maxLength``, ``minItems``/``maxItems``, ``required``, and
  unknown fields (refused like ``fieldValidation=Strict``, kubectl's
  default); then, only when the schema passed, every
  ``x-kubernetes-validations`` CEL rule through cel-python (at the root,
  ``self.metadata`` holds only ``name`` and ``generateName``, as on a server);
* built-in kinds: ``kubernetes_validate.validate(obj, "1.33", strict=True)``
  (kinds it has no schema for pass);
* ``policies``: extra checks a test adds to play an admission policy;
* a refusal is ``AdmissionError``: HTTP 422 with the server's Status shape,
  ``reason: Invalid``, ``message`` ``<Kind>.<group> "<name>" is invalid: <causes>``
  and ``details.causes`` (``reason``, ``message``, ``field``).

Not done: ``format`` checks, ``x-kubernetes-list-type`` uniqueness,
transition rules (``oldSelf``), CEL cost limits, metadata validation beyond
the CRD's own rules.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Callable

import functools

import celpy
import kubernetes_validate
import kubernetes_validate.utils

# kubernetes-validate re-reads its JSON schema files (the 1.33 definitions are megabytes) on every call;
# the emulator validates every write, so keep them in memory (the dicts are only read).
if not hasattr(kubernetes_validate.utils.schema_contents, "cache_info"):
    kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
        kubernetes_validate.utils.schema_contents)

_TYPES: dict[str, tuple[type, ...]] = {"object": (dict,), "array": (list,), "string": (str,),
                                       "integer": (int,), "number": (int, float), "boolean": (bool,)}


@dataclass(frozen=True)
class Cause:
    """One refused field, as in ``details.causes`` of a Status."""

    reason: str  # FieldValueInvalid, FieldValueRequired, FieldValueTypeInvalid, FieldValueNotSupported, ...
    field: str  # spec.parallelism.replicas
    message: str

    def to_json(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "field": self.field}


class AdmissionError(Exception):
    """A 422 Invalid: ``status()`` is the Status body a kube-apiserver answers."""

    def __init__(self, kind: str, group: str, name: str, causes: list[Cause]):
        self.kind, self.group, self.name, self.causes = kind, group, name, causes
        qualified = f"{kind}.{group}" if group else kind
        listed = "; ".join(f"{c.field}: {c.message}" for c in causes)
        self.message = f'{qualified} "{name}" is invalid: ' + (f"[{listed}]" if len(causes) > 1 else listed)
        super().__init__(self.message)

    def status(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 422,
            "reason": "Invalid", "message": self.message,
            "details": {"name": self.name, "group": self.group, "kind": self.kind,
                        "causes": [c.to_json() for c in self.causes]},
        }


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _json(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value).lower() if isinstance(value, bool) else repr(value)


# --------------------------------------------------------------------------- defaulting


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Fill missing properties that have a ``default``, top down; returns ``value`` (changed in place)."""
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(value[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                apply_defaults(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])
    return value


# --------------------------------------------------------------------------- structural schema


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    wanted = schema.get("type")
    if wanted is None:
        return True
    if isinstance(value, bool) and wanted in ("integer", "number"):
        return False
    if wanted == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[wanted])


def schema_causes(value: Any, schema: dict[str, Any], path: str) -> list[Cause]:
    """Every violation of the structural ``schema`` by ``value`` at ``path`` (defaults already applied)."""
    if value is None:
        if schema.get("nullable"):
            return []
        return [Cause("FieldValueTypeInvalid", path, f"Invalid value: \"null\": {path} in body must be of type "
                                                     f"{schema.get('type', 'int-or-string')}: \"null\"")]
    if not _type_ok(value, schema):
        wanted = "integer or string" if schema.get("x-kubernetes-int-or-string") else schema["type"]
        return [Cause("FieldValueTypeInvalid", path,
                      f"Invalid value: {_json(value)}: {path} in body must be of type {wanted}: {_json(value)}")]
    causes: list[Cause] = []
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(_json(v) for v in schema["enum"])
        causes.append(Cause("FieldValueNotSupported", path,
                            f"Unsupported value: {_json(value)}: supported values: {allowed}"))
    if isinstance(value, str):
        causes += _string_causes(value, schema, path)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        causes += _number_causes(value, schema, path)
    elif isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            causes.append(Cause("FieldValueTooMany", path, f"Too many: {len(value)}: must have at most "
                                                           f"{schema['maxItems']} items"))
        if "minItems" in schema and len(value) < schema["minItems"]:
            causes.append(Cause("FieldValueInvalid", path, f"Invalid value: {len(value)}: {path} in body should "
                                                           f"have at least {schema['minItems']} items"))
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                causes += schema_causes(item, schema["items"], f"{path}[{i}]")
    elif isinstance(value, dict):
        causes += _object_causes(value, schema, path)
    return causes


def _string_causes(value: str, schema: dict[str, Any], path: str) -> list[Cause]:
    causes = []
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        causes.append(Cause("FieldValueTooLong", path, f"Too long: may not be more than {schema['maxLength']} "
                                                       "bytes"))
    if "minLength" in schema and len(value) < schema["minLength"]:
        causes.append(Cause("FieldValueInvalid", path, f"Invalid value: {_json(value)}: {path} in body should be "
                                                       f"at least {schema['minLength']} chars long"))
    if "pattern" in schema and not re.search(schema["pattern"], value):
        causes.append(Cause("FieldValueInvalid", path, f"Invalid value: {_json(value)}: {path} in body should "
                                                       f"match '{schema['pattern']}'"))
    return causes


def _number_causes(value: float, schema: dict[str, Any], path: str) -> list[Cause]:
    causes = []
    if "minimum" in schema:
        low, strict = schema["minimum"], schema.get("exclusiveMinimum") is True
        if value < low or (strict and value == low):
            word = "greater than" if strict else "greater than or equal to"
            causes.append(Cause("FieldValueInvalid", path, f"Invalid value: {_json(value)}: {path} in body should "
                                                           f"be {word} {low}"))
    if "maximum" in schema:
        high, strict = schema["maximum"], schema.get("exclusiveMaximum") is True
        if value > high or (strict and value == high):
            word = "less than" if strict else "less than or equal to"
            causes.append(Cause("FieldValueInvalid", path, f"Invalid value: {_json(value)}: {path} in body should "
                                                           f"be {word} {high}"))
    return causes


def _object_causes(value: dict[str, Any], schema: dict[str, Any], path: str) -> list[Cause]:
    causes = []
    properties = schema.get("properties") or {}
    for name in schema.get("required") or []:
        if name not in value:
            causes.append(Cause("FieldValueRequired", _join(path, name), "Required value"))
    extra = schema.get("additionalProperties")
    for name, item in value.items():
        if name in properties:
            causes += schema_causes(item, properties[name], _join(path, name))
        elif isinstance(extra, dict):
            causes += schema_causes(item, extra, _join(path, name))
        elif not path and name in ("apiVersion", "kind", "metadata"):
            continue  # every object has them, declared or not
        elif not schema.get("x-kubernetes-preserve-unknown-fields") and properties:
            causes.append(Cause("FieldValueInvalid", _join(path, name), "unknown field (fieldValidation=Strict)"))
    return causes


# --------------------------------------------------------------------------- CEL


class CelRules:
    """Evaluates ``x-kubernetes-validations`` (compiled once per rule text)."""

    def __init__(self) -> None:
        self._env = celpy.Environment()
        self._programs: dict[str, Any] = {}

    def _program(self, rule: str) -> Any:
        if rule not in self._programs:
            self._programs[rule] = self._env.program(self._env.compile(rule))
        return self._programs[rule]

    def causes(self, value: Any, schema: dict[str, Any], path: str, old: Any = None) -> list[Cause]:
        """Every failed rule in ``schema`` and below, for ``value`` at ``path`` (rules with oldSelf skipped)."""
        causes: list[Cause] = []
        if value is None:
            return causes
        for rule in schema.get("x-kubernetes-validations") or []:
            if "oldSelf" in rule["rule"]:
                continue
            where = path + rule.get("fieldPath", "")
            try:
                ok = bool(self._program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)}))
            except celpy.CELEvalError as exc:  # a server reports a rule that cannot evaluate as invalid too
                causes.append(Cause("FieldValueInvalid", where, f"Invalid value: rule {rule['rule']!r}: {exc}"))
                continue
            if not ok:
                message = rule.get("message") or f"failed rule: {rule['rule']}"
                causes.append(Cause("FieldValueInvalid", where, f"Invalid value: \"object\": {message}"))
        if isinstance(value, dict):
            for name, sub in (schema.get("properties") or {}).items():
                causes += self.causes(value.get(name), sub, _join(path, name))
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for name, item in value.items():
                    causes += self.causes(item, extra, _join(path, name))
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                causes += self.causes(item, schema["items"], f"{path}[{i}]")
        return causes


# --------------------------------------------------------------------------- the admission chain


_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "deletionTimestamp")


def builtin_causes(obj: dict[str, Any], version: str = "1.33") -> list[Cause]:
    """kubernetes-validate (strict) of a built-in object; [] for kinds it has no schema for."""
    clean = copy.deepcopy(obj)
    for key in _SERVER_FIELDS:
        (clean.get("metadata") or {}).pop(key, None)
    try:
        kubernetes_validate.validate(clean, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return []
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(object)"
        return [Cause("FieldValueInvalid", where, f"Invalid value: {exc.message}")]
    return []


def _value_at(obj: Any, field: str) -> Any:
    """The value at a cause's field path (``spec.a.b``, ``x[0]``), or the nearest parent that exists."""
    node = obj
    for part in re.split(r"\.|\[|\]", field):
        if not part:
            continue
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            break
    return node


class Admission:
    """The admission chain of one emulated API server: CRD schemas by (group, version, plural), CEL, built-ins.

    ``enabled`` switches everything off (a test that simulates what a CRD let
    through); ``builtin`` switches off only the built-in kinds' check.
    """

    def __init__(self) -> None:
        self.enabled = True
        self.builtin = True
        self.schemas: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.cel = CelRules()
        # Extra checks that play an admission policy or webhook: policy(plural, obj) -> causes (empty: allowed).
        # (A kmock reaction that answers 422 would not do: kmock stores the object anyway.)
        self.policies: list[Callable[[str, dict[str, Any]], list[Cause]]] = []

    def add_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema:
                self.schemas[(spec["group"], version["name"], spec["names"]["plural"])] = schema

    def admit(self, group: str, version: str, plural: str, obj: dict[str, Any],
              old: dict[str, Any] | None = None) -> dict[str, Any]:
        """The object as stored (defaults applied), or AdmissionError (422).

        On an update (``old`` given) a cause whose field holds the same value
        as before is dropped: validation ratcheting (Kubernetes 1.30+), which
        lets a status or metadata write through on an object that an older,
        looser CRD (or a test with admission off) let in.
        """
        if not self.enabled:
            return obj
        try:
            admitted = self._check(group, version, plural, obj)
        except AdmissionError as exc:
            causes = [c for c in exc.causes if old is None or _value_at(old, c.field) != _value_at(obj, c.field)]
            if causes:
                raise AdmissionError(exc.kind, exc.group, exc.name, causes) from None
            return apply_defaults(copy.deepcopy(obj), self.schemas.get((group, version, plural)) or {})
        return admitted

    def _check(self, group: str, version: str, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        name = (obj.get("metadata") or {}).get("name") or (obj.get("metadata") or {}).get("generateName", "")
        for policy in self.policies:
            causes = policy(plural, obj)
            if causes:
                raise AdmissionError(obj.get("kind", plural), group, name, causes)
        schema = self.schemas.get((group, version, plural))
        if schema is None:
            causes = builtin_causes(obj) if self.builtin else []
            if causes:
                raise AdmissionError(obj.get("kind", plural), group, name, causes)
            return obj
        admitted = apply_defaults(copy.deepcopy(obj), schema)
        causes = schema_causes(admitted, schema, "")
        if not causes:
            visible = dict(admitted)
            visible["metadata"] = {k: v for k, v in (admitted.get("metadata") or {}).items()
                                   if k in ("name", "generateName")}
            causes = [Cause(c.reason, c.field.lstrip(".") or "metadata.name", c.message)
                      for c in self.cel.causes(visible, schema, "")]
        if causes:
            raise AdmissionError(obj.get("kind", plural), group, name, causes)
        return admitted
