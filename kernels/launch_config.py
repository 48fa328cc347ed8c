"""Launch configurations for the grouped expert GEMMs, by token-count bucket.

A decode step sends a handful of tokens to each expert, a prefill hundreds or
thousands; one tile shape cannot serve both (small tiles waste nothing on a
16-row expert but re-read weights 8x more often on a 2,048-row one). Calls are
sorted into three buckets by expected tokens per expert,

    tokens_per_expert = ceil(N / E)

where the pair count N defaults to T*K (masked pairs included, known without
a device sync) and should be the live pair count when the caller knows it on
the host: under expert parallelism most of a received token's K ids are -1
(Qwen3 EP8: about 1 live of 8), and T*K/E would overstate the load 8x.
Each bucket carries its own :class:`LaunchConfig`. Tables are JSON files
keyed by (E local experts, I intermediate size, device name), in the spirit
of vLLM's tuned config files; ``bench/tune_expert_ffn.py`` writes them on a
GPU. Lookup order for a call: the directory in ``MOESHARD_KERNEL_CONFIG_DIR``
(read at call time), then ``kernels/configs/`` shipped with the package, then
:data:`DEFAULT_TABLE`.

File format (``E=128,I=1536,device=NVIDIA_H200.json``)::

    {"small_max_tokens_per_expert": 32, "medium_max_tokens_per_expert": 256,
     "configs": {"small": {"block_m": 16, ...}, "medium": {...}, "large": {...}}}
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIG_DIR_ENV = "MOESHARD_KERNEL_CONFIG_DIR"
PACKAGED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BUCKETS = ("small", "medium", "large")


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch knobs for the gate/up and down grouped GEMMs.

    block_m: rows (token pairs) per tile; also the expert segment padding.
    block_n, block_k: output columns and reduction depth per tile.
    group_m: tiles along M visited together so weight tiles stay in L2.
    split_k: the down GEMM's reduction over I split across this many programs
        (fp32 atomic adds); 1 means no split. Helps decode, where few tiles exist.
    num_warps, num_stages: Triton compile options (ignored by the interpreter).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two >= 16 (tl.dot), got {value}")
        for name in ("group_m", "split_k", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"LaunchConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "LaunchConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(known)}")
        try:
            return cls(**{k: int(v) for k, v in data.items()})
        except TypeError as exc:  # a missing required field
            raise ValueError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class BucketTable:
    """Bucket thresholds (inclusive upper bounds, tokens per expert) and a config per bucket."""

    small_max_tokens_per_expert: int = 32
    medium_max_tokens_per_expert: int = 256
    configs: dict[str, LaunchConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.small_max_tokens_per_expert < self.medium_max_tokens_per_expert:
            raise ValueError(
                "BucketTable thresholds must satisfy 0 < small_max_tokens_per_expert < "
                f"medium_max_tokens_per_expert, got {self.small_max_tokens_per_expert}, "
                f"{self.medium_max_tokens_per_expert}"
            )
        missing = [b for b in BUCKETS if b not in self.configs]
        if missing:
            raise ValueError(f"BucketTable.configs lacks bucket(s) {missing}")

    def bucket(self, tokens_per_expert: int) -> str:
        if tokens_per_expert <= self.small_max_tokens_per_expert:
            return "small"
        if tokens_per_expert <= self.medium_max_tokens_per_expert:
            return "medium"
        return "large"

    def to_dict(self) -> dict:
        return {
            "small_max_tokens_per_expert": self.small_max_tokens_per_expert,
            "medium_max_tokens_per_expert": self.medium_max_tokens_per_expert,
            "configs": {b: asdict(self.configs[b]) for b in BUCKETS},
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "table") -> "BucketTable":
        if not isinstance(data, dict) or "configs" not in data:
            raise ValueError(f"{where}: expected an object with a 'configs' field")
        configs = data["configs"]
        if not isinstance(configs, dict):
            raise ValueError(f"{where}.configs: expected an object keyed by bucket")
        unknown = set(configs) - set(BUCKETS)
        if unknown:
            raise ValueError(f"{where}.configs: unknown bucket(s) {sorted(unknown)}; expected {list(BUCKETS)}")
        return cls(
            small_max_tokens_per_expert=int(data.get("small_max_tokens_per_expert", 32)),
            medium_max_tokens_per_expert=int(data.get("medium_max_tokens_per_expert", 256)),
            configs={b: LaunchConfig.from_dict(c, f"{where}.configs.{b}") for b, c in configs.items()},
        )


# Built-in defaults for bf16 on Hopper-class GPUs, untuned guesses until
# bench/tune_expert_ffn.py has run on one: small tiles along M for decode
# (like vLLM's default of BLOCK_M 16 when tokens are few), 64 and 128 rows for
# medium and large payloads. The gate/up kernel keeps two accumulators (gate
# and up) per tile, so block_n 64 costs the registers of a 128-wide tile.
DEFAULT_TABLE = BucketTable(
    small_max_tokens_per_expert=32,
    medium_max_tokens_per_expert=256,
    configs={
        "small": LaunchConfig(block_m=16, block_n=64, block_k=128, group_m=1, split_k=1, num_warps=4, num_stages=4),
        "medium": LaunchConfig(block_m=64, block_n=64, block_k=64, group_m=8, split_k=1, num_warps=4, num_stages=3),
        "large": LaunchConfig(block_m=128, block_n=128, block_k=64, group_m=8, split_k=1, num_warps=8, num_stages=3),
    },
)


def device_key(device_name: str) -> str:
    """File-name-safe form of a device name ('NVIDIA H200' -> 'NVIDIA_H200')."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", device_name.strip()) or "unknown"


def config_file_name(num_experts: int, intermediate: int, device_name: str) -> str:
    return f"E={num_experts},I={intermediate},device={device_key(device_name)}.json"


def load_config_table(path: str | Path) -> BucketTable:
    """Read and validate one table file; ValueError names the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return BucketTable.from_dict(data, where=str(path))


def write_config_table(path: str | Path, table: BucketTable, meta: dict | None = None) -> Path:
    """Write ``table`` (plus an optional ``meta`` object: how it was tuned) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = table.to_dict()
    if meta:
        data["meta"] = meta
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


@functools.lru_cache(maxsize=64)
def _table_for(directories: tuple[str, ...], file_name: str) -> BucketTable:
    for directory in directories:
        candidate = Path(directory) / file_name
        if candidate.is_file():
            return load_config_table(candidate)
    return DEFAULT_TABLE


def lookup_table(num_experts: int, intermediate: int, device_name: str) -> BucketTable:
    """The table for (E, I, device): env dir, then packaged dir, then defaults."""
    directories = tuple(d for d in (os.environ.get(CONFIG_DIR_ENV, ""), str(PACKAGED_CONFIG_DIR)) if d)
    return _table_for(directories, config_file_name(num_experts, intermediate, device_name))


def tokens_per_expert(num_pairs: int, num_experts: int) -> int:
    """Average (token, expert) pairs per expert, ceil(N / E)."""
    return -(-num_pairs // max(num_experts, 1))


def select_launch_config(
    num_pairs: int, num_experts: int, intermediate: int, device_name: str
) -> tuple[str, LaunchConfig]:
    """Bucket name and launch config for a grouped expert FFN call over ``num_pairs`` pairs."""
    table = lookup_table(num_experts, intermediate, device_name)
    bucket = table.bucket(tokens_per_expert(num_pairs, num_experts))
    return bucket, table.configs[bucket]
