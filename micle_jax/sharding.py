"""Mesh, shardings and host-local <-> global arrays.

One `Mesh` with a "data" axis (the batch) and a "model" axis (the largest
parameters, FSDP-style, when `config.mesh.model > 1`). Everything else runs
under `jax.jit` with `NamedSharding`; XLA inserts the collectives, so losses
and BatchNorm written on the global batch are global (SimCLR's global_bn).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """Builds the ("data", "model") mesh over all devices of all processes.

    Args:
      mesh_config: `data` (-1 = whatever is left) and `model` (>= 1) sizes, as
        config_lib.mesh_config gives them (every device on the data axis).
      devices: defaults to `jax.devices()` (every process's devices).

    Returns:
      A Mesh of shape [data, model].
    """
    devices = list(jax.devices() if devices is None else devices)
    model = int(mesh_config.model)
    data = int(mesh_config.data)
    if model < 1 or len(devices) % model:
        raise ValueError(
            f"config.mesh.model={model} must be >= 1 and divide the {len(devices)} devices"
        )
    if data == -1:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(
            f"config.mesh.data={data} x config.mesh.model={model} != {len(devices)} devices; "
            "set config.mesh.data=-1 to use all of them"
        )
    grid = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same value on every device."""
    return NamedSharding(mesh, P())


def param_sharding(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> NamedSharding:
    """Sharding of one parameter (or optimizer slot) of `shape`.

    Parameters with at least `min_size` elements are split over the model axis
    along their largest dimension that the axis size divides; everything else
    is replicated. With a model axis of size 1 everything is replicated.
    """
    model = mesh.shape[MODEL_AXIS]
    if model == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % model == 0:
            spec = [None] * len(shape)
            spec[dim] = MODEL_AXIS
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(tree, mesh: Mesh, min_size: int):
    """`param_sharding` for every array leaf of a (possibly abstract) pytree."""
    return jax.tree.map(lambda x: param_sharding(tuple(np.shape(x)), mesh, min_size), tree)


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's share of a batch into global arrays.

    Each process holds `global_batch / process_count` examples; the result is
    sharded over the data axis. Non-numeric entries (case ids) stay on the host
    and are dropped here.

    Args:
      batch: {name: [local_batch, ...] array}.
      mesh: the training mesh.

    Returns:
      {name: [global_batch, ...] jax.Array} for every numeric entry.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "OSU":
            continue
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
