"""EngineRuntime in one process (EP = 1, gloo world of one): loading, placement files, generation options."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeshard.engine.config import ModelConfig, ModelConfigError, ParallelConfig
from moeshard.engine.loading import CheckpointError, CheckpointReader
from moeshard.engine.runtime import EngineRuntime
from moeshard.engine.verify import local_env, reference_outputs
from moeshard.core.engine_env import EngineEnvironment
from moeshard.core.placement import initial_placement

PROMPTS = [[5, 6, 7, 8, 9], [100, 3], [42]]


def _runtime(model_dir, **kw) -> EngineRuntime:
    return EngineRuntime.create(local_env(model_dir, 1, **kw))


@pytest.fixture
def qwen_runtime(tiny_checkpoint):
    rt = _runtime(tiny_checkpoint("qwen3_moe"))
    yield rt
    rt.close()


# --------------------------------------------------------------------------- generation

def test_generate_stops_at_eos_and_honours_per_prompt_limits(qwen_runtime, tiny_checkpoint):
    _, ref = reference_outputs(tiny_checkpoint("qwen3_moe"), PROMPTS, 6)
    out = qwen_runtime.generate(PROMPTS, [6, 2, 0])
    assert out == [ref[0], ref[1][:2], []]
    eos = ref[0][2]
    stopped = qwen_runtime.generate(PROMPTS[:1], 6, eos_token_id=eos)
    assert stopped == [ref[0][: ref[0].index(eos) + 1]]


def test_each_sequence_stops_at_its_own_stop_set(qwen_runtime, tiny_checkpoint):
    _, ref = reference_outputs(tiny_checkpoint("qwen3_moe"), PROMPTS, 6)  # unconstrained greedy runs
    stop = ref[0][1]
    before = qwen_runtime.expert_token_counts().sum()
    out = qwen_runtime.generate(PROMPTS[:2], 6, stop_token_ids=[{stop}, set()])
    assert out[0] == ref[0][: ref[0].index(stop) + 1]  # the prefix up to and including its stop token
    assert out[1] == ref[1]  # the other sequence went on to its limit
    # A finished sequence leaves the step batch: positions processed = prompts + every fed-back token.
    fed = len(PROMPTS[0]) + len(PROMPTS[1]) + (len(out[0]) - 1) + (len(out[1]) - 1)
    assert qwen_runtime.expert_token_counts().sum() - before == fed * 4 * 2  # top-4, 2 MoE layers
    # eos_token_id still applies to every sequence, on top of the per-prompt sets.
    eos = ref[1][2]
    both = qwen_runtime.generate(PROMPTS[:2], 6, eos_token_id=eos, stop_token_ids=[{stop}, set()])
    assert both == [out[0], ref[1][: ref[1].index(eos) + 1]]
    with pytest.raises(ValueError, match="stop_token_ids"):
        qwen_runtime.generate(PROMPTS[:2], 6, stop_token_ids=[{stop}])


def test_bad_prompts_are_refused_with_the_field(qwen_runtime):
    with pytest.raises(ValueError, match=r"prompts\[1\]: token id 128"):
        qwen_runtime.generate([[1], [128]], 2)
    with pytest.raises(ValueError, match=r"prompts\[0\]: empty"):
        qwen_runtime.forward_logits([[]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        qwen_runtime.generate([[1], [2]], [1])


def test_counters_have_the_contract_shapes(qwen_runtime):
    before = qwen_runtime.expert_token_counts().copy()
    qwen_runtime.forward_logits([[1, 2, 3]])
    after = qwen_runtime.expert_token_counts()
    assert after.shape == (2, 8) and after.dtype == np.int64
    np.testing.assert_array_equal((after - before).sum(axis=1), [3 * 4, 3 * 4])  # 3 tokens x top-4, per layer
    assert qwen_runtime.rank_token_counts().shape == (1,)
    assert set(qwen_runtime.link_bytes()) == {"intra_domain", "inter_domain"}
    assert qwen_runtime.tokenizer_or_none is None


# --------------------------------------------------------------------------- placement file at start

def test_valid_placement_file_is_used(tiny_checkpoint, tmp_path):
    placement = initial_placement(2, 8, 1, 10).with_version(7)
    path = tmp_path / "placement.json"
    path.write_text(placement.to_json())
    rt = _runtime(tiny_checkpoint("qwen3_moe"), placement_file=path)
    try:
        assert rt.placement_version == 7 and rt.placement.slots_per_gpu == 10
        assert rt.model.moe_layers[0].w_gate_up.shape[0] == 10
    finally:
        rt.close()


@pytest.mark.parametrize("content", ["{not json", json.dumps(initial_placement(2, 8, 2, 4).to_dict()),
                                     json.dumps(initial_placement(3, 8, 1, 8).to_dict())])
def test_unusable_placement_file_falls_back_to_the_initial_layout(tiny_checkpoint, tmp_path, caplog, content):
    path = tmp_path / "placement.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="moeshard.engine.runtime"):
        rt = _runtime(tiny_checkpoint("mixtral"), placement_file=path)
    try:
        assert rt.placement_version == 0 and rt.placement.slots_per_gpu == 8
        assert "refused" in caplog.text
    finally:
        rt.close()


# --------------------------------------------------------------------------- loading

def _fuse_experts(src, dst, arch: str) -> None:
    """Rewrite a checkpoint with transformers 5's fused in-memory expert names."""
    cfg = ModelConfig.from_pretrained(src)
    leaf = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}[arch]
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in cfg.moe_layer_ids:
        p = f"model.layers.{layer}.{cfg.moe_prefix}.experts"
        gu = [torch.cat([tensors[f"{p}.{e}.{leaf[0]}.weight"], tensors[f"{p}.{e}.{leaf[1]}.weight"]]) for e in range(8)]
        out[f"{p}.gate_up_proj"] = torch.stack(gu)
        out[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.{leaf[2]}.weight"] for e in range(8)])
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_expert_names_load_the_same_model(tiny_checkpoint, tmp_path, arch):
    src = tiny_checkpoint(arch)
    _fuse_experts(src, tmp_path / "fused", arch)
    logits = []
    for folder in (src, tmp_path / "fused"):
        rt = _runtime(folder)
        try:
            logits.append(rt.forward_logits(PROMPTS))
        finally:
            rt.close()
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_reader_reads_only_the_requested_slices(tiny_checkpoint):
    reader = CheckpointReader(tiny_checkpoint("qwen3_moe"))
    q = reader.rows("model.layers.0.self_attn.q_proj.weight", 16, 32)
    o = reader.cols("model.layers.0.self_attn.o_proj.weight", 0, 32)
    assert q.shape == (16, 64) and o.shape == (64, 32)
    assert reader.bytes_loaded["dense"] == (16 * 64 + 64 * 32) * 4
    gu, down = reader.expert("qwen3_moe", "model.layers.1.mlp", 3)
    assert gu.shape == (64, 64) and down.shape == (64, 32)
    assert reader.bytes_loaded["experts"] == 3 * 32 * 64 * 4
    with pytest.raises(CheckpointError, match="expert 9 of model.layers.0.mlp"):
        reader.expert("qwen3_moe", "model.layers.0.mlp", 9)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        CheckpointReader(tmp_path)


# --------------------------------------------------------------------------- config

def test_model_config_reads_both_architectures(tiny_checkpoint):
    q = ModelConfig.from_pretrained(tiny_checkpoint("qwen3_moe"))
    m = ModelConfig.from_pretrained(tiny_checkpoint("mixtral"))
    assert (q.num_experts, q.top_k, q.head_dim, q.qk_norm, q.norm_topk_prob, q.moe_layer_ids) == (8, 4, 16, True, True, (0, 1))
    assert (m.num_experts, m.top_k, m.head_dim, m.qk_norm, m.moe_prefix) == (8, 2, 16, False, "block_sparse_moe")


@pytest.mark.parametrize("patch,field", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_type"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_model_config_errors_name_the_field(tiny_checkpoint, patch, field):
    raw = json.loads((tiny_checkpoint("qwen3_moe") / "config.json").read_text())
    raw.update(patch)
    with pytest.raises(ModelConfigError, match=field):
        ModelConfig.from_dict(raw)


def test_qwen3_dense_layers_are_not_moe():
    raw = {"model_type": "qwen3_moe", "vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2,
           "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4,
           "mlp_only_layers": [0], "decoder_sparse_step": 1}
    assert ModelConfig.from_dict(raw).moe_layer_ids == (1, 2, 3)


def test_parallel_config_layout_and_errors():
    p = ParallelConfig(rank=5, world_size=8, tp_size=2, gpus_per_domain=4, gpus_per_pod=4)
    assert (p.tp_rank, p.dp_rank, p.dp_size, p.tp_group_ranks(), p.num_domains, p.hierarchical) == (1, 2, 4, [4, 5], 2, True)
    with pytest.raises(ValueError, match="must divide the EP world size"):
        ParallelConfig(rank=0, world_size=4, tp_size=3)
    with pytest.raises(ValueError, match="multiple of GPUs per NVLink domain"):
        ParallelConfig(rank=0, world_size=6, gpus_per_domain=4)
    with pytest.raises(ValueError, match="never crosses a pod"):
        ParallelConfig(rank=0, world_size=8, tp_size=4, gpus_per_pod=2)
    env = EngineEnvironment.from_environ({"MOESHARD_EXPERT_EP": "4", "MOESHARD_PODS_PER_GROUP": "2",
                                          "MOESHARD_GPUS_PER_POD": "2", "MOESHARD_POD_INDEX": "1",
                                          "MOESHARD_ATTENTION_TP": "2"})
    assert ParallelConfig.from_env(env, 1).rank == 3
    with pytest.raises(ValueError, match="local_rank 2"):
        ParallelConfig.from_env(env, 2)


def test_large_checkpoints_show_loading_progress(tiny_checkpoint, monkeypatch, capsys):
    import moeshard.engine.model as model_module

    rt = _runtime(tiny_checkpoint("mixtral"))  # tiny: quiet
    rt.close()
    assert "loading layers" not in capsys.readouterr().err
    monkeypatch.setattr(model_module, "PROGRESS_MIN_BYTES", 0)  # pretend it is large
    rt = _runtime(tiny_checkpoint("mixtral"))
    rt.close()
    assert "loading layers" in capsys.readouterr().err


def test_dispatch_mode_follows_the_domain_layout():
    from moeshard.engine.comm import dispatch_mode

    assert dispatch_mode(ParallelConfig(rank=0, world_size=8, gpus_per_domain=8)) == "flat"
    assert dispatch_mode(ParallelConfig(rank=0, world_size=8, gpus_per_domain=4)) == "hierarchical"
    assert dispatch_mode(ParallelConfig(rank=0, world_size=8, gpus_per_domain=4), "flat") == "flat"
    with pytest.raises(ValueError, match="all-to-all mode"):
        dispatch_mode(ParallelConfig(rank=0, world_size=1), "ring")


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_batch_matches_transformers_padded_batch(tiny_checkpoint, arch):
    """The engine runs a batch ragged (no padding); transformers pads it (left for generate, right for
    logits, with an attention mask). Both give the same tokens and, at real positions, the same logits."""
    from moeshard.engine.verify import load_reference

    prompts = [[3, 14, 15, 92, 65, 35, 89], [2, 71], [1, 41, 42, 13]]
    ref = load_reference(tiny_checkpoint(arch))
    s = max(map(len, prompts))
    left = torch.tensor([[0] * (s - len(p)) + p for p in prompts])
    left_mask = torch.tensor([[0] * (s - len(p)) + [1] * len(p) for p in prompts])
    right = torch.tensor([p + [0] * (s - len(p)) for p in prompts])
    right_mask = torch.tensor([[1] * len(p) + [0] * (s - len(p)) for p in prompts])
    with torch.inference_mode():
        want_tokens = ref.generate(left, attention_mask=left_mask, max_new_tokens=8, min_new_tokens=8,
                                   do_sample=False, pad_token_id=0)[:, s:].tolist()
        want_logits = ref(right, attention_mask=right_mask).logits
    rt = _runtime(tiny_checkpoint(arch))
    try:
        assert rt.generate(prompts, 8) == want_tokens
        logits = rt.forward_logits(prompts)
    finally:
        rt.close()
    for i, p in enumerate(prompts):
        assert (logits[i, : len(p)] - want_logits[i, : len(p)]).abs().max() <= 1e-4


def test_token_keys_never_repeat_across_steps(qwen_runtime):
    """Replica choice hashes (token key, expert): keys that restarted every step would send
    every single-token decode step of an expert to one replica, whatever the shares say."""
    seen = []
    moe = qwen_runtime.model.layers[0].moe
    original = moe.forward

    def recording(x, token_keys):
        seen.extend(token_keys.tolist())
        return original(x, token_keys)

    moe.forward = recording
    qwen_runtime.generate([[5, 6, 7], [9]], 6)  # prefill, then 5 decode steps of 2 tokens
    qwen_runtime.generate([[11]], 4)
    assert len(seen) == (3 + 1) + 5 * 2 + 1 + 3
    assert len(set(seen)) == len(seen)
