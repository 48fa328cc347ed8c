"""Kubernetes value formats of the MoEDeployment API and the strict base of its models.

Patterns of the API server's own validation (apimachinery's validation
package and resource.Quantity), each checked in Python and written into the
CRD, so Python, the CRD and the server refuse the same values.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, StringConstraints, WithJsonSchema
from pydantic.alias_generators import to_camel

DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Kubernetes object names (RFC 1123 label); the deployment name prefixes child names.
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # the front Service takes this name: RFC 1035
MAX_NAME_LENGTH = 40  # leaves room for "-r<replica>-<pod>" suffixes within 63


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration such as ``5m``, ``90s`` or ``1h30m``."""
    if not re.fullmatch(DURATION_PATTERN, text or ""):
        raise ValueError(f"{text!r} is not a duration like 30s, 5m or 1h30m")
    return sum(int(n) * _DURATION_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


# Patterns of the API server's own validation (apimachinery's validation package and resource.Quantity).
# Each is checked here and written into the CRD, so Python, the CRD and the server refuse the same values.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"  # at most 63 characters
MAX_LABEL_VALUE_LENGTH = 63
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # namespaces; at most 63 characters
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # at most 253
MAX_DNS_SUBDOMAIN_LENGTH = 253
# Label and annotation keys: an optional DNS-subdomain prefix and "/", then a name of at most 63 characters.
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
MAX_QUALIFIED_NAME_LENGTH = 317  # a 253-character prefix, "/", a 63-character name
# resource.Quantity without a sign (requests and limits must not be negative): 500m, 8, 64Gi, 1.5, 1e3.
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def quantity_type(pattern: str, expected: str, hint: str) -> Any:
    """An int or string field matching ``pattern``, as the string the manifests carry; its CRD schema too.

    ``expected`` says what the value must be ("a Kubernetes quantity such as 8,
    500m or 64Gi"); ``hint`` is appended to the error for a string that does not match.
    """
    def check(value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"must be {expected} (an integer or a string), got {type(value).__name__} {value!r}")
        text = str(value)
        if not re.fullmatch(pattern, text):
            raise ValueError(f"{text!r} is not {expected} ({hint})")
        return text

    return Annotated[str, BeforeValidator(check), WithJsonSchema(
        {"x-kubernetes-int-or-string": True, "pattern": pattern})]


# x-kubernetes-int-or-string with the quantity pattern, as Kubernetes' own schemas write a Quantity.
Quantity = quantity_type(QUANTITY_PATTERN, "a Kubernetes quantity such as 8, 500m or 64Gi",
                         "no spaces; binary suffixes Ki Mi Gi Ti, decimal k M G T")
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN, max_length=MAX_LABEL_VALUE_LENGTH)]
DnsSubdomain = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, max_length=MAX_DNS_SUBDOMAIN_LENGTH)]


def check_qualified_names(keys: Any, what: str) -> None:
    """Raise ValueError for the first key that is not a Kubernetes qualified name (label/annotation key)."""
    for key in keys:  # the CEL twin: crd.py qualified_keys_rule
        if not re.fullmatch(QUALIFIED_NAME_PATTERN, key) or len(key) > MAX_QUALIFIED_NAME_LENGTH:
            raise ValueError(f"{what} key {key!r} is not a qualified name ([prefix/]name: letters, digits, "
                             "'-', '_', '.', starting and ending alphanumeric, name at most 63 characters)")


class _Section(BaseModel):
    # strict: an integer field refuses true and "2", a string field refuses 2, as the API server does.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True, strict=True
    )


class _Section(BaseModel):
    # strict: an integer field refuses true and "2", a string field refuses 2, as the API server does.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True, strict=True
    )
