"""Tests for launch/sweep_spec.py (combinators, expansion, dependency order) and the sweep files."""

import importlib.util
import io
import json
import pathlib
import sys

import pytest

from launch import sweep, sweep_spec
from launch.sweep_spec import Stage, chain, product, select
from micle_jax import rundir

REPO = pathlib.Path(__file__).resolve().parents[1]
SWEEPS = REPO / "configs" / "sweeps"


# ---------------------------------------------------------------- expansion


def test_product_is_cartesian_with_first_axis_slowest():
    runs = product(method=["simclr", "micle"], seed=[0, 1, 2])
    assert runs == [{"method": m, "seed": s} for m in ("simclr", "micle") for s in (0, 1, 2)]


def test_elementwise_pairs_values_and_nests_in_product():
    pairs = sweep_spec.elementwise(method=["supervised", "simclr"], init=["sup", "ssl"])
    assert pairs == [{"method": "supervised", "init": "sup"}, {"method": "simclr", "init": "ssl"}]
    runs = product(pairs, seed=[0, 1])
    assert len(runs) == 4
    assert runs[1] == {"method": "supervised", "init": "sup", "seed": 1}
    both = chain(pairs, product(method=["micle"], init=["x"]))
    assert [r["method"] for r in both] == ["supervised", "simclr", "micle"]


def test_combinator_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"same length, got lengths \[2, 3\]"):
        sweep_spec.elementwise(a=[1, 2], b=[1, 2, 3])
    with pytest.raises(TypeError, match=r"write method=\['simclr'\]"):
        product(method="simclr")
    with pytest.raises(ValueError, match="'seed' is set by two"):
        product(product(seed=[0]), seed=[1])


def _stage(name="ft", **kw):
    base = dict(
        name=name,
        run_name="ft_{method}_s{seed}",
        config="configs/finetune_derm.py",
        runs=product(method=["supervised", "simclr"], seed=[0, 1]),
    )
    return Stage(**{**base, **kw})


def test_expand_builds_the_exact_command():
    pre = Stage(
        name="pre",
        run_name="pre_{method}",
        config="configs/simclr_medical.py",
        config_arg="task=derm,arch={arch}",
        runs=product(method=["simclr"], arch=["r50x1"]),
    )
    ft = _stage(
        runs=product(method=["simclr"], label_fraction=[0.1], seed=[2]),
        run_name="ft_{method}_f{label_fraction}_s{seed}",
        overrides={"seed": "seed", "label_fraction": "data.label_fraction"},
        fixed_overrides={"total_epochs": 5},
        depends_on="pre_{method}",
    )
    pre_run, ft_run = sweep_spec.expand([pre, ft], "/r")
    assert pre_run.args == (
        "--config=configs/simclr_medical.py:task=derm,arch=r50x1",
        "--workdir=/r/pre_simclr",
    )
    assert ft_run.name == "ft_simclr_f0.1_s2"
    assert ft_run.command(["python", "-m", "micle_jax.main"]) == [
        "python",
        "-m",
        "micle_jax.main",
        "--config=configs/finetune_derm.py",
        "--workdir=/r/ft_simclr_f0.1_s2",
        "--config.seed=2",
        "--config.data.label_fraction=0.1",
        "--config.total_epochs=5",
        "--config.init.checkpoint=/r/pre_simclr",
    ]
    assert ft_run.depends_on == "pre_simclr"


def test_select_none_means_no_dependency():
    pre = Stage(name="pre", run_name="pre_{method}", config="c.py", runs=product(method=["simclr"]))
    ft = _stage(depends_on=select("method", supervised=None, simclr="pre_{method}"))
    runs = {r.name: r for r in sweep_spec.expand([pre, ft], "/r")}
    assert runs["ft_supervised_s0"].depends_on is None
    assert not any("init.checkpoint" in a for a in runs["ft_supervised_s0"].args)
    assert runs["ft_simclr_s1"].depends_on == "pre_simclr"
    bad = _stage(depends_on=select("method", simclr="pre_simclr"))
    with pytest.raises(
        ValueError, match="stage 'ft', depends_on.*no choice for method='supervised'"
    ):
        sweep_spec.expand([pre, bad], "/r")


def test_duplicate_run_names_are_an_error():
    with pytest.raises(ValueError, match="duplicate run name 'ft_supervised'.*put the differing"):
        sweep_spec.expand([_stage(run_name="ft_{method}")], "/r")


