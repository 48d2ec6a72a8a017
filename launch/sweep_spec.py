"""What a sweep is: stages of runs, their parameters, commands and dependencies.

A sweep file `configs/sweeps/NAME.py` defines `get_sweep(arg=None) -> list[Stage]`.
A stage turns each parameter dict of its `runs` (built with `product`,
`elementwise` and `chain`, in the spirit of XManager's hyper-parameter
helpers) into one run of `micle_jax.main`:

    Stage(
        name="finetune",
        run_name="ft_{method}_f{label_fraction}_s{seed}",
        config="configs/finetune_derm.py",
        config_arg="arch=r50x4",
        runs=product(method=["simclr", "micle"], label_fraction=[0.1, 1.0], seed=[0, 1]),
        overrides={"seed": "seed", "label_fraction": "data.label_fraction"},
        depends_on=select("method", simclr="pretrain_simclr", micle="pretrain_micle"),
    )

Templates are `str.format` strings over the run's parameters; any template may
instead be a callable `params -> str` (or `select(...)`). A run whose
`depends_on` resolves to None has no dependency (e.g. a from-scratch baseline);
otherwise the dependency's workdir is passed as `--config.init.checkpoint`.

This module imports nothing of micle_jax or of the configs: sweeps expand and
print without the configs (or JAX) being importable.
"""

from __future__ import annotations

import dataclasses
import difflib
import heapq
import importlib.util
import itertools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Params = dict[str, Any]
Template = str | Callable[[Params], str | None] | None

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


def _as_sweep(part, where: str) -> list[Params]:
    if isinstance(part, Mapping) or not isinstance(part, Sequence) or isinstance(part, str):
        raise TypeError(
            f"{where}: expected a list of parameter dicts (from product/elementwise/chain)"
        )
    return [dict(p) for p in part]


def _keyword_axes(fn: str, params: Mapping[str, Any]) -> list[list[Params]]:
    axes = []
    for key, values in params.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise TypeError(
                f"{fn}({key}={values!r}): values must be a list; write {key}=[{values!r}]"
            )
        axes.append([{key: v} for v in values])
    return axes


def _merge(dicts: Sequence[Params], fn: str) -> Params:
    merged: Params = {}
    for d in dicts:
        for key in d:
            if key in merged:
                raise ValueError(f"{fn}: parameter {key!r} is set by two of its parts")
        merged.update(d)
    return merged


def product(*sweeps: Sequence[Params], **params: Sequence[Any]) -> list[Params]:
    """Cartesian product of sub-sweeps and keyword value lists (first varies slowest).

    `product(method=['simclr', 'micle'], seed=[0, 1])` has 4 parameter dicts.
    """
    axes = [_as_sweep(s, "product") for s in sweeps] + _keyword_axes("product", params)
    return [_merge(combo, "product") for combo in itertools.product(*axes)]


def elementwise(*sweeps: Sequence[Params], **params: Sequence[Any]) -> list[Params]:
    """Element-wise combination of sub-sweeps and value lists of equal length (a zip).

    `elementwise(method=['supervised', 'simclr'], init=['sup', 'ssl'])` has 2 dicts.
    """
    axes = [_as_sweep(s, "elementwise") for s in sweeps] + _keyword_axes("elementwise", params)
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise ValueError(
            f"elementwise: all parts must have the same length, got lengths {sorted(lengths)}"
        )
    return [_merge(combo, "elementwise") for combo in zip(*axes, strict=True)]


def chain(*sweeps: Sequence[Params]) -> list[Params]:
    """Concatenation of sub-sweeps: `chain(product(...), elementwise(...))`."""
    return [p for s in sweeps for p in _as_sweep(s, "chain")]


