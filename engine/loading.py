"""Lazy reading of Hugging Face safetensors checkpoints, one rank's share at a time.

A rank opens every ``*.safetensors`` file with ``safe_open`` (memory-mapped;
nothing is read until asked) and pulls only the tensors, or the row/column
slices of tensors, it needs: its expert slots and its attention TP shard.
Bytes actually read are counted per category so that tests can check that
expert memory per rank is about 1/EP of the checkpoint's.

Expert tensor names accepted (L decoder layer, e expert, P the MoE block
prefix: ``mlp`` for Qwen3-MoE, ``block_sparse_moe`` for Mixtral):

* per expert, as Hugging Face checkpoints store them on disk:
  ``model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight`` (Qwen3-MoE),
  ``model.layers.L.block_sparse_moe.experts.e.{w1,w3,w2}.weight`` (Mixtral);
* fused, as transformers 5 holds them in memory:
  ``model.layers.L.{mlp,block_sparse_moe}.experts.gate_up_proj`` [E, 2I, H]
  (gate rows first) and ``...experts.down_proj`` [E, H, I], with or without a
  ``.weight`` suffix. Only expert ``e``'s slice is read.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import torch
from safetensors import safe_open

log = logging.getLogger("moeshard.engine.loading")

# Checkpoints above this size show a progress bar while a rank loads its share.
PROGRESS_MIN_BYTES = 1 << 30
# safetensors dtype names the engine loads as weights; FP8 / int8 / packed int4 tensors are refused by name
# (a second guard behind config.json's quantization_config check, for checkpoints that forgot to declare it).
FLOAT_DTYPES = ("F32", "BF16", "F16")

_PER_EXPERT_NAMES = {
    # model_type: (gate, up, down) leaf names under experts.e
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
}

T = TypeVar("T")


class CheckpointError(ValueError):
    """The checkpoint folder lacks a tensor the model needs, or has it in the wrong shape."""


class CheckpointReader:
    """Name -> lazily opened safetensors file, with byte accounting.

    ``bytes_loaded[category]`` is the number of bytes materialised by this
    reader for that category (``experts`` or ``dense``).
    """

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.model_dir}: no *.safetensors files")
        self._handles = {f.name: safe_open(str(f), framework="pt", device="cpu") for f in files}
        self._where: dict[str, str] = {}
        for fname, handle in self._handles.items():
            for key in handle.keys():
                self._where[key] = fname
        self.total_bytes = sum(f.stat().st_size for f in files)
        self.bytes_loaded: dict[str, int] = defaultdict(int)

    # -- raw access -------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return sorted(self._where)

    def _slice(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} not found in the checkpoint")
        view = self._handles[self._where[name]].get_slice(name)
        if view.get_dtype() not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{self.model_dir}: tensor {name!r} is stored as {view.get_dtype()} (quantized?); the engine reads only "
                f"{', '.join(FLOAT_DTYPES)} weights"
            )
        return view

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def _done(self, tensor: torch.Tensor, category: str) -> torch.Tensor:
        self.bytes_loaded[category] += tensor.numel() * tensor.element_size()
        return tensor.to(self.device)

    def tensor(self, name: str, *, category: str = "dense") -> torch.Tensor:
        return self._done(self._slice(name)[:], category)

    def rows(self, name: str, start: int, stop: int, *, category: str = "dense") -> torch.Tensor:
        """tensor[start:stop] (dim 0) without reading the rest."""
        return self._done(self._slice(name)[start:stop], category)

    def cols(self, name: str, start: int, stop: int, *, category: str = "dense") -> torch.Tensor:
        """tensor[:, start:stop] (dim 1) without reading the rest."""
        return self._done(self._slice(name)[:, start:stop], category)

    # -- experts ------------------------------------------------------------
    def expert(self, model_type: str, prefix: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's weights: (gate_up [2I, H], gate rows first; down [H, I]).

        ``prefix`` is the MoE block, e.g. ``model.layers.3.mlp``.
        """
        gate_name, up_name, down_name = _PER_EXPERT_NAMES[model_type]
        base = f"{prefix}.experts.{expert}"
        if self.has(f"{base}.{gate_name}.weight"):
            gate = self.tensor(f"{base}.{gate_name}.weight", category="experts")
            up = self.tensor(f"{base}.{up_name}.weight", category="experts")
            down = self.tensor(f"{base}.{down_name}.weight", category="experts")
            return torch.cat([gate, up], dim=0), down
        for suffix in ("", ".weight"):
            fused_gu, fused_down = f"{prefix}.experts.gate_up_proj{suffix}", f"{prefix}.experts.down_proj{suffix}"
            if self.has(fused_gu) and self.has(fused_down):
                return (
                    self.rows(fused_gu, expert, expert + 1, category="experts")[0],
                    self.rows(fused_down, expert, expert + 1, category="experts")[0],
                )
        raise CheckpointError(
            f"{self.model_dir}: expert {expert} of {prefix} not found (looked for {base}.{gate_name}.weight "
            f"and {prefix}.experts.gate_up_proj)"
        )


def maybe_progress(items: Iterable[T], *, total: int, desc: str, show: bool) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar when ``show`` (large checkpoints), else yield them quietly."""
    if show:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the engine extra
            log.info("%s: %d steps", desc, total)
        else:
            yield from tqdm(items, total=total, desc=desc, unit="layer")
            return
    yield from items