def test_template_and_override_errors_name_the_parameter():
    with pytest.raises(ValueError, match="needs 'arch'"):
        sweep_spec.expand([_stage(config_arg="arch={arch}")], "/r")
    with pytest.raises(ValueError, match="no such parameter.*'label_fraction'|'label_fraction'"):
        sweep_spec.expand([_stage(overrides={"label_fraction": "data.label_fraction"})], "/r")
    with pytest.raises(ValueError, match="not a valid folder name"):
        sweep_spec.expand([_stage(run_name="ft/{method}_{seed}")], "/r")
    with pytest.raises(ValueError, match="has no runs"):
        sweep_spec.expand([_stage(runs=product(method=[]))], "/r")


def test_missing_dependency_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"depends on 'pre_simclrr'.*did you mean \['pre_simclr'"):
        sweep_spec.expand(
            [
                Stage(name="pre", run_name="pre_simclr", config="c.py", runs=[{}]),
                _stage(depends_on="pre_simclrr"),
            ],
            "/r",
        )


def test_cycle_is_an_error_naming_its_runs():
    a = Stage(name="a", run_name="a", config="c.py", runs=[{}], depends_on="b")
    b = Stage(name="b", run_name="b", config="c.py", runs=[{}], depends_on="c")
    c = Stage(name="c", run_name="c", config="c.py", runs=[{}], depends_on="b")
    runs = sweep_spec.expand([a, b, c], "/r")
    with pytest.raises(ValueError, match=r"cycle.*: b -> c -> b"):
        sweep_spec.dependency_order(runs)


def test_dependency_order_is_topological_and_otherwise_stable():
    # Stages defined dependants first: the order must still put dependencies first.
    ft = _stage(depends_on=select("method", supervised=None, simclr="pre_{method}"))
    pre = Stage(
        name="pre",
        run_name="pre_{method}",
        config="c.py",
        runs=product(method=["simclr"]),
        depends_on="base",
    )
    base = Stage(name="base", run_name="base", config="c.py", runs=[{}])
    runs = sweep_spec.expand([ft, pre, base], "/r")
    ordered = [r.name for r in sweep_spec.dependency_order(runs)]
    assert ordered == [
        "ft_supervised_s0",
        "ft_supervised_s1",
        "base",
        "pre_simclr",
        "ft_simclr_s0",
        "ft_simclr_s1",
    ]
    position = {n: i for i, n in enumerate(ordered)}
    for r in runs:
        if r.depends_on:
            assert position[r.depends_on] < position[r.name]


# ---------------------------------------------------------------- tuned stages


def _tuned_stage(**kw):
    base = dict(
        run_name="ft_{method}_lr{lr}_s{seed}",
        runs=product(method=["supervised", "simclr"], lr=[0.1, 0.4], seed=[0, 1]),
        overrides={"seed": "seed", "lr": "optim.base_lr"},
    )
    return _stage(**{**base, **kw})


def test_a_tuned_stage_needs_a_selection_metric():
    with pytest.raises(ValueError, match=r"stage 'ft': tuned=\('lr',\) needs select="):
        _tuned_stage(tuned=("lr",))
    with pytest.raises(ValueError, match="needs select='EVAL/METRIC'"):
        _tuned_stage(tuned=("lr",), select="balanced_accuracy")  # no eval name


def test_a_tuned_parameter_missing_from_the_runs_is_an_error():
    stage = _stage(tuned=("lr",), select="validation/accuracy")  # runs: method x seed only
    with pytest.raises(ValueError, match=r"stage 'ft': tuned parameters \['lr'\] are not in"):
        sweep_spec.expand([stage], "/r")


def test_expand_carries_tuned_and_select_to_every_run_of_the_stage():
    pre = Stage(name="pre", run_name="pre", config="c.py", runs=[{}])
    tuned = _tuned_stage(tuned=("lr",), select="validation/balanced_accuracy")
    runs = sweep_spec.expand([pre, tuned], "/r")
    assert (runs[0].tuned, runs[0].select) == ((), "")
    assert len(runs) == 9
    for run in runs[1:]:
        assert (run.tuned, run.select) == (("lr",), "validation/balanced_accuracy")


def test_the_local_executor_writes_the_tuning_into_sweep_run_json(tmp_path):
    pre = Stage(name="pre", run_name="pre", config="c.py", runs=[{}])
    tuned = _tuned_stage(
        runs=product(method=["simclr"], lr=[0.1, 0.4], seed=[0]),
        tuned=("lr",),
        select="validation/balanced_accuracy",
    )
    runs = sweep_spec.expand([pre, tuned], str(tmp_path))
    fake = [sys.executable, str(REPO / "tests" / "fixtures" / "fake_trainer.py")]
    out = io.StringIO()
    assert sweep.run_local(runs, fake, poll_s=0.02, out=out) == 0, out.getvalue()
    info = {r.name: json.loads((tmp_path / r.name / rundir.RUN_FILE).read_text()) for r in runs}
    assert "tune" not in info["pre"]
    for name in ("ft_simclr_lr0.1_s0", "ft_simclr_lr0.4_s0"):
        assert info[name]["tune"] == {"params": ["lr"], "select": "validation/balanced_accuracy"}
        assert info[name]["params"]["lr"] in (0.1, 0.4)


