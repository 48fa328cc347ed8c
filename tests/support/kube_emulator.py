"""kmock's KubernetesEmulator plus the server behaviour the MoEShard operator relies on.

kmock 0.8's ``KubernetesEmulator`` stores objects and serves list/watch/get/
create/patch/delete over HTTP, but barely more. ``KubeEmulator`` adds, each
piece tested in tests/test_operator/test_kube_emulator.py:

1. create: ``metadata.uid``, ``resourceVersion``, ``generation`` (1),
   ``creationTimestamp`` and ``namespace`` are set; the answer is 201 (the
   kubernetes 37 client returns None for a 200 on create);
2. status subresource: for resources that declare it, ``status`` in a create
   or a main-object patch is ignored and ``.../status`` patches change only
   ``status``;
3. ``generation`` grows only when something outside metadata and status
   changes; ``resourceVersion`` grows on every write;
4. a merge patch carrying a stale ``metadata.resourceVersion`` gets 409
   Conflict; a JSON patch (kopf's finalizer and status patches) is applied,
   and a failed ``test`` op (kopf tests the resourceVersion) gets 422, as
   from a real API server (each recorded in ``conflicts``); ``generateName``
   is honoured on create (kopf's Events use it);
5. scale subresource of custom resources: GET and merge-PATCH of
   ``.../scale`` map ``spec.replicas`` to the CRD's ``specReplicasPath``
   (``add_crd`` reads the paths from the CRD);
6. LIST honours equality-based ``labelSelector`` (``k=v``, ``k!=v``, ``k``,
   ``!k``); set-based selectors (``in``, ``notin``) are not parsed;
7. the resources kopf and the operator use are declared (``v1/namespaces``
   first: without it kopf silently never starts watching), and kmock's path
   parser is fixed for ``/api/v1/namespaces[/NAME]`` (it answers 500).
8. every request from the operator (kopf's ``kopf/*`` User-Agent or the
   operator's own ``moeshard-operator``) is recorded as an RBAC triple
   (API group, resource[/subresource], verb) in ``rbac_calls``; the chart's
   ClusterRole is compared with them (test_zz_rbac_matches_calls.py).

8. admission (kube_admission.py): every create and update (a patch, on the
   object as it would be stored, status included) is defaulted and validated
   like an API server does -- custom resources against their CRD's
   openAPIV3Schema and CEL rules, built-in kinds with kubernetes-validate --
   and refused with a 422 Status (reason Invalid, details.causes with field
   paths). ``admission.enabled = False`` lets anything through (a test that
   plays an object the CRD could not refuse).

Still missing, by design: garbage collection (tests assert ownerReferences),
watch-side label selectors, server-side apply and PUT.

``EmulatorThread`` serves it on 127.0.0.1 from its own thread and event
loop, so that the synchronous kubernetes client is never called from the
emulator's loop.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import os
import tempfile
import threading
import uuid
from typing import Any, Callable

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import dicts as kmock_dicts
from kmock._internal import parsing as kmock_parsing

from support.kube_admission import Admission, AdmissionError

STATUS = "status"
SCALE = "scale"
OPERATOR_AGENTS = ("kopf/", "moeshard-operator")
# (group, resource[/subresource], verb) of every operator request served by any emulator of this process.
RECORDED_RBAC_CALLS: set[tuple[str, str, str]] = set()


def rbac_call(request: kmock.Request) -> tuple[str, str, str] | None:
    """The RBAC (API group, resource, verb) a resource request needs; None for discovery and such."""
    resource, action = request.resource, request.action
    if resource is None or action is None:
        return None
    method = str(request.method.value).upper()
    verb = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}.get(
        str(action.value), "patch" if method == "PATCH" else "update")
    plural = f"{resource.plural}/{request.subresource}" if request.subresource else resource.plural
    return (resource.group or "", plural, verb)


def _parse_path_with_namespaces(path: str) -> kmock_parsing.ParsedPath:
    """kmock 0.8's path parser, fixed for the Namespace resource itself.

    kmock reads ``/api/v1/namespaces`` and ``/api/v1/namespaces/NAME`` as a
    namespace prefix with nothing after it and fails with a 500 (kopf lists
    namespaces to match its namespace patterns). Here they are the
    ``namespaces`` resource and the object NAME.
    """
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return kmock_parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _kmock_parse_path(path)


_kmock_parse_path = kmock_parsing.parse_path
if kmock_parsing.parse_path.__name__ == "parse_path":  # patch once per process
    kmock_parsing.parse_path = _parse_path_with_namespaces


def _resource_info(kind: str, namespaced: bool = True, subresources: tuple[str, ...] = (),
                   singular: str | None = None, shortnames: tuple[str, ...] = ()) -> kmock.ResourceInfo:
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    return kmock.ResourceInfo(kind=kind, namespaced=namespaced, singular=singular or kind.lower(),
                              verbs=verbs, subresources=set(subresources), shortnames=set(shortnames))


# The built-in resources the operator and kopf use.
BUILTIN_RESOURCES: dict[str, kmock.ResourceInfo] = {
    "v1/namespaces": _resource_info("Namespace", namespaced=False, subresources=(STATUS,)),
    "v1/pods": _resource_info("Pod", subresources=(STATUS,)),
    "v1/services": _resource_info("Service", subresources=(STATUS,)),
    "v1/configmaps": _resource_info("ConfigMap"),
    "v1/persistentvolumeclaims": _resource_info("PersistentVolumeClaim", subresources=(STATUS,)),
    "batch/v1/jobs": _resource_info("Job", subresources=(STATUS,)),  # no Job controller: tests patch its status
    "v1/events": _resource_info("Event"),
    "apps/v1/statefulsets": _resource_info("StatefulSet", subresources=(STATUS, SCALE)),
    "policy/v1/poddisruptionbudgets": _resource_info("PodDisruptionBudget", subresources=(STATUS,)),
    "autoscaling/v2/horizontalpodautoscalers": _resource_info("HorizontalPodAutoscaler", subresources=(STATUS,)),
    "networking.k8s.io/v1/networkpolicies": _resource_info("NetworkPolicy"),
}
LWS_RESOURCE = ("leaderworkerset.x-k8s.io/v1/leaderworkersets",
                _resource_info("LeaderWorkerSet", subresources=(STATUS, SCALE)))
KEDA_RESOURCE = ("keda.sh/v1alpha1/scaledobjects", _resource_info("ScaledObject", subresources=(STATUS,)))
COMPUTE_DOMAIN_RESOURCE = ("resource.nvidia.com/v1beta1/computedomains",
                           _resource_info("ComputeDomain", subresources=(STATUS,)))


def _merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch turning ``old`` into ``new`` (removed keys become None)."""
    diff: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            sub = _merge_diff(old[key], value)
            if sub:
                diff[key] = sub
        elif key not in old or old[key] != value:
            diff[key] = value
    return diff


