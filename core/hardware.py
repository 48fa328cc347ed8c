"""Hardware profiles: the figures the planner's cost model needs.

Every figure carries its source. "Datasheet" means the vendor's public product
page; "measured" means measured by us on one H200 (see ../shared/PERF.md);
"assumed" marks an estimate that no public source pins down, with the range
over which the planner's choices stay the same documented in planner.py.

Bandwidths are bytes per second *each way* per GPU. FLOP/s are dense (no
sparsity). Latencies are the per-message cost of one peer in an all-to-all or
one step of an all-reduce, in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
GiB = 2**30
TB = 1e12
US = 1e-6


@dataclass(frozen=True)
class HardwareProfile:
    """Figures of one GPU type and its interconnect.

    A *node* is one Kubernetes node (one pod's worth of GPUs at most); an
    *NVLink domain* is the set of GPUs reachable over NVLink without the
    fabric: one node on HGX, a whole rack (72 GPUs) on GB200 NVL72.
    """

    name: str
    gpu_product: str  # value of the nvidia.com/gpu.product label it matches
    gpus_per_node: int
    gpus_per_domain: int
    nvlink_bytes_per_s: float  # each way, per GPU
    fabric_bytes_per_s: float  # each way, per GPU (one NIC per GPU)
    nvlink_latency_s: float  # per message per peer inside the domain
    fabric_latency_s: float  # per message per peer across the fabric
    hbm_bytes_per_s: float
    bf16_flops: float  # dense
    memory_bytes: float  # per GPU
    uses_gpus: bool = True  # False for the cpu profile: pods ask for CPU, not nvidia.com/gpu

    def with_overrides(self, **figures: float) -> "HardwareProfile":
        return replace(self, **figures)

    @property
    def ridge_flop_per_byte(self) -> float:
        """FLOP per byte above which a kernel is compute-bound."""
        return self.bf16_flops / self.hbm_bytes_per_s


# Per-message latencies.
#   Fabric: DeepEP's low-latency dispatch moves the same bytes per rank at every
#   EP (128 tokens x top-8) and takes 77 us at EP8 and 155 us at EP32 (DeepEP
#   README, H800 + CX7 400G): (155 - 77) / 24 extra peers = 3.3 us per peer.
#   NVLink: assumed 1.5 us per peer message (NVSHMEM/NCCL small-message one-way
#   latency over NVSwitch is of the order of 1-2 us). planner.py documents the
#   range of this figure over which the planner's choices do not change.
_FABRIC_LATENCY = 3.3 * US
_NVLINK_LATENCY = 1.5 * US

PROFILES: dict[str, HardwareProfile] = {
    "h100-hgx": HardwareProfile(
        name="h100-hgx",
        gpu_product="NVIDIA-H100-80GB-HBM3",
        gpus_per_node=8,  # HGX H100 baseboard: 8 SXM5 GPUs (NVIDIA)
        gpus_per_domain=8,  # NVLink4 domain = one HGX node (NVIDIA)
        nvlink_bytes_per_s=450 * GB,  # 900 GB/s bidirectional NVLink4 (datasheet)
        fabric_bytes_per_s=50 * GB,  # 400G NDR NIC per GPU (DeepEP measurements)
        nvlink_latency_s=_NVLINK_LATENCY,
        fabric_latency_s=_FABRIC_LATENCY,
        hbm_bytes_per_s=3.35 * TB,  # HBM3 (datasheet)
        bf16_flops=989 * TB,  # dense BF16 (datasheet; 1,979 is with sparsity)
        memory_bytes=80 * GB,  # (datasheet)
    ),
    "h200-hgx": HardwareProfile(
        name="h200-hgx",
        gpu_product="NVIDIA-H200",
        gpus_per_node=8,  # HGX H200: 8 SXM GPUs (NVIDIA)
        gpus_per_domain=8,  # NVLink4 domain = one node (NVIDIA)
        nvlink_bytes_per_s=450 * GB,  # NVLink4 (datasheet)
        fabric_bytes_per_s=50 * GB,  # 400G NDR NIC per GPU (DeepEP measurements)
        nvlink_latency_s=_NVLINK_LATENCY,
        fabric_latency_s=_FABRIC_LATENCY,
        hbm_bytes_per_s=4.8 * TB,  # HBM3e (datasheet; ~4.3 TB/s measured copy)
        bf16_flops=989 * TB,  # dense BF16 (datasheet; 788 TFLOP/s measured)
        memory_bytes=141 * GB,  # (datasheet)
    ),
    "b200-hgx": HardwareProfile(
        name="b200-hgx",
        gpu_product="NVIDIA-B200",
        gpus_per_node=8,  # HGX B200: 8 GPUs (NVIDIA)
        gpus_per_domain=8,  # NVLink5 domain = one node (NVIDIA)
        nvlink_bytes_per_s=900 * GB,  # 1.8 TB/s bidirectional NVLink5 (datasheet)
        fabric_bytes_per_s=50 * GB,  # 400G NIC per GPU (same NIC class as above)
        nvlink_latency_s=_NVLINK_LATENCY,
        fabric_latency_s=_FABRIC_LATENCY,
        hbm_bytes_per_s=8 * TB,  # HBM3e (datasheet)
        bf16_flops=2250 * TB,  # dense BF16, HGX B200 (datasheet, ~2.25 PFLOP/s)
        memory_bytes=180 * GB,  # (datasheet)
    ),
    "gb200-nvl72": HardwareProfile(
        name="gb200-nvl72",
        gpu_product="NVIDIA-GB200",
        gpus_per_node=4,  # compute tray: 2 Grace + 4 Blackwell (NVIDIA)
        gpus_per_domain=72,  # one NVLink5 domain per rack: 18 trays x 4 (NVIDIA)
        nvlink_bytes_per_s=900 * GB,  # 1.8 TB/s bidirectional NVLink5 (datasheet)
        fabric_bytes_per_s=50 * GB,  # 400G NIC per GPU between racks
        nvlink_latency_s=_NVLINK_LATENCY,
        fabric_latency_s=_FABRIC_LATENCY,
        hbm_bytes_per_s=8 * TB,  # HBM3e (datasheet)
        bf16_flops=2500 * TB,  # dense BF16 per GPU (datasheet, ~2.5 PFLOP/s)
        memory_bytes=192 * GB,  # (datasheet; 186 GB usable is also quoted)
    ),
    # Processes on one machine, for tests and demos. The figures are those of
    # a small 2-core x86 box (assumed, order of magnitude only: ~50 GFLOP/s
    # fp32 with AVX2, ~10 GB/s memory, loopback gloo at ~2 GB/s, 20 us per
    # message); the planner is not expected to be sharp here.
    "cpu": HardwareProfile(
        name="cpu",
        gpu_product="cpu",
        gpus_per_node=8,  # "GPU" = one engine process
        gpus_per_domain=8,
        nvlink_bytes_per_s=2 * GB,
        fabric_bytes_per_s=1 * GB,
        nvlink_latency_s=20 * US,
        fabric_latency_s=50 * US,
        hbm_bytes_per_s=10 * GB,
        bf16_flops=50e9,
        memory_bytes=16 * GiB,
        uses_gpus=False,
    ),
}


def get_profile(name: str) -> HardwareProfile:
    """The named profile; KeyError lists the known names."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise KeyError(f"unknown hardware profile {name!r} (known: {known})") from None