# ---------------------------------------------------------------- sweep files


def test_label_efficiency_sweep_matches_the_paper_grid():
    stages = sweep_spec.load_sweep(f"{SWEEPS}/label_efficiency.py:task=chexpert,arch=r152x2")
    runs = sweep_spec.expand(stages, "/r")
    ft = [r for r in runs if r.stage == "finetune"]
    # 3 methods x 10 label fractions (10%..90%, 100%) x 3 seeds.
    assert len(ft) == 90
    fractions = sorted({r.params["label_fraction"] for r in ft})
    assert fractions == pytest.approx([0.1 * i for i in range(1, 11)])
    assert len(runs) == 94  # + ImageNet SimCLR, ImageNet supervised, in-domain SimCLR, MICLe
    by_name = {r.name: r for r in runs}
    sup = by_name["ft_chexpert_supervised_r152x2_f0.3_s2"]
    # The supervised model has no projection head: its fine-tuning copies the backbone only.
    assert sup.args[0] == (
        "--config=configs/finetune_chexpert.py:arch=r152x2,records=data/chexpert,init_proj_layers=0"
    )
    assert "--config.init.checkpoint=/r/imagenet_supervised_r152x2" in sup.args
    micle = by_name["chexpert_micle_r152x2"]
    # Chest X-rays: the no-blur 'cxr' augmentations (paper).
    assert micle.args[0] == (
        "--config=configs/micle_medical.py:arch=r152x2,augment=cxr,records=data/chexpert"
    )
    assert micle.depends_on == "imagenet_simclr_r152x2"
    sweep_spec.dependency_order(runs)  # no cycle
    local = sweep_spec.expand(sweep_spec.load_sweep(f"{SWEEPS}/label_efficiency.py:runlocal"), "/r")
    assert all("runlocal=True" in r.args[0] for r in local)
    assert len([r for r in local if r.stage == "finetune"]) == 3 * 2 * 2