def _selector_matches(selector: str, obj: dict[str, Any]) -> bool:
    """Equality-based label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k`` joined by commas."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key.strip()) != value.strip()
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            ok = labels.get(key.strip()) == value.strip()
        elif term.startswith("!"):
            ok = term[1:] not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def _get_path(obj: dict[str, Any], path: str) -> Any:
    for part in path.strip(".").split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _nest(path: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path.strip(".").split(".")):
        out = {part: out}
    return out


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator with uid/resourceVersion/generation, 201, status and scale subresources, 409."""

    conflicts: list[str] = attrs.field(factory=list, init=False)  # "kind/name" of each 409 served
    rbac_calls: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)  # see 8. above
    # Requests served, by HTTP method and path kind ("events" or "other"), for counting at the server.
    served: collections.Counter = attrs.field(factory=collections.Counter, init=False)
    # Keep only the newest N requests in kmock's history: kmock matches every request against the
    # whole history (quadratic); the benchmark sets this, tests keep everything for assertions.
    history_limit: int | None = None
    admission: Admission = attrs.field(factory=Admission, init=False)  # defaulting and validation
    _version: int = attrs.field(default=0, init=False)
    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _scale_paths: dict[Any, tuple[str, str, str | None]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in BUILTIN_RESOURCES.items():
            self.resources[key] = info

    # ------------------------------------------------------------ declarations
    def add_crd(self, crd: dict[str, Any]) -> None:
        """Serve a CustomResourceDefinition's resource (served versions, subresources, scale paths)."""
        spec = crd["spec"]
        names = spec["names"]
        self.admission.add_crd(crd)
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            subresources = version.get("subresources") or {}
            key = f"{spec['group']}/{version['name']}/{names['plural']}"
            self.resources[key] = _resource_info(
                names["kind"], namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                subresources=tuple(subresources), singular=names.get("singular"),
                shortnames=tuple(names.get("shortNames") or ()),
            )
            if SCALE in subresources:
                scale = subresources[SCALE]
                self._scale_paths[kmock.resource(key)] = (
                    scale["specReplicasPath"], scale["statusReplicasPath"], scale.get("labelSelectorPath"))

    def add_namespace(self, name: str) -> None:
        """Seed a Namespace object (kmock 0.8 cannot parse ``POST /api/v1/namespaces``: it reads
        ``namespaces`` as the namespace prefix of a path)."""
        self.objects[kmock.resource("v1/namespaces"), None, name] = {
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": self._next_version()},
        }

    def _has_status(self, resource: Any) -> bool:
        for declared in self.resources:
            if declared == resource:
                return STATUS in self.resources[declared].subresources
        return False

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _live(self, resource: Any, namespace: str | None, name: str | None) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    # ------------------------------------------------------------ request rewriting
    def _evolve(self, request: kmock.Request, **changes: Any) -> kmock.Request:
        """A rewritten request, recorded in place of the original (kmock matches reactions by identity)."""
        new = attrs.evolve(request, **changes)
        for i, seen in enumerate(self._requests):
            if seen is request:
                self._requests[i] = new
        return new

    def _stamp_create(self, request: kmock.Request) -> kmock.Request:
        data = json.loads(json.dumps(request.data or {}))
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace:
            meta["namespace"] = request.namespace
        meta.update(
            uid=str(uuid.uuid4()), resourceVersion=self._next_version(), generation=1,
            creationTimestamp=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        if self._has_status(request.resource):
            data.pop("status", None)
        return self._evolve(request, data=self._admit(request.resource, data))

    def _admit(self, resource: Any, obj: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
        """The object as admission would store it (defaults applied), or a 422 Invalid."""
        group, version, plural = resource.group or "", resource.version or "", resource.plural or ""
        info = next((self.resources[r] for r in self.resources if r == resource), None)
        obj = {"apiVersion": f"{group}/{version}" if group else version,  # a server stores both
               "kind": info.kind if info is not None else plural} | obj
        try:
            return self.admission.admit(group, version, plural, obj, old)
        except AdmissionError as exc:
            status = exc.status()
            raise kmock.KubernetesError(status=422, reason="Invalid", message=status["message"],
                                        details=status["details"])

    def _rewrite_patch(self, request: kmock.Request, patch: Any, subresource: str | None) -> kmock.Request:
        live = self._live(request.resource, request.namespace, request.name)
        if live is None:
            raise kmock.KubernetesObjectNotFoundError()
        if isinstance(patch, list):  # JSON patch (kopf's finalizer and status patches)
            try:
                patched = jsonpatch.apply_patch(live, patch, in_place=False)
            except jsonpatch.JsonPatchTestFailed as exc:  # kopf's {"op": "test"} on resourceVersion
                self.conflicts.append(f"{live.get('kind', request.resource.plural)}/{request.name}")
                raise kmock.KubernetesError(status=422, reason="Invalid", message=f"JSON patch test failed: {exc}")
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
            patch = _merge_diff(live, patched)
            patch.get("metadata", {}).pop("resourceVersion", None)  # tested above already
        if not isinstance(patch, dict):
            raise kmock.KubernetesError(status=415, reason="UnsupportedMediaType",
                                        message="merge patches (objects) and JSON patches (lists) only")
        patch = json.loads(json.dumps(patch))
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and str(wanted) != str(live["metadata"].get("resourceVersion")):
            self.conflicts.append(f"{live.get('kind', request.resource.plural)}/{request.name}")
            raise kmock.KubernetesError(
                status=409, reason="Conflict",
                message=f"Operation cannot be fulfilled on {request.resource.plural} \"{request.name}\": "
                        "the object has been modified; please apply your changes to the latest version and try again",
            )
        if subresource == STATUS:
            patch = {"status": patch.get("status")} if "status" in patch else {}
        elif self._has_status(request.resource):
            patch.pop("status", None)
        merged = kmock_dicts.patch_dict(live, patch)
        admitted = self._admit(request.resource, merged, live)
        if admitted != merged:  # defaults filled in: store them too
            patch = _merge_diff(live, admitted)
            merged = admitted
        if not isinstance(patch.get("metadata"), dict):
            patch["metadata"] = {}
        meta_patch = patch["metadata"]
        meta_patch["resourceVersion"] = self._next_version()
        body_changed = any(merged.get(k) != live.get(k) for k in set(merged) | set(live)
                           if k not in ("metadata", "status"))
        if body_changed:
            meta_patch["generation"] = int(live["metadata"].get("generation") or 1) + 1
        return self._evolve(request, data=patch, subresource=None)

    def _scale_of(self, resource: Any, live: dict[str, Any]) -> dict[str, Any]:
        spec_path, status_path, selector_path = self._scale_paths[resource]
        status: dict[str, Any] = {"replicas": _get_path(live, status_path) or 0}
        if selector_path and _get_path(live, selector_path):
            status["selector"] = _get_path(live, selector_path)
        meta = live["metadata"]
        return {
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                         if k in meta},
            "spec": {"replicas": _get_path(live, spec_path) or 0},
            "status": status,
        }

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        selector = (request.params or {}).get("labelSelector")
        if selector:
            payload["items"] = [item for item in payload["items"] if _selector_matches(selector, item)]
        return payload

    async def _handle_scale(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        resource = next((r for r in self._scale_paths if r == request.resource), None)
        if resource is None:
            raise kmock.KubernetesNotFoundError(message="this resource has no scale subresource")
        if request.method == "PATCH":
            data = request.data if isinstance(request.data, dict) else {}
            replicas = (data.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise kmock.KubernetesError(status=422, reason="Invalid", message="spec.replicas: must be an integer >= 0")
            patch = _nest(self._scale_paths[resource][0], replicas)
            if (data.get("metadata") or {}).get("resourceVersion"):
                patch["metadata"] = {"resourceVersion": data["metadata"]["resourceVersion"]}
            await super()._handle(self._rewrite_patch(request, patch, None))
        elif request.method != "GET":
            raise kmock.KubernetesError(status=405, reason="MethodNotAllowed", message="GET and PATCH only")
        live = self._live(request.resource, request.namespace, request.name)
        if live is None:
            raise kmock.KubernetesObjectNotFoundError()
        return aiohttp.web.json_response(self._scale_of(resource, live))

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        self.served[(str(request.method.value), "events" if request.url.path.endswith("/events") else "other")] += 1
        if request.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS):
            call = rbac_call(request)
            if call is not None:
                self.rbac_calls.add(call)
        if self.history_limit is not None and len(self._requests) > 2 * self.history_limit:
            del self._requests[: len(self._requests) - self.history_limit]
        if request.resource is None or request.name is None and request.action != kmock.action.CREATE:
            return await super()._handle(request)
        if request.subresource == SCALE:
            async with self._write_lock:
                return await self._handle_scale(request)
        if request.action not in (kmock.action.CREATE, kmock.action.UPDATE):
            return await super()._handle(request)
        async with self._write_lock:  # check-and-write is atomic among writers
            if request.action == kmock.action.CREATE:
                response = await super()._handle(self._stamp_create(request))
                if response.status == 200:
                    response.set_status(201)
                return response
            return await super()._handle(self._rewrite_patch(request, request.data, request.subresource))


class EmulatorThread:
    """A KubeEmulator served on 127.0.0.1 from its own thread and event loop.

    ``call(fn)`` runs ``fn(emulator)`` inside the emulator's loop (safe reads
    of ``emulator.objects`` from the test thread).
    """

    def __init__(self, emulator: KubeEmulator):
        self.emulator = emulator
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kube-emulator", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> "EmulatorThread":
        self._thread.start()
        self._ready.wait(10)
        if self._error or not self.url:
            raise RuntimeError(f"emulator did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, fn: Callable[[KubeEmulator], Any], timeout: float = 10) -> Any:
        assert self._loop is not None

        async def run() -> Any:
            return fn(self.emulator)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def set_admission(self, enabled: bool) -> None:
        """Switch admission (defaulting and validation) on or off; off plays what a looser CRD let in."""
        self.call(lambda em: setattr(em.admission, "enabled", enabled))

    def objects(self, resource: str, namespace: str | None = None) -> dict[str, dict[str, Any]]:
        """name -> raw object of the live objects of ``resource`` ('apps/v1/statefulsets')."""
        wanted = kmock.resource(resource)

        def collect(emulator: KubeEmulator) -> dict[str, dict[str, Any]]:
            out = {}
            for (res, ns, name), obj in emulator.objects.items():
                if res == wanted and not obj.deleted and (namespace is None or ns == namespace):
                    out[name] = json.loads(json.dumps(obj.raw))
            return out

        return self.call(collect)

    def write_kubeconfig(self, directory: str | None = None) -> str:
        """A kubeconfig file pointing at this emulator; returns its path."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": "emulator"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
        }
        fd, path = tempfile.mkstemp(prefix="kubeconfig-", suffix=".json", dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        return path


class OperatorThread:
    """The real kopf operator (``kopf.operator``) in a background thread with its own event loop.

    Handlers come from ``registry`` (kopf's default registry when None). ``stop()`` sets kopf's stop flag and waits for a clean exit.
    """

    def __init__(self, *, namespaces: list[str], memo: Any = None, settings: Any = None,
                 standalone: bool = True, peering_name: str | None = None, priority: int = 0,
                 registry: Any = None, clusterwide: bool = False, name: str = "kopf-operator"):
        self.kwargs = dict(namespaces=namespaces, memo=memo, settings=settings, standalone=standalone,
                           peering_name=peering_name, priority=priority, registry=registry,
                           clusterwide=clusterwide)
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        # The thread's name is in every log record kopf writes from its loop (tells operators apart).
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        import kopf

        try:
            asyncio.run(kopf.operator(stop_flag=self.stop_flag, ready_flag=self.ready_flag, **self.kwargs))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self, timeout: float = 20) -> "OperatorThread":
        self._thread.start()
        if not self.ready_flag.wait(timeout):
            raise RuntimeError(f"kopf did not get ready in {timeout} s: {self.error!r}")
        return self

    def stop(self, timeout: float = 20) -> None:
        self.stop_flag.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("kopf did not stop")


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout`` seconds.

    The default is generous (a loaded CI machine); a passing test returns as soon as the predicate holds.
    """
    import time

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}; last value {last!r}")


def stale_list_reaction(emulator: Any, resource: str, namespace: str, list_kind: str,
                        when: Callable[[], bool] = lambda: True,
                        until: Callable[[], bool] | None = None) -> tuple[Callable[[Any], dict], list[int]]:
    """A LIST reaction that serves ``resource`` one resourceVersion old, once, the first time ``when()`` holds.

    It plays a lagging informer cache: a patch built on it gets a real 409. With ``until``, the
    cache lags on every LIST from then on until ``until()`` holds (say, until a write built on it
    was refused), so a reader that writes nothing cannot use it up first. Returns the reaction
    (install it with ``em["list", kmock.resource(resource)] << reaction``) and a list with one
    entry per stale list served.
    """
    served: list[int] = []

    def reaction(request: Any) -> dict:
        done = until() if until is not None else bool(served)
        if done or not when():
            raise NotImplementedError  # fall through to the emulator's normal list
        served.append(1)
        items = []
        for (res, ns, _name), obj in emulator.emulator.objects.items():
            if res == kmock.resource(resource) and ns == namespace and not obj.deleted:
                item = json.loads(json.dumps(obj.raw))
                item["metadata"]["resourceVersion"] = str(int(item["metadata"]["resourceVersion"]) - 1)
                items.append(item)
        return {"kind": list_kind, "metadata": {}, "items": items}

    return reaction, served
