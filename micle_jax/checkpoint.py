"""Checkpoints: Orbax CheckpointManager, resume, and init-from-another-stage.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `state` is the whole train
state pytree (step, params, batch_stats, optimizer state); `meta` is JSON
(global batch size, seed, config name) checked on resume. Orbax writes each
step to a temporary folder and renames it when complete, so a killed save
never leaves a checkpoint that looks whole.

Resume order (big_vision): this workdir's latest checkpoint, then the
config's init checkpoint (weights only), then scratch.
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

CHECKPOINT_DIR = "checkpoints"


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over WORKDIR/checkpoints keeping the last `keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
        options=options,
        item_names=("state", "meta"),
    )


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Saves `state` and `meta` at `step` (asynchronously when the manager is async)."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Restores (state, meta) at `step` with the shardings of `abstract_state`.

    Args:
      manager: from `make_manager`.
      step: a step in `manager.all_steps()`.
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding`, same
        structure as the saved state.
    """
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
    except (ValueError, KeyError, TypeError) as e:
        path = os.path.join(str(manager.directory), str(step))
        raise ValueError(
            f"checkpoint {path} does not match this config's model/optimizer ({e}). "
            "Use a fresh --workdir for a different config, or set config.init.checkpoint "
            "to start from these weights only."
        ) from e
    return restored.state, dict(restored.meta)


def resolve(path: str) -> pathlib.Path:
    """Finds the state folder of a checkpoint given a workdir, its checkpoints folder or a step.

    Accepts WORKDIR (latest step), WORKDIR/checkpoints (latest step),
    WORKDIR/checkpoints/<step> or WORKDIR/checkpoints/<step>/state.
    """
    # Absolute: Orbax reads no metadata through a relative path.
    p = pathlib.Path(path).expanduser().absolute()
    if not p.exists():
        raise FileNotFoundError(
            f"checkpoint path {p} does not exist; give a training workdir or one of its "
            f"{CHECKPOINT_DIR}/<step> folders"
        )
    if (p / "state").is_dir():
        return p / "state"
    if p.name == "state" and p.is_dir():
        return p
    ckpt_dir = p / CHECKPOINT_DIR if (p / CHECKPOINT_DIR).is_dir() else p
    steps = sorted(int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit() and d.is_dir())
    steps = [s for s in steps if (ckpt_dir / str(s) / "state").is_dir()]
    if not steps:
        raise FileNotFoundError(
            f"no finished checkpoint under {ckpt_dir}: the run saved none yet, or this is not "
            "a micle_jax workdir"
        )
    return ckpt_dir / str(steps[-1]) / "state"


def load_variables(path: str) -> dict:
    """Loads {'params': ..., 'batch_stats': ...} of a checkpoint as host numpy trees."""
    state_dir = resolve(path)
    # Restored as host numpy arrays: the checkpoint may come from another
    # topology (a TPU pod for stage 1, a GPU box for stage 2).
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(state_dir).item_metadata
        if metadata is None:
            raise ValueError(
                f"{state_dir} has no readable Orbax metadata: not a finished checkpoint"
            )
        tree = metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        raw = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    if not isinstance(raw, dict) or "params" not in raw:
        raise ValueError(f"{state_dir} is not a micle_jax train state (no 'params')")
    logging.info("Loaded weights from %s", state_dir)
    return {
        "params": jax.tree.map(np.asarray, raw["params"]),
        "batch_stats": jax.tree.map(np.asarray, raw.get("batch_stats", {})),
    }


def merge_variables(target: dict, loaded: dict, prefixes: tuple[str, ...]) -> tuple[dict, list]:
    """Copies the loaded weights under `prefixes` into `target` (weights only).

    Every target leaf whose path starts with one of `prefixes` (e.g.
    'backbone', 'projection_head/layer_0') must exist in `loaded` with the same
    shape; anything else keeps its fresh initialisation.

    Args:
      target: {'params': tree, 'batch_stats': tree} of the new model.
      loaded: the same from `load_variables`.
      prefixes: top-level module names (or 'a/b' path prefixes) to copy.

    Returns:
      (merged variables, list of copied 'collection/path' names).
    """
    merged, copied, missing, mismatched = {}, [], [], []
    for collection, tree in target.items():
        flat = traverse_util.flatten_dict(jax.tree.map(lambda x: x, tree), sep="/")
        src = traverse_util.flatten_dict(loaded.get(collection, {}), sep="/")
        for name, value in flat.items():
            if not any(name == p or name.startswith(p + "/") for p in prefixes):
                continue
            if name not in src:
                missing.append(f"{collection}/{name}")
            elif tuple(np.shape(src[name])) != tuple(np.shape(value)):
                mismatched.append(
                    f"{collection}/{name}: checkpoint {np.shape(src[name])} vs model "
                    f"{np.shape(value)}"
                )
            else:
                flat[name] = np.asarray(src[name], dtype=np.asarray(value).dtype)
                copied.append(f"{collection}/{name}")
        merged[collection] = traverse_util.unflatten_dict(flat, sep="/")
    if missing or mismatched:
        lines = missing[:10] + mismatched[:10]
        raise ValueError(
            "init checkpoint does not match the model (same arch/width/head layers?):\n  "
            + "\n  ".join(lines)
        )
    if not copied:
        raise ValueError(f"init checkpoint has nothing under {prefixes}")
    return merged, copied
