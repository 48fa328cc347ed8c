"""``spec.model.weights`` of a MoEDeployment: where the checkpoint comes from (operator/weights.py serves it).

An ``hf://`` checkpoint is downloaded once per MoEDeployment by a Job into a
PersistentVolumeClaim the operator owns (``cache`` below); the engine pods
mount that claim read-only. ``pvc://`` and ``file://`` sources are mounted
as they are.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field

from .api_base import DnsSubdomain, _Section, quantity_type

WEIGHTS_URI_PATTERN = r"^(hf://[^/]+/[^/]+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|file:///.*)$"
# accessMode -> the claim's accessModes. ReadOnlyMany: the Job writes through ReadWriteOnce on one node, then
# the engine pods (started only after the Job finished) attach the volume read-only on many nodes.
CACHE_ACCESS_MODES: dict[str, list[str]] = {
    "ReadWriteMany": ["ReadWriteMany"],
    "ReadOnlyMany": ["ReadWriteOnce", "ReadOnlyMany"],
    "ReadWriteOnce": ["ReadWriteOnce"],
}
# A volume size: a Kubernetes quantity above zero, in bytes with an optional binary or decimal suffix (no milli,
# no exponent): 600Gi, 1.5Ti, 500G. The same pattern is the CRD's, so the API server refuses "0" too.
STORAGE_SIZE_PATTERN = r"^([0-9]*[1-9][0-9]*(\.[0-9]+)?|0*\.[0-9]*[1-9][0-9]*)([KMGTPE]i|[kMGTPE])?$"

StorageSize = quantity_type(STORAGE_SIZE_PATTERN, "a volume size above zero such as 600Gi, 1.5Ti or 500G",
                            "binary suffixes Ki Mi Gi Ti Pi Ei, decimal k M G T P E")
CACHE_KEY_LENGTH = 8  # hex digits of the cache key in the claim's and the Job's names


class WeightsCache(_Section):
    """The volume an hf:// checkpoint is downloaded into, once per MoEDeployment (a PVC the operator owns).

    Changing any field (or uri / revision) downloads into a new volume; the old one is deleted once no
    replica group mounts it any more.
    """

    storage_class_name: DnsSubdomain | None = Field(
        None, description="StorageClass of the cache PersistentVolumeClaim; unset uses the cluster's default class.")
    size: StorageSize | None = Field(
        None, description="Size of the cache volume (a quantity: 600Gi, 1Ti); unset is the model's BF16 checkpoint "
        "size (from its figures) plus 10%.")
    access_mode: Literal[tuple(CACHE_ACCESS_MODES)] = Field(  # type: ignore[valid-type]
        "ReadWriteMany",
        description="How engine pods on many nodes share the volume: ReadWriteMany (NFS, CephFS, Filestore...), "
        "ReadOnlyMany (the claim asks ReadWriteOnce and ReadOnlyMany: the download Job writes on one node, then the "
        "pods attach it read-only on many, e.g. GCE persistent disks), or ReadWriteOnce (every pod on one node).")


class WeightsSource(_Section):
    """Where the engine pods read the checkpoint from."""

    uri: str = Field(
        description="Checkpoint location: hf://ORG/NAME (a Hugging Face repo, downloaded once by a Job into a "
        "cache volume the pods mount read-only), pvc://CLAIM/PATH (a PersistentVolumeClaim mounted read-only), or "
        "file:///PATH (a host path already on the node).",
        pattern=WEIGHTS_URI_PATTERN,
    )
    revision: str | None = Field(None, pattern=r"^\S+$", max_length=255,
                                 description="Revision (branch, tag or commit) for hf:// sources.")
    token_secret: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Secret in the deployment's namespace whose key HF_TOKEN is used to download gated hf:// repos.",
    )
    cache: WeightsCache = Field(default_factory=WeightsCache,
                                description="The volume an hf:// checkpoint is downloaded into (hf:// only).")

    @property
    def downloaded(self) -> bool:
        """Whether the operator downloads this source (hf://) rather than mounting it."""
        return self.uri.startswith("hf://")

    def cache_key(self) -> str:
        """Hex key of one download: uri, revision and the cache fields (a change means a new volume)."""
        fields = {"uri": self.uri, "revision": self.revision, **self.cache.model_dump(by_alias=True)}
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:CACHE_KEY_LENGTH]
