"""The small apply layer between the reconciler and the API server.

Plain dicts in and out over the official ``kubernetes`` client's ApiClient
(no typed models: one code path for built-in and custom kinds). Synchronous:
handlers call it from a worker thread, never from the event loop.

* ``apply(desired, live)``: create when absent, merge-patch when the live
  object's ``moeshard.io/desired-hash`` annotation differs from the desired
  one, nothing at all when equal (a no-op reconcile makes no write). Patches
  carry the live ``resourceVersion``; a 409 (stale version, or AlreadyExists
  on a create that raced) re-reads the object and tries again.
* Listing filters labels on the client as well as through ``labelSelector``.

Known limit: a merge patch cannot remove a field the desired object no
longer has. Replica groups are replaced whole when their hash changes, and
the other children (Services, PDBs, ConfigMap, ComputeDomains) have no
optional fields, so nothing the operator writes depends on removal today.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from kubernetes import client as k8s_client

from .manifests import HASH_ANNOTATION, KINDS

log = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = "moeshard-operator"
CONFLICT_RETRIES = 5


class KubeError(Exception):
    """An API error: HTTP status, Kubernetes reason and message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def resource_path(api_version: str, plural: str, namespace: str | None, name: str | None = None,
                  subresource: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def kind_route(obj: dict[str, Any]) -> tuple[str, str]:
    """(apiVersion, plural) of an object of a kind the operator writes."""
    try:
        return KINDS[obj["kind"]]
    except KeyError:
        raise KubeError(400, "UnknownKind", f"the operator does not write {obj.get('kind')!r}") from None


def labels_match(obj: dict[str, Any], labels: dict[str, str]) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


def fields_match(obj: dict[str, Any], fields: dict[str, str]) -> bool:
    """True when every dotted path in ``fields`` holds that value (as a field selector matches)."""
    for path, want in fields.items():
        value: Any = obj
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if str(value) != want:
            return False
    return True


@dataclass
class ApplyResult:
    """What ``apply`` did: created, patched or unchanged; ``obj`` is the live object afterwards."""

    action: str
    obj: dict[str, Any]
    conflicts: int = 0


@dataclass
class Kube:
    """A thin JSON client. ``api`` is a configured kubernetes.client.ApiClient."""

    api: k8s_client.ApiClient
    timeout: float = 30.0
    requests: int = 0  # requests sent, for the bench
    writes: int = 0
    on_request: Callable[[str, str], None] | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- raw
    def request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
                content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        m, url, headers, body, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=list((query or {}).items()),
            header_params=headers, body=body, auth_settings=["BearerToken"],
        )
        self.requests += 1
        if method != "GET":
            self.writes += 1
        if self.on_request:
            self.on_request(method, path)
        response = self.api.call_api(m, url, header_params=headers, body=body, _request_timeout=self.timeout)
        response.read()
        text = response.data.decode("utf-8") if response.data else ""
        data = json.loads(text) if text else None
        if not 200 <= response.status <= 299:
            reason = (data or {}).get("reason", "") if isinstance(data, dict) else ""
            message = (data or {}).get("message", text[:200]) if isinstance(data, dict) else text[:200]
            raise KubeError(response.status, reason, message)
        return data

    # ---------------------------------------------------------------- verbs
    def get(self, api_version: str, plural: str, namespace: str | None, name: str,
            subresource: str | None = None) -> dict[str, Any] | None:
        try:
            return self.request("GET", resource_path(api_version, plural, namespace, name, subresource))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None,
             labels: dict[str, str] | None = None, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Objects matching ``labels`` and ``fields`` (dotted paths, e.g. involvedObject.kind), both also checked here."""
        labels, fields = labels or {}, fields or {}
        query = {}
        if labels:
            query["labelSelector"] = ",".join(f"{k}={v}" for k, v in labels.items())
        if fields:
            query["fieldSelector"] = ",".join(f"{k}={v}" for k, v in fields.items())
        data = self.request("GET", resource_path(api_version, plural, namespace), query=query or None) or {}
        return [item for item in data.get("items") or [] if labels_match(item, labels) and fields_match(item, fields)]

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        api_version, plural = kind_route(obj)
        return self.request("POST", resource_path(api_version, plural, obj["metadata"].get("namespace")), obj)

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str, patch: dict[str, Any],
              subresource: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", resource_path(api_version, plural, namespace, name, subresource), patch,
                            content_type=MERGE_PATCH)

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> bool:
        """Delete with background propagation; False when it was already gone."""
        try:
            self.request("DELETE", resource_path(api_version, plural, namespace, name),
                         {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"})
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    def has_api(self, api_version: str, plural: str) -> bool:
        """Whether the server serves ``plural`` in ``api_version`` (e.g. a CRD is installed)."""
        try:
            data = self.request("GET", "/api/v1" if api_version == "v1" else f"/apis/{api_version}") or {}
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in data.get("resources") or [])

    # ---------------------------------------------------------------- apply
    def apply(self, desired: dict[str, Any], live: dict[str, Any] | None, force: bool = False) -> ApplyResult:
        """Create or patch ``desired`` so that the live object matches it; no write when it already does.

        ``live`` is the object as last listed (possibly stale): a 409 makes
        apply re-read and retry up to CONFLICT_RETRIES times. ``force``
        patches even when the desired-hash annotations agree.
        """
        api_version, plural = kind_route(desired)
        meta = desired["metadata"]
        conflicts = 0
        for _ in range(CONFLICT_RETRIES + 1):
            if live is None:
                try:
                    return ApplyResult("created", self.create(desired), conflicts)
                except KubeError as exc:
                    if exc.status != 409:
                        raise
                    conflicts += 1  # created meanwhile (another instance, an earlier half-done reconcile)
                    live = self.get(api_version, plural, meta.get("namespace"), meta["name"])
                    continue
            live_hash = ((live.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)
            if live_hash == meta["annotations"][HASH_ANNOTATION] and not force:
                return ApplyResult("unchanged", live, conflicts)
            patch = json.loads(json.dumps(desired))
            patch["metadata"]["resourceVersion"] = live["metadata"].get("resourceVersion")
            try:
                obj = self.patch(api_version, plural, meta.get("namespace"), meta["name"], patch)
                return ApplyResult("patched", obj, conflicts)
            except KubeError as exc:
                if exc.status not in (404, 409):
                    raise
                conflicts += 1
                log.info("conflict on %s/%s (%s); re-reading", desired["kind"], meta["name"], exc.reason)
                live = self.get(api_version, plural, meta.get("namespace"), meta["name"])
        raise KubeError(409, "Conflict", f"{desired['kind']} {meta['name']}: still conflicting after "
                                         f"{CONFLICT_RETRIES} retries")

    def patch_status(self, api_version: str, plural: str, live: dict[str, Any] | None,
                     build: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Merge-patch ``status`` of ``live`` from ``build(live_status)``; None from build means no write.

        The patch carries the resourceVersion of the object it was computed
        from, so a concurrent status writer (the balancer) is never
        overwritten: on 409 the object is re-read and ``build`` runs again.
        """
        namespace = live["metadata"].get("namespace") if live else None
        name = live["metadata"]["name"] if live else ""
        for _ in range(CONFLICT_RETRIES + 1):
            if live is None:
                return None
            status = build(live.get("status") or {})
            if status is None:
                return None
            body = {"metadata": {"resourceVersion": live["metadata"].get("resourceVersion")}, "status": status}
            try:
                return self.patch(api_version, plural, namespace, name, body, subresource="status")
            except KubeError as exc:
                if exc.status != 409:
                    raise
                live = self.get(api_version, plural, namespace, name)
        raise KubeError(409, "Conflict", f"status of {name}: still conflicting after {CONFLICT_RETRIES} retries")


def kube_from_config(context: str | None = None) -> Kube:
    """A Kube from the in-cluster service account or the kubeconfig ($KUBECONFIG / ~/.kube/config)."""
    from kubernetes import config

    configuration = k8s_client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(context=context, client_configuration=configuration)
    api = k8s_client.ApiClient(configuration)
    api.user_agent = USER_AGENT  # tells its requests apart in audit logs (and in the tests)
    return Kube(api)
