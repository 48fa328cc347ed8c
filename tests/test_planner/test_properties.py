"""Property tests: every plan the planner returns is feasible; refusals name a field."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moeshard.operator.api import WorkloadSpec
from moeshard.core.architectures import PRESETS, ModelArchitecture
from moeshard.core.hardware import PROFILES
from moeshard.operator.planner import MEMORY_USABLE_FRACTION, PlanError, plan_parallelism

custom_models = st.builds(
    lambda e, k, h, i, layers, heads, kv: ModelArchitecture(
        name="custom", architecture="qwen3_moe", num_layers=layers, hidden_size=h, num_experts=e,
        top_k=min(k, e), expert_intermediate_size=i, num_attention_heads=heads, num_kv_heads=kv,
        head_dim=128, vocab_size=32000,
    ),
    e=st.sampled_from([4, 8, 16, 60, 64, 128, 160, 256]),
    k=st.integers(1, 8),
    h=st.sampled_from([512, 2048, 4096, 7168]),
    i=st.sampled_from([256, 768, 1536, 14336]),
    layers=st.integers(1, 96),
    heads=st.sampled_from([8, 16, 32, 64]),
    kv=st.sampled_from([1, 4, 8]),
)
models = st.one_of(st.sampled_from(sorted(PRESETS)).map(PRESETS.__getitem__), custom_models)
workloads = st.builds(
    lambda t, b, c: WorkloadSpec(prefillTokens=t, decodeBatch=b, contextLength=c),
    st.integers(1, 65536), st.integers(1, 1024), st.integers(1, 131072),
)


@settings(max_examples=150, deadline=None)
@given(
    model=models,
    profile=st.sampled_from(sorted(PROFILES)),
    workload=workloads,
    ep=st.one_of(st.none(), st.integers(1, 300)),
    tp=st.one_of(st.none(), st.integers(1, 16)),
    replicas=st.integers(0, 8),
    redundant=st.integers(0, 64),
    cross=st.booleans(),
)
def test_every_plan_is_feasible(model, profile, workload, ep, tp, replicas, redundant, cross):
    hw = PROFILES[profile]
    try:
        plan = plan_parallelism(
            model, hw, workload, attention_tp=tp, expert_ep=ep, replicas=replicas,
            redundant_slots=redundant, allow_cross_domain=cross,
        )
    except PlanError as exc:
        assert exc.field.startswith("spec."), exc.field
        assert exc.message
        return
    c = plan.chosen
    assert c.feasible and c.chosen and sum(x.chosen for x in plan.candidates) == 1
    slots = model.num_experts + redundant
    assert slots % c.expert_ep == 0 and c.expert_ep <= model.num_experts
    assert c.slots_per_gpu * c.expert_ep == slots
    assert c.expert_ep % c.attention_tp == 0 and c.gpus_per_pod % c.attention_tp == 0
    assert c.attention_tp <= hw.gpus_per_node and model.num_attention_heads % c.attention_tp == 0
    assert c.pods_per_replica * c.gpus_per_pod == c.expert_ep and c.gpus_per_pod <= hw.gpus_per_node
    assert c.memory_per_gpu_bytes <= MEMORY_USABLE_FRACTION * hw.memory_bytes
    assert cross or not c.crosses_fabric
    assert c.replicas == replicas
    if ep is not None:
        assert c.expert_ep == ep
    if tp is not None:
        assert c.attention_tp == tp
    for x in plan.candidates:
        assert x.dispatch_us >= 0 and x.gemm_us > 0 and x.combine_us >= 0
        assert abs(x.moe_step_us - (x.dispatch_us + x.gemm_us + x.combine_us)) < 1e-6
        assert x.feasible == (x.reason == "")
        # The chosen EP has the fastest MoE step among feasible candidates.
        if x.feasible:
            assert c.moe_step_us <= x.moe_step_us + 1e-6
