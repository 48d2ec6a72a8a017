"""Config helpers shared by every config file and trainer.

- `parse_arg`: the one-string config argument of big_vision
  (`configs/x.py:arch=r50x4,runlocal=True`), typed by the defaults.
- `get_steps`: durations given in steps or in epochs, converted in one place.
- `check_config`: values that a locked ConfigDict cannot check by itself.
"""

from __future__ import annotations

import ml_collections

ARCHS = {
    # name: (depth, width multiplier, selective-kernel ratio)
    "r18x1": (18, 1, 0.0),
    "r18x0.25": (18, 0.25, 0.0),
    "r34x1": (34, 1, 0.0),
    "r50x1": (50, 1, 0.0),
    "r50x2": (50, 2, 0.0),
    "r50x4": (50, 4, 0.0),
    "r50x1_sk": (50, 1, 0.0625),
    "r101x1": (101, 1, 0.0),
    "r101x2": (101, 2, 0.0),
    "r152x1": (152, 1, 0.0),
    "r152x2": (152, 2, 0.0),
    "r152x3_sk": (152, 3, 0.0625),
    "r200x1": (200, 1, 0.0),
}


def _to_bool(key: str, text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"config argument {key}={text!r}: expected True or False")


def parse_arg(arg: str | None, lazy: bool = False, **defaults) -> ml_collections.ConfigDict:
    """Parses 'key=value,key2=value2' into a ConfigDict typed like `defaults`.

    A bare 'key' means key=True. Unknown keys are an error unless `lazy`.

    Args:
      arg: the string after ':' in `--config=file.py:ARG`, or None.
      lazy: accept keys that have no default (kept as strings).
      **defaults: every accepted key with its default value (its type is used).

    Returns:
      A ConfigDict with one entry per key.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return result
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            value = "True"
        if key not in defaults:
            if not lazy:
                raise ValueError(
                    f"unknown config argument {key!r}; accepted: {', '.join(sorted(defaults))}"
                )
            result[key] = value
            continue
        default = defaults[key]
        try:
            if isinstance(default, bool):
                result[key] = _to_bool(key, value)
            elif isinstance(default, int):
                result[key] = int(value)
            elif isinstance(default, float):
                result[key] = float(value)
            else:
                result[key] = value
        except ValueError as e:
            raise ValueError(
                f"config argument {key}={value!r}: expected {type(default).__name__}"
            ) from e
    return result


def arch_fields(arch: str) -> dict:
    """Model config fields (depth, width, sk_ratio) for an architecture name like 'r50x4'."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    depth, width, sk_ratio = ARCHS[arch]
    return dict(depth=depth, width=width, sk_ratio=sk_ratio)


def get_steps(
    name: str,
    config: ml_collections.ConfigDict,
    num_examples: int,
    batch_size: int,
    default: int | None = None,
) -> int:
    """Converts `config.{name}_steps` or `config.{name}_epochs` into a step count.

    Exactly one of the two may be set (non-None). Epochs are rounded to the
    nearest step, but a positive duration is never rounded down to 0 steps.

    Args:
      name: 'total', 'warmup', 'log_every', ...
      config: the config holding `{name}_steps` and/or `{name}_epochs`.
      num_examples: examples in one epoch of the training data.
      batch_size: global batch size.
      default: returned when neither is set; an error when None.
    """
    steps = config.get(f"{name}_steps")
    epochs = config.get(f"{name}_epochs")
    if steps is not None and epochs is not None:
        raise ValueError(
            f"config sets both {name}_steps={steps} and {name}_epochs={epochs}; "
            f"set one of them to None"
        )
    if steps is not None:
        if steps < 0:
            raise ValueError(f"config.{name}_steps={steps} must be >= 0")
        return int(steps)
    if epochs is not None:
        if epochs < 0:
            raise ValueError(f"config.{name}_epochs={epochs} must be >= 0")
        if num_examples <= 0:
            raise ValueError(f"cannot convert {name}_epochs: the data has no examples")
        exact = epochs * num_examples / batch_size
        return max(int(round(exact)), 1 if epochs > 0 else 0)
    if default is None:
        raise ValueError(f"config needs {name}_steps or {name}_epochs")
    return default
