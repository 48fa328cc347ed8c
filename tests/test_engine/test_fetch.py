"""`moeshard engine fetch` (the operator's download Job for hf:// weights), without network."""

from __future__ import annotations

import json

import pytest

from moeshard.engine.fetch import MARKER, already_fetched, checkpoint_complete, fetch_checkpoint, parse_hf_uri


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
    (folder / MARKER).write_text("{}")  # what a finished fetch leaves
    try:
        assert checkpoint_complete(folder)
        assert fetch_checkpoint("hf://Qwen/tiny", folder) == folder
    finally:
        (folder / MARKER).unlink()


def _fake_download(folder, calls, files):
    def download(repo_id, revision, local_dir, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        assert not (folder / MARKER).exists()  # no marker while files may be half written
        for name, data in files.items():
            (folder / name).write_text(data)
    return download


def test_unmarked_single_file_checkpoint_is_fetched_again_and_marked(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")  # may be a truncated download
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_download(tmp_path, calls, {}))
    assert checkpoint_complete(tmp_path) and not already_fetched(tmp_path)
    fetch_checkpoint("hf://Qwen/tiny", tmp_path)
    assert len(calls) == 1 and json.loads((tmp_path / MARKER).read_text())["repo"] == "Qwen/tiny"
    fetch_checkpoint("hf://Qwen/tiny", tmp_path)
    assert len(calls) == 1  # the marker says the last fetch finished


def test_interrupted_sharded_download_is_never_complete(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")  # the index comes last, never arrived
    (tmp_path / MARKER).write_text("{}")  # even a stale marker does not make it whole
    assert not checkpoint_complete(tmp_path) and not already_fetched(tmp_path)
    calls = []
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_download(
        tmp_path, calls, {"model-00002-of-00002.safetensors": "x", "model.safetensors.index.json": index}))
    fetch_checkpoint("hf://Qwen/Qwen3-30B-A3B", tmp_path)
    assert len(calls) == 1 and (tmp_path / MARKER).is_file() and checkpoint_complete(tmp_path)


def test_a_download_that_leaves_missing_shards_fails_without_a_marker(tmp_path, monkeypatch):
    import huggingface_hub

    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_download(
        tmp_path, [], {"config.json": "{}", "model.safetensors.index.json": index, "model-00001-of-00002.safetensors": "x"}))
    with pytest.raises(RuntimeError, match="Qwen/Qwen3-30B-A3B"):
        fetch_checkpoint("hf://Qwen/Qwen3-30B-A3B", tmp_path)
    assert not (tmp_path / MARKER).exists()


def test_missing_shard_makes_the_checkpoint_incomplete(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not checkpoint_complete(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert not checkpoint_complete(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert checkpoint_complete(tmp_path)
    assert already_fetched(tmp_path)  # a complete index with all its shards needs no marker


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
