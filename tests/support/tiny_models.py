"""Tiny random Qwen3-MoE and Mixtral checkpoints, built offline with transformers' config classes.

The shapes are small enough for the Triton interpreter and for 4-rank gloo
worlds on 2 cores, but keep every feature the engine must get right: GQA
(4 query heads on 2 KV heads), top-2 / top-4 routing over 8 experts, two
layers, RoPE. The router weights are scaled up so that routing is decisive
(random init with std 0.02 gives near-uniform router probabilities, where a
1e-7 difference could flip a top-K choice between implementations).
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("qwen3_moe", "mixtral")


def tiny_config(arch: str, *, top_k: int | None = None, num_experts: int = 8, num_layers: int = 2):
    """A transformers config for a tiny model of ``arch`` (hidden 64, vocab 128)."""
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts=num_experts, num_experts_per_tok=top_k or 4, norm_topk_prob=True,
            max_position_embeddings=256, eos_token_id=None, pad_token_id=None, bos_token_id=None,
        )
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts,
            num_experts_per_tok=top_k or 2, max_position_embeddings=256, eos_token_id=None, pad_token_id=None,
            bos_token_id=None,
        )
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def make_tiny_model(arch: str, out: str | Path, *, seed: int = 0, router_scale: float = 50.0, **config_kw) -> Path:
    """Build a random tiny ``arch`` model and save_pretrained it (safetensors) into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kw), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".gate.weight",)):
                param.mul_(router_scale)
            elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
                param.mul_(10.0)  # sharper logits: greedy choices are not near-ties
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    return out


def load_reference(model_dir: str | Path):
    """The transformers model for a checkpoint folder (float32, eval mode, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