def test_sweep_arguments_are_checked():
    for arg, message in [
        ("task=cxr", "task='cxr'"),
        ("arch=r18x1", "paper's architectures"),
        ("methods=simclr+byol", "unknown \\['byol'\\]"),
        ("fractions=0+1", "each must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            sweep_spec.load_sweep(f"{SWEEPS}/label_efficiency.py:{arg}")


def test_distribution_shift_sweep_evaluates_the_shifted_set_with_all_labels():
    stages = sweep_spec.load_sweep(f"{SWEEPS}/distribution_shift.py:task=derm,methods=simclr")
    runs = sweep_spec.expand(stages, "/r")
    ft = [r for r in runs if r.stage == "finetune_shift"]
    assert len(ft) == 3  # 1 method x 1 fraction x 3 seeds
    for r in ft:
        assert "shifted_eval=True" in r.args[0]
        assert "--config.data.label_fraction=1.0" in r.args
    by_name = {r.name: r for r in runs}
    assert set(by_name) == {"imagenet_simclr_r50x1", "derm_simclr_r50x1"} | {r.name for r in ft}
    # Dermatology pre-training uses SimCLR's augmentations, blur included (paper).
    assert "augment=simclr" in by_name["derm_simclr_r50x1"].args[0]


@pytest.mark.parametrize(
    "spec",
    [
        "label_efficiency.py:task=derm,methods=supervised+simclr+micle+scratch,seeds=1",
        "label_efficiency.py:task=chexpert,arch=r50x4,runlocal",
        "distribution_shift.py:task=chexpert,arch=r152x2",
        "distribution_shift.py:task=derm,runlocal",
        "small_scale_study.py",
        "demo.py",
    ],
)
def test_sweep_commands_fit_the_real_configs(spec):
    # Every config argument parses and every --config.KEY override names an existing
    # field of the (locked) config: a mismatch would only show when a run starts.
    configs = {}
    for run in sweep_spec.expand(sweep_spec.load_sweep(f"{SWEEPS}/{spec}"), "/r"):
        path, _, arg = run.args[0].removeprefix("--config=").partition(":")
        # A renamed or deleted config would only show when the sweep runs: fail here.
        assert (REPO / path).is_file(), f"{run.name}: --config={path} does not exist"
        if path not in configs:
            module_spec = importlib.util.spec_from_file_location("config_under_test", REPO / path)
            configs[path] = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(configs[path])
        config = configs[path].get_config(arg or None)
        for override in run.args[2:]:
            key = override.removeprefix("--config.").partition("=")[0]
            node = config
            for part in key.split("."):
                assert part in node, f"{run.name}: {path} has no field {key}"
                node = node[part]


def _floats(text):
    return [float(v) for v in text.split("+") if v]


def _demo_case():
    from configs.sweeps import demo

    d = demo.DEMO
    return (
        "demo.py",
        d["datasets"].split("+"),
        d["seeds"],
        _floats(d["fractions"]),
        _floats(d["finetune_fractions"]),
        _floats(d["lrs"]),
    )


@pytest.mark.parametrize(
    "spec,datasets,seeds,fractions,finetune_fractions,lrs",
    [
        (
            "small_scale_study.py:seeds=3,fractions=0.01+0.1+1.0,"
            "finetune_fractions=0.01+0.1+1.0,lrs=0.1+0.4,finetune_datasets=ham10000+kermany",
            ["ham10000", "kermany"],
            3,
            [0.01, 0.1, 1.0],
            [0.01, 0.1, 1.0],
            [0.1, 0.4],
        ),
        ("small_scale_study.py", ["ham10000", "kermany"], 5, None, None, None),
        _demo_case(),
    ],
)
def test_small_scale_study_grid_and_dependencies(
    spec, datasets, seeds, fractions, finetune_fractions, lrs
):
    runs = sweep_spec.expand(sweep_spec.load_sweep(f"{SWEEPS}/{spec}"), "/r")
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.stage, []).append(run)
    finetune = [r for r in runs if r.stage.startswith("finetune")]
    if fractions is None:  # the defaults: whatever they are, the grid is complete
        fractions = sorted({f for r in by_stage["features"] for f in _label_fractions(r)})
        finetune_fractions = sorted({r.params["label_fraction"] for r in finetune})
        lrs = sorted({r.params["lr"] for r in finetune})
    d, s = len(datasets), seeds
    assert len(by_stage["pretrain"]) == d * 2 * s  # simclr, micle
    assert len(by_stage["features"]) == d * 3 * s  # random, simclr, micle
    finetune_datasets = {r.params["dataset"] for r in finetune}
    # By default only HAM10000 (the paper's dermatology setting) is fine-tuned.
    assert finetune_datasets == (set(datasets) if "finetune_datasets" in spec else {"ham10000"})
    assert len(finetune) == len(finetune_datasets) * 3 * len(finetune_fractions) * len(lrs) * s
    assert len(runs) == d * 2 * s + d * 3 * s + len(finetune)
    if "lrs=0.1+0.4" in spec:
        assert len(runs) == 12 + 18 + 108 == 138
    assert {r.params["dataset"] for r in runs} == set(datasets)
    assert {r.params["seed"] for r in runs} == set(range(seeds))
    assert sorted({r.params["label_fraction"] for r in finetune}) == sorted(finetune_fractions)
    assert sorted({r.params["lr"] for r in finetune}) == sorted(lrs)

    by_name = {r.name: r for r in runs}
    for run in by_stage["features"] + finetune:
        p = run.params
        if p["method"] in ("random", "scratch"):
            assert run.depends_on is None, run.name
            assert not any("init.checkpoint" in a for a in run.args), run.name
            continue
        parent = by_name[run.depends_on]
        assert parent.stage == "pretrain", run.name
        assert {k: parent.params[k] for k in ("dataset", "method", "seed")} == {
            k: p[k] for k in ("dataset", "method", "seed")
        }, run.name
        assert f"--config.init.checkpoint={parent.workdir}" in run.args
    for run in by_stage["pretrain"]:
        # SimCLR's small-image views for dermatology at 48 px, the no-blur 'cxr' for X-rays.
        policy = {"ham10000": "simclr_small", "kermany": "cxr"}[run.params["dataset"]]
        assert f"augment={policy}," in run.args[0], run.args[0]
    for run in by_stage["features"]:
        assert run.args[0].startswith("--config=configs/feature_eval.py:")
        assert _label_fractions(run) == tuple(fractions)
        assert run.tuned == ()
    for run in finetune:
        # The learning rate is a hyper-parameter chosen on validation, per dataset's metric.
        metric = "balanced_accuracy" if run.params["dataset"] == "ham10000" else "auc_mean"
        assert (run.tuned, run.select) == (("lr",), f"validation/{metric}")
        assert f"--config.select_best=validation/{metric}" in run.args
    sweep_spec.dependency_order(runs)  # no cycle


def _label_fractions(run):
    """The feature run's --config.label_fractions=(...) as a tuple of floats."""
    import ast

    [arg] = [a for a in run.args if a.startswith("--config.label_fractions=")]
    return tuple(ast.literal_eval(arg.partition("=")[2]))
