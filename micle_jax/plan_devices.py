"""Accelerators the planner knows, and its per-step communication and time formulas.

`DEVICES` holds each chip's memory and published peak FLOP/s; `get_device`
looks one up by the name `python -m micle_jax.plan --device_kind=` takes. The
formulas (`ring_all_reduce_bytes`, `nt_xent_all_gather_bytes`,
`step_seconds`) are plain arithmetic, kept here so that the planner and its
tests share one definition. Imports nothing from JAX.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30
MIB = 2**20
TERA = 1e12


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator chip (one JAX device).

    Attributes:
      name: the --device_kind name.
      memory_bytes: its memory (HBM) as the vendor states it.
      bf16_flops: peak dense bfloat16 matmul FLOP/s.
      f32_flops: the peak rate of a float32 matmul as JAX runs it by default:
        one bfloat16 pass on TPU (jax.lax.Precision.DEFAULT), TF32 tensor
        cores on NVIDIA GPUs.
      source: where the figures come from.
      tpu_topology: a TPU's smallest slice, as jax.experimental.topologies
        names it, for compiling ahead of time with XLA:TPU ('' = not a TPU).
    """

    name: str
    memory_bytes: int
    bf16_flops: float
    f32_flops: float
    source: str
    tpu_topology: str = ""

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for a model computing in `dtype` ('float32' or 'bfloat16')."""
        if dtype == "bfloat16":
            return self.bf16_flops
        if dtype == "float32":
            return self.f32_flops
        raise ValueError(f"no peak FLOP/s for dtype {dtype!r}; accepted: float32, bfloat16")


# Per chip. TPU figures from the Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): HBM per chip and peak
# bf16 TFLOP/s; on TPU a float32 matmul at JAX's default precision is one
# bf16 pass, so it runs at the bf16 rate. NVIDIA figures from the H100 and
# H200 SXM datasheets: 989.4 TFLOP/s dense bf16 and 494.7 dense TF32 (the
# datasheets' 1,979 and 989 count 2:4 sparsity); memory as nvidia-smi reports
# it (H100 80 GB: 81,559 MiB; H200 141 GB: 143,771 MiB, the H200 of
# docs/performance.md).
_TPU_DOCS = "cloud.google.com/tpu/docs/"
DEVICES = {
    d.name: d
    for d in (
        Device("tpu-v4", 32 * GIB, 275 * TERA, 275 * TERA, _TPU_DOCS + "v4", "v4:2x2x1"),
        Device("tpu-v5e", 16 * GIB, 197 * TERA, 197 * TERA, _TPU_DOCS + "v5e", "v5e:2x2"),
        Device("tpu-v5p", 95 * GIB, 459 * TERA, 459 * TERA, _TPU_DOCS + "v5p", "v5p:2x2x1"),
        Device("tpu-v6e", 32 * GIB, 918 * TERA, 918 * TERA, _TPU_DOCS + "v6e", "v6e:2x2"),
        Device("h100", 81_559 * MIB, 989.4 * TERA, 494.7 * TERA, "NVIDIA H100 SXM datasheet"),
        Device("h200", 143_771 * MIB, 989.4 * TERA, 494.7 * TERA, "NVIDIA H200 SXM datasheet"),
    )
}


def get_device(kind: str) -> Device:
    """The Device named `kind`; a ValueError listing the known names otherwise."""
    if kind not in DEVICES:
        raise ValueError(f"unknown device kind {kind!r}; known: {', '.join(DEVICES)}")
    return DEVICES[kind]


def ring_all_reduce_bytes(nbytes: int, devices: int) -> float:
    """Bytes each device sends (and receives) in a ring all-reduce of `nbytes`.

    A ring all-reduce is a reduce-scatter then an all-gather, each moving
    (n - 1) / n of the buffer through every device: 2 (n - 1) / n in all
    (0 on one device).
    """
    if devices < 1:
        raise ValueError(f"devices={devices} must be >= 1")
    return 2 * (devices - 1) / devices * nbytes


def nt_xent_all_gather_bytes(global_batch: int, proj_dim: int, itemsize: int = 4) -> int:
    """Bytes of the projections NT-Xent gathers per step: every view of the global batch.

    Every device needs all 2 x global_batch projections (the negatives of
    SimCLR's cross-replica loss); each receives (n - 1) / n of this.

    Args:
      global_batch: pairs per step over all devices.
      proj_dim: the projection head's output width (SimCLR: 128).
      itemsize: bytes per element (the loss computes in float32).
    """
    return global_batch * 2 * proj_dim * itemsize


def step_seconds(flops: float, peak_flops: float, utilisation: float) -> float:
    """The time `flops` take at `utilisation` (0..1] of `peak_flops`."""
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation={utilisation} must be in (0, 1], e.g. 0.4 for 40%")
    return flops / (peak_flops * utilisation)