@dataclasses.dataclass(frozen=True)
class select:  # lower case: sweep files use it like product, elementwise and chain
    """A template chosen by the value of one parameter.

    `select('method', simclr='pretrain_simclr_{arch}', supervised=None)`: a run
    with method='supervised' gets None (e.g. no dependency). Values that are not
    identifiers go in a dict: `select('fraction', {0.1: ..., 1.0: ...})`.
    """

    param: str
    choices: Mapping[Any, str | None]

    def __init__(self, param: str, choices: Mapping | None = None, **kw: str | None):
        object.__setattr__(self, "param", param)
        object.__setattr__(self, "choices", {**(choices or {}), **kw})

    def __call__(self, params: Params) -> str | None:
        if self.param not in params:
            raise ValueError(f"select({self.param!r}): the run has no parameter {self.param!r}")
        value = params[self.param]
        if value not in self.choices:
            raise ValueError(
                f"select({self.param!r}): no choice for {self.param}={value!r}; "
                f"choices: {list(self.choices)}"
            )
        choice = self.choices[value]
        return None if choice is None else choice.format(**params)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One kind of run in a sweep (see the module docstring).

    Attributes:
      name: the stage's name ('pretrain', 'finetune').
      run_name: template of each run's name, which is also its folder under ROOT.
      config: template of the config file path.
      runs: the parameter dicts, one per run.
      config_arg: template of the config argument (`FILE.py:ARG`); '' for none.
      overrides: parameter name -> config key; each run gets `--config.KEY=VALUE`.
      fixed_overrides: config key -> value, the same for every run.
      depends_on: template of the name of the run this one starts from.
      init_key: the config key that receives the dependency's workdir.
      tuned: parameters that are hyper-parameters chosen on validation, not
        compared (e.g. ('lr',)): the report keeps, for each arm (every other
        parameter but the seed), the value whose `select` metric has the best
        mean over seeds, and reports that value's runs.
      select: 'EVAL/METRIC' that picks the tuned value, e.g.
        'validation/balanced_accuracy' (its 'best' checkpoint when there is one).
    """

    name: str
    run_name: Template
    config: Template
    runs: Sequence[Params]
    config_arg: Template = ""
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fixed_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    depends_on: Template = None
    init_key: str = "init.checkpoint"
    tuned: Sequence[str] = ()
    select: str = ""

    def __post_init__(self):
        if self.tuned and "/" not in self.select:
            raise ValueError(
                f"stage {self.name!r}: tuned={tuple(self.tuned)} needs select='EVAL/METRIC', "
                "the validation metric that chooses among them"
            )


@dataclasses.dataclass(frozen=True)
class Run:
    """One expanded run: everything needed to launch it, except the command prefix.

    `args` are the arguments after the prefix (`python -m micle_jax.main`).
    """

    name: str
    stage: str
    params: Params
    workdir: str
    args: tuple[str, ...]
    depends_on: str | None
    tuned: tuple[str, ...] = ()
    select: str = ""

    def command(self, prefix: Sequence[str]) -> list[str]:
        """The full command line: `prefix + args`."""
        return [*prefix, *self.args]


def format_value(value: Any) -> str:
    """How a parameter value is written on the command line (as ml_collections parses it)."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _render(template: Template, params: Params, stage: str, what: str) -> str | None:
    if template is None:
        return None
    try:
        if callable(template):
            return template(params)
        return template.format(**params)
    except (KeyError, IndexError) as e:
        raise ValueError(
            f"stage {stage!r}: {what} {template!r} needs {e} but the run's parameters are {params}"
        ) from None
    except ValueError as e:
        raise ValueError(f"stage {stage!r}, {what}: {e}") from None


