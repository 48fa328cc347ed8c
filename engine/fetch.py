"""Fetch a checkpoint into the engine pod's model folder before the engine starts.

The operator runs ``moeshard engine fetch`` as an init container when the
weights source is ``hf://ORG/NAME``: it downloads the files the engine reads
(config.json, safetensors shards and their index, tokenizer files) into the
pod's model volume. A folder that already holds a complete checkpoint is kept
as it is, so a restarted pod does not download again. Gated repositories read
the token from the HF_TOKEN environment variable (a Secret, see
spec.model.weights.tokenSecret).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HF_URI = re.compile(r"^hf://(?P<repo>[^/\s]+/[^/\s]+)$")
# What the engine reads (engine/loading.py, engine/config.py) and the tokenizer it may use.
WANTED_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model"]


def parse_hf_uri(uri: str) -> str:
    """``hf://ORG/NAME`` -> ``ORG/NAME``; ValueError naming the field otherwise."""
    match = HF_URI.match(uri)
    if not match:
        raise ValueError(f"--uri: expected hf://ORG/NAME, got {uri!r}")
    return match.group("repo")


def checkpoint_complete(folder: Path) -> bool:
    """True when ``folder`` holds config.json and every safetensors shard its index names."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((folder / shard).is_file() for shard in shards)
    return any(folder.glob("*.safetensors"))


def fetch_checkpoint(uri: str, out: str | Path, revision: str | None = None) -> Path:
    """Download the engine's files of ``uri`` into ``out`` unless a complete checkpoint is there."""
    repo = parse_hf_uri(uri)
    folder = Path(out)
    if checkpoint_complete(folder):
        print(f"moeshard engine fetch: {folder} already holds a complete checkpoint; nothing to do", flush=True)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    from huggingface_hub import snapshot_download  # progress bars on stderr

    print(f"moeshard engine fetch: downloading {repo}@{revision or 'main'} into {folder}", flush=True)
    snapshot_download(repo_id=repo, revision=revision, local_dir=str(folder), allow_patterns=WANTED_FILES)
    if not checkpoint_complete(folder):
        raise RuntimeError(f"{repo}: no config.json and safetensors shards after the download")
    return folder
