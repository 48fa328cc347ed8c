"""Fetch a checkpoint into the engine pod's model folder before the engine starts.

The operator runs ``moeshard engine fetch`` once per MoEDeployment, in a download
Job, when the weights source is ``hf://ORG/NAME`` (operator/weights.py): it
downloads the files the engine reads (config.json, safetensors shards and their
index, tokenizer files) into the cache volume the engine pods then mount
read-only. A folder that already holds a complete checkpoint is kept as it is,
so a retried Job pod does not download again: complete means a
finished fetch left its marker file (``.moeshard-fetch-complete``, written
only after the download returned) or the folder's safetensors index names
shards that are all present. A folder with only some ``-of-`` shards and no
index (an interrupted download) is fetched again. Gated repositories read
the token from the HF_TOKEN environment variable (a Secret, see
spec.model.weights.tokenSecret).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

MARKER = ".moeshard-fetch-complete"
SHARD_NAME = re.compile(r"-\d+-of-\d+\.safetensors$")  # model-00001-of-00003.safetensors
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


def _index_complete(folder: Path) -> bool | None:
    """None without an index; else whether every shard the index names is present."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    except (ValueError, AttributeError):
        return False  # a truncated or malformed index
    return bool(shards) and all((folder / shard).is_file() for shard in shards)


def checkpoint_complete(folder: Path) -> bool:
    """True when ``folder`` holds config.json and its weights look whole.

    With an index: every shard it names. Without one: at least one
    ``*.safetensors`` and none named like a shard of a sharded checkpoint
    (``-0000i-of-0000n``), whose index must then be there too. A lone
    unsharded file cannot be told from a truncated one here; fetch_checkpoint
    asks for its marker as well.
    """
    if not (folder / "config.json").is_file():
        return False
    indexed = _index_complete(folder)
    if indexed is not None:
        return indexed
    files = [path.name for path in folder.glob("*.safetensors")]
    return bool(files) and not any(SHARD_NAME.search(name) for name in files)


def already_fetched(folder: Path) -> bool:
    """A finished fetch (marker and complete files) or a complete indexed checkpoint put there some other way."""
    if not checkpoint_complete(folder):
        return False
    return (folder / MARKER).is_file() or bool(_index_complete(folder))


def fetch_checkpoint(uri: str, out: str | Path, revision: str | None = None) -> Path:
    """Download the engine's files of ``uri`` into ``out`` unless a complete checkpoint is there."""
    repo = parse_hf_uri(uri)
    folder = Path(out)
    if already_fetched(folder):
        print(f"moeshard engine fetch: {folder} already holds a complete checkpoint; nothing to do", flush=True)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    from huggingface_hub import snapshot_download  # progress bars on stderr

    print(f"moeshard engine fetch: downloading {repo}@{revision or 'main'} into {folder}", flush=True)
    snapshot_download(repo_id=repo, revision=revision, local_dir=str(folder), allow_patterns=WANTED_FILES)
    if not checkpoint_complete(folder):
        raise RuntimeError(f"{repo}: no config.json and complete safetensors shards after the download")
    (folder / MARKER).write_text(json.dumps({"repo": repo, "revision": revision or "main"}) + "\n")
    return folder
