"""Cloud TPU slice types: generation, size, hosts and the TPU VM software version.

An accelerator type is gcloud's `--accelerator-type` string, `<generation>-<size>`:

  generation   size counts     sizes accepted here            hosts         runtime version
  v4           TensorCores     8, 16, 24, ..., 4096           size / 8      tpu-ubuntu2204-base
  v5p          TensorCores     8, 16, 24, ..., 12288          size / 8      v2-alpha-tpuv5
  v5litepod    chips (v5e)     1, 4, 8, 16, 32, 64, 128, 256  1, or size/4  v2-alpha-tpuv5-lite
  v6e          chips           1, 4, 8, 16, 32, 64, 128, 256  1, or size/4  v2-alpha-tpuv6e

Sources: the runtime versions are the ones Google's "TPU software versions"
page (cloud.google.com/tpu/docs/runtimes) lists for JAX per generation; the
sizes and hosts per slice come from the v4, v5p, v5e and v6e pages of
cloud.google.com/tpu/docs (4 chips per host on v4 and v5p, 2 TensorCores per
chip; v5e and v6e slices of up to 8 chips are one host, larger ones have 4
chips per host). The v4/v5p size check is only "a multiple of 8 in range":
gcloud rejects a size that no topology has, with its own message.
"""

from __future__ import annotations

import dataclasses
import re

_GENERATIONS = {
    # name: (what the size counts, runtime version, accepted sizes or (step, max))
    "v4": ("TensorCores", "tpu-ubuntu2204-base", (8, 4096)),
    "v5p": ("TensorCores", "v2-alpha-tpuv5", (8, 12288)),
    "v5litepod": ("chips", "v2-alpha-tpuv5-lite", (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": ("chips", "v2-alpha-tpuv6e", (1, 4, 8, 16, 32, 64, 128, 256)),
}
# Names people write for a generation that gcloud spells otherwise.
_ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod", "trillium": "v6e"}
_TYPE_RE = re.compile(r"^([a-z0-9]+)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class TpuType:
    """One slice type, e.g. v4-32: 16 chips on 4 hosts."""

    name: str  # the accelerator type, 'v4-32'
    generation: str  # 'v4', 'v5p', 'v5litepod', 'v6e'
    size: int  # the number after the dash
    hosts: int  # TPU VMs (JAX processes) in the slice
    runtime_version: str  # the TPU VM software version for JAX

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def _sizes_text(sizes) -> str:
    if len(sizes) == 2 and sizes[0] == 8:
        return f"a multiple of 8 from 8 to {sizes[1]}"
    return ", ".join(str(s) for s in sizes)


def parse(accelerator_type: str) -> TpuType:
    """The slice type for gcloud's accelerator type ('v4-32', 'v5litepod-8', 'v6e-16').

    Raises:
      ValueError: an unknown generation or a size that generation does not have,
        naming the accepted ones.
    """
    known = ", ".join(f"{g}-N" for g in _GENERATIONS)
    match = _TYPE_RE.match(accelerator_type.strip().lower())
    if not match:
        raise ValueError(
            f"--tpu={accelerator_type!r} is not a TPU accelerator type; write "
            f"GENERATION-SIZE ({known}), e.g. --tpu=v4-32"
        )
    generation, size = match.group(1), int(match.group(2))
    if generation in _ALIASES:
        fixed = f"{_ALIASES[generation]}-{size}"
        raise ValueError(
            f"--tpu={accelerator_type}: gcloud calls this type {fixed}; use --tpu={fixed}"
        )
    if generation not in _GENERATIONS:
        raise ValueError(
            f"--tpu={accelerator_type}: unknown TPU generation {generation!r}; supported: {known}"
        )
    counts, runtime, sizes = _GENERATIONS[generation]
    if len(sizes) == 2 and sizes[0] == 8:
        valid = size % 8 == 0 and 8 <= size <= sizes[1]
        hosts = size // 8
    else:
        valid = size in sizes
        hosts = 1 if size <= 8 else size // 4
    if not valid:
        raise ValueError(
            f"--tpu={accelerator_type}: {generation} has no slice of {size} {counts}; "
            f"the size counts {counts} and must be {_sizes_text(sizes)}"
        )
    return TpuType(f"{generation}-{size}", generation, size, hosts, runtime)
