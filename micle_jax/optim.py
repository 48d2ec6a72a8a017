"""Optimizers (LARS, momentum SGD, AdamW) and learning-rate schedules from a config.

The optimizer config (`config.optim` in the experiment configs; every field's
default is in config_lib.OPTIM_DEFAULTS, the first four have none) holds:

  name          'lars' | 'momentum' | 'adamw'
  base_lr       learning rate before batch-size scaling
  lr_scaling    'sqrt' (base * sqrt(batch)) | 'linear' (base * batch / 256)
  weight_decay  on kernels only (BatchNorm and biases are excluded, as SimCLR)
  schedule      'cosine' | 'linear' | 'constant', after the warm-up
  momentum      lars, momentum: the momentum decay
  nesterov      lars, momentum: None = as SimCLR for the optimizer (True for
                momentum, Keras SGD(nesterov=True) in tf2/model.py
                build_optimizer; False for lars, whose LARSOptimizer runs
                classic momentum)
  eeta          lars: the trust coefficient
  trust_ratio_exclude  lars: regexes, re.search'ed on the '/'-joined parameter
                path, whose kernels keep weight decay but skip the trust ratio
                (SimCLR tf2 excludes its supervised head: (r'^head/',))
  b1, b2, eps   adamw

A typical trainer:

  schedule = optim.make_schedule(config.optim, total_steps, warmup_steps, batch)
  tx = optim.make_optimizer(config.optim, schedule, trainable_mask=None)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from micle_jax import config_lib

LR_SCALINGS = ("sqrt", "linear")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("lars", "momentum", "adamw")


def _field(optim_config: Mapping, key: str):
    defaults = config_lib.OPTIM_DEFAULTS
    unknown = sorted(set(optim_config.keys()) - set(defaults))
    if unknown:
        raise ValueError(
            f"optim config has unknown field(s) {unknown}; accepted: {', '.join(defaults)}"
        )
    value = optim_config.get(key, defaults[key])
    if value is config_lib.REQUIRED or value is None:
        raise ValueError(f"optim config needs the field {key!r} (e.g. config.optim.{key} = ...)")
    return value


def uses_nesterov(optim_config: Mapping) -> bool:
    """Whether the 'lars' or 'momentum' optimizer of `optim_config` uses Nesterov momentum.

    An explicit True/False wins; None (the default) follows SimCLR's
    tf2/model.py build_optimizer: 'momentum' is Keras SGD(nesterov=True),
    'lars' is LARSOptimizer with its default use_nesterov=False (classic
    momentum, tf2/lars_optimizer.py).
    """
    nesterov = optim_config.get("nesterov", config_lib.OPTIM_DEFAULTS["nesterov"])
    if nesterov is None:
        return _field(optim_config, "name") == "momentum"
    if not isinstance(nesterov, bool):
        raise ValueError(
            f"optim config nesterov={nesterov!r} must be True, False or None (as SimCLR: "
            "True for momentum, False for lars)"
        )
    return nesterov


def _check_range(key: str, value, low: float, high: float) -> None:
    if not low <= value < high:
        raise ValueError(f"optim config {key}={value} must be in [{low}, {high})")


def scaled_learning_rate(base_lr: float, scaling: str, global_batch_size: int) -> float:
    """The peak learning rate for a batch size, as SimCLR's tf2/model.py.

    Args:
      base_lr: learning rate before scaling.
      scaling: 'sqrt' -> base_lr * sqrt(batch); 'linear' -> base_lr * batch / 256.
      global_batch_size: examples per step over all devices and hosts.

    Returns:
      The scaled learning rate (0.075 * sqrt(4096) == 0.3 * 4096 / 256 == 4.8).
    """
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size} must be > 0")
    if base_lr < 0:
        raise ValueError(f"optim config base_lr={base_lr} must be >= 0")
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch_size)
    if scaling == "linear":
        return base_lr * global_batch_size / 256.0
    raise ValueError(f"optim config lr_scaling={scaling!r} is unknown; accepted: {LR_SCALINGS}")


def make_schedule(
    optim_config: Mapping, total_steps: int, warmup_steps: int, global_batch_size: int
) -> optax.Schedule:
    """Linear warm-up from 0 to the scaled learning rate, then decay.

    'cosine' is SimCLR's WarmUpAndCosineDecay (tf2/model.py): lr(t) =
    peak * t / warmup for t < warmup, then peak * 0.5 * (1 + cos(pi * (t -
    warmup) / (total - warmup))), reaching 0 at total_steps. 'linear' decays
    linearly to 0 at total_steps; 'constant' stays at the peak.

    Args:
      optim_config: uses base_lr, lr_scaling and schedule.
      total_steps: training steps; the decay reaches 0 here.
      warmup_steps: steps of linear warm-up, 0 <= warmup_steps <= total_steps.
      global_batch_size: for the learning-rate scaling.

    Returns:
      An optax schedule: step (int scalar) -> learning rate (float32 scalar).
    """
    peak = scaled_learning_rate(
        _field(optim_config, "base_lr"), _field(optim_config, "lr_scaling"), global_batch_size
    )
    kind = _field(optim_config, "schedule")
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be between 0 and total_steps={total_steps}; "
            "shorten warmup_steps/warmup_epochs"
        )
    # max(.., 1): with warm-up == total the decay part is never reached, but
    # optax rejects a zero-length cosine.
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optim config schedule={kind!r} is unknown; accepted: {SCHEDULES}")
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_name(path) -> str:
    return _key_name(path[-1])


def decay_mask(params) -> Any:
    """Which leaves get weight decay (and the LARS trust ratio): the kernels.

    SimCLR excludes 'batch_normalization' and 'bias' variables by name; in
    Flax the trainable weights of Conv and Dense are named 'kernel', while
    BatchNorm's 'scale'/'bias' and every 'bias' are excluded.

    Args:
      params: a pytree of parameters (e.g. Flax's {'Conv_0': {'kernel': ...}}).

    Returns:
      A pytree of Python bools with the structure of `params`.
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) == "kernel", params)


