"""`moeshard engine fetch` (the pods' init container for hf:// weights), without network."""

from __future__ import annotations

import json

import pytest

from moeshard.engine.fetch import checkpoint_complete, fetch_checkpoint, parse_hf_uri


@pytest.mark.parametrize("uri", ["hf://bad", "s3://a/b", "hf://a/b/c", "hf:// a/b"])
def test_bad_uri_names_the_field(uri):
    with pytest.raises(ValueError, match="--uri"):
        parse_hf_uri(uri)


def test_complete_checkpoint_is_kept_without_downloading(tiny_checkpoint, monkeypatch):
    import huggingface_hub

    def no_network(**_):
        raise AssertionError("must not download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    folder = tiny_checkpoint("qwen3_moe")
    assert checkpoint_complete(folder)
    assert fetch_checkpoint("hf://Qwen/tiny", folder) == folder


def test_missing_shard_makes_the_checkpoint_incomplete(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not checkpoint_complete(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert not checkpoint_complete(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert checkpoint_complete(tmp_path)


def test_incomplete_folder_downloads_the_engine_files(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision, local_dir, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    fetch_checkpoint("hf://Qwen/Qwen3-30B-A3B", tmp_path, "main")
    assert calls and calls[0][0] == "Qwen/Qwen3-30B-A3B" and "*.safetensors" in calls[0][2]