def expand(stages: Sequence[Stage], root: str) -> list[Run]:
    """Expands stages into runs with their command arguments; checks names and dependencies.

    Args:
      stages: the sweep's stages, in the order they were defined.
      root: the sweep folder; each run's workdir is ROOT/<run name>.

    Returns:
      The runs in definition order (use `dependency_order` to launch them).
    """
    if not stages:
        raise ValueError("the sweep has no stages; get_sweep() must return a list of Stage")
    runs: list[Run] = []
    seen: dict[str, Run] = {}
    for stage in stages:
        if not isinstance(stage, Stage):
            raise TypeError(f"get_sweep() returned {stage!r}; expected launch.sweep_spec.Stage")
        if not stage.runs:
            raise ValueError(f"stage {stage.name!r} has no runs (an empty product or elementwise?)")
        for params in stage.runs:
            run = _expand_one(stage, dict(params), root)
            if run.name in seen:
                other = seen[run.name]
                raise ValueError(
                    f"duplicate run name {run.name!r}: stage {other.stage!r} {other.params} and "
                    f"stage {run.stage!r} {run.params}; put the differing parameters in run_name"
                )
            seen[run.name] = run
            runs.append(run)
    for run in runs:
        if run.depends_on is not None and run.depends_on not in seen:
            close = difflib.get_close_matches(run.depends_on, list(seen), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(
                f"run {run.name!r} depends on {run.depends_on!r}, which is not a run of this "
                f"sweep{hint}"
            )
    return runs


def _expand_one(stage: Stage, params: Params, root: str) -> Run:
    name = _render(stage.run_name, params, stage.name, "run_name")
    if not name or not _NAME_RE.match(name):
        raise ValueError(
            f"stage {stage.name!r}: run name {name!r} is not a valid folder name "
            f"(letters, digits and . _ = + - only)"
        )
    config = _render(stage.config, params, stage.name, "config")
    if not config:
        raise ValueError(f"stage {stage.name!r}: run {name!r} has no config file")
    config_arg = _render(stage.config_arg, params, stage.name, "config_arg")
    workdir = os.path.join(root, name)
    args = [f"--config={config}:{config_arg}" if config_arg else f"--config={config}"]
    args.append(f"--workdir={workdir}")
    for param, key in stage.overrides.items():
        if param not in params:
            raise ValueError(
                f"stage {stage.name!r}: overrides maps parameter {param!r} to {key!r}, but run "
                f"{name!r} has no such parameter (its parameters: {sorted(params)})"
            )
        args.append(f"--config.{key}={format_value(params[param])}")
    for key, value in stage.fixed_overrides.items():
        args.append(f"--config.{key}={format_value(value)}")
    depends_on = _render(stage.depends_on, params, stage.name, "depends_on")
    if depends_on == name:
        raise ValueError(f"dependency cycle: {name} -> {name}")
    if depends_on is not None:
        args.append(f"--config.{stage.init_key}={os.path.join(root, depends_on)}")
    missing = [p for p in stage.tuned if p not in params]
    if missing:
        raise ValueError(f"stage {stage.name!r}: tuned parameters {missing} are not in {params}")
    return Run(
        name, stage.name, params, workdir, tuple(args), depends_on, tuple(stage.tuned), stage.select
    )


def dependency_order(runs: Sequence[Run]) -> list[Run]:
    """Topological order: every run after the run it depends on, else definition order.

    Raises ValueError naming the runs of a dependency cycle.
    """
    by_name = {r.name: r for r in runs}
    index = {r.name: i for i, r in enumerate(runs)}
    dependants: dict[str, list[str]] = {r.name: [] for r in runs}
    waiting = {}
    for r in runs:
        if r.depends_on is not None:
            if r.depends_on not in by_name:
                raise ValueError(f"run {r.name!r} depends on {r.depends_on!r}, which is not a run")
            dependants[r.depends_on].append(r.name)
        waiting[r.name] = int(r.depends_on is not None)
    ready = [index[n] for n, w in waiting.items() if w == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        run = runs[heapq.heappop(ready)]
        ordered.append(run)
        for child in dependants[run.name]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, index[child])
    if len(ordered) < len(runs):
        stuck = next(r for r in runs if waiting[r.name])
        cycle, name = [], stuck.name
        while name not in cycle:
            cycle.append(name)
            name = by_name[name].depends_on
        cycle = cycle[cycle.index(name) :] + [name]
        raise ValueError(f"dependency cycle (each run depends on the next): {' -> '.join(cycle)}")
    return ordered


def load_sweep(spec: str) -> list[Stage]:
    """Loads `configs/sweeps/NAME.py[:ARG]` and returns `get_sweep(ARG)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--sweep={spec}: no file {path!r}; sweep files live in configs/sweeps/ "
            "(run from the repository root)"
        )
    module_name = "sweep_file_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise AttributeError(f"--sweep={spec}: {path} defines no get_sweep(arg=None)")
    return list(module.get_sweep(arg or None))