def _trust_ratio_mask(exclude: tuple[str, ...]) -> Callable[[Any], Any]:
    def mask(params):
        def keep(path, _):
            joined = "/".join(_key_name(k) for k in path)
            return _leaf_name(path) == "kernel" and not any(re.search(e, joined) for e in exclude)

        return jax.tree_util.tree_map_with_path(keep, params)

    return mask


def scale_by_trust_ratio(trust_coefficient: float) -> optax.GradientTransformation:
    """LARS' trust ratio: u * eeta |w| / |u| (1 when either norm is 0), one norm each.

    optax.scale_by_trust_ratio with eps=0 and min_norm=0, value for value; its
    numerics.safe_norm computes each norm twice (a norm, a select over the
    whole tensor, the norm again: the select keeps the norm's gradient finite
    at 0, which an optimizer never differentiates). On the 2-core machine
    that second pass over 32M parameters and their updates made the R50 1x
    LARS update 197 ms instead of 103 ms (benchmarks/compare_pytorch.py's
    step: about 2.1 s).
    """

    def scale(update, param):
        param_norm, update_norm = jnp.linalg.norm(param), jnp.linalg.norm(update)
        ratio = trust_coefficient * param_norm / update_norm
        zero = jnp.logical_or(param_norm == 0.0, update_norm == 0.0)
        return update * jnp.where(zero, jnp.array(1.0, param.dtype), ratio)

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("scale_by_trust_ratio needs the parameters: tx.update(g, s, params)")
        return jax.tree.map(scale, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _lars(optim_config: Mapping, schedule: optax.Schedule) -> optax.GradientTransformation:
    # SimCLR tf2 excludes its supervised head from the trust ratio (and adds
    # the head's weight decay through the loss): with eeta 1e-3 and a head
    # initialised at stddev 0.01, the trust ratio would all but freeze it.
    exclude = tuple(_field(optim_config, "trust_ratio_exclude"))
    # optax.lars' chain (same state, same values) with the one-pass trust ratio:
    # SimCLR's LARSOptimizer with classic momentum. The gradient gets weight
    # decay first, then the trust ratio eeta * |w| / |g + wd w| (1 when either
    # norm is 0), then the learning rate, then the momentum trace -- so lr sits
    # inside the accumulator: v = m v + lr * trust * g.
    return optax.chain(
        optax.add_decayed_weights(_field(optim_config, "weight_decay"), mask=decay_mask),
        optax.masked(
            scale_by_trust_ratio(_field(optim_config, "eeta")),
            mask=_trust_ratio_mask(exclude) if exclude else decay_mask,
        ),
        optax.scale_by_learning_rate(schedule),
        optax.trace(decay=_field(optim_config, "momentum"), nesterov=uses_nesterov(optim_config)),
    )


def _momentum(optim_config: Mapping, schedule: optax.Schedule) -> optax.GradientTransformation:
    # As Keras SGD in SimCLR (v = m v - lr g; with Nesterov, SimCLR's choice,
    # w += m v - lr g): the learning rate is applied before the momentum trace,
    # which matters while the lr changes.
    return optax.chain(
        optax.add_decayed_weights(_field(optim_config, "weight_decay"), mask=decay_mask),
        optax.scale_by_learning_rate(schedule),
        optax.trace(decay=_field(optim_config, "momentum"), nesterov=uses_nesterov(optim_config)),
    )


def _adamw(optim_config: Mapping, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(
        learning_rate=schedule,
        b1=_field(optim_config, "b1"),
        b2=_field(optim_config, "b2"),
        eps=_field(optim_config, "eps"),
        weight_decay=_field(optim_config, "weight_decay"),
        mask=decay_mask,
    )


_BUILDERS: dict[str, Callable[[Mapping, optax.Schedule], optax.GradientTransformation]] = {
    "lars": _lars,
    "momentum": _momentum,
    "adamw": _adamw,
}


def _check_values(optim_config: Mapping) -> str:
    name = _field(optim_config, "name")
    if name not in _BUILDERS:
        raise ValueError(f"optim config name={name!r} is unknown; accepted: {OPTIMIZERS}")
    weight_decay = _field(optim_config, "weight_decay")
    if weight_decay < 0:
        raise ValueError(f"optim config weight_decay={weight_decay} must be >= 0")
    if name in ("lars", "momentum"):
        _check_range("momentum", _field(optim_config, "momentum"), 0.0, 1.0)
        uses_nesterov(optim_config)  # validates
    if name == "lars":
        eeta = _field(optim_config, "eeta")
        if not eeta > 0:
            raise ValueError(f"optim config eeta={eeta} must be > 0 (SimCLR: 1e-3)")
        exclude = _field(optim_config, "trust_ratio_exclude")
        if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
            raise ValueError(
                f"optim config trust_ratio_exclude={exclude!r} must be a tuple of regexes, "
                "e.g. (r'^head/',)"
            )
        for pattern in exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"optim config trust_ratio_exclude has a bad regex {pattern!r}: {e}"
                ) from e
    if name == "adamw":
        _check_range("b1", _field(optim_config, "b1"), 0.0, 1.0)
        _check_range("b2", _field(optim_config, "b2"), 0.0, 1.0)
        eps = _field(optim_config, "eps")
        if not eps > 0:
            raise ValueError(f"optim config eps={eps} must be > 0")
    return name


def _freeze(
    tx: optax.GradientTransformation, trainable_mask
) -> optax.GradientTransformationExtraArgs:
    """Zero updates, and no state, for leaves where trainable_mask is False."""
    leaves = jax.tree.leaves(trainable_mask)
    bad = [leaf for leaf in leaves if not isinstance(leaf, bool)]
    if bad:
        raise ValueError(
            f"trainable_mask leaves must be Python bools; got {type(bad[0]).__name__}. "
            "Build it with jax.tree.map(lambda _: True/False, params)."
        )
    labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable_mask)
    partitioned = optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)

    def init(params):
        if jax.tree.structure(params) != jax.tree.structure(trainable_mask):
            raise ValueError(
                "trainable_mask must have the structure of the parameters: got mask "
                f"{jax.tree.structure(trainable_mask)} for params {jax.tree.structure(params)}."
            )
        return partitioned.init(params)

    return optax.GradientTransformationExtraArgs(init, partitioned.update)


def make_optimizer(
    optim_config: Mapping, schedule: optax.Schedule, trainable_mask=None
) -> optax.GradientTransformation:
    """The optimizer named by optim_config.name, driven by `schedule`.

    - 'lars': SimCLR's LARS (classic momentum unless nesterov=True, trust
      ratio eeta * |w| / |g|, weight decay added to the gradient before the
      trust ratio; kernels only).
    - 'momentum': SGD with Nesterov momentum unless nesterov=False (SimCLR's
      Keras SGD(nesterov=True), its linear evaluation optimizer), weight decay
      added to the gradient on kernels only.
    - 'adamw': Adam with decoupled weight decay on kernels only.

    Args:
      optim_config: see the module docstring for the fields.
      schedule: step -> learning rate, e.g. from `make_schedule`.
      trainable_mask: pytree of Python bools with the structure of the params,
        or None (all trainable). False leaves get zero updates and keep no
        optimizer state (linear evaluation; fine-tuning after block k).

    Returns:
      An optax GradientTransformation; `update` needs `params`.
    """
    tx = _BUILDERS[_check_values(optim_config)](optim_config, schedule)
    if trainable_mask is None:
        return tx
    return _freeze(tx, trainable_mask)
