"""Every config's JSON is pinned: a refactor of the defaults must not change a run.

The fixtures are the configs as `config.to_json_best_effort(indent=1)` writes
them into WORKDIR/config.json, for each `configs/*.py` with its default
argument and with `runlocal=True` (linear_eval needs an init). A deliberate
change of a config regenerates them:

    python tests/test_config_json.py --write
"""

import importlib.util
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "config_json"
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))
ARGS = {"default": "", "runlocal": "runlocal=True"}
LINEAR_EVAL_INIT = "init=/runs/x"  # linear_eval refuses a random backbone


def config_json(name: str, tag: str) -> str:
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_pinned_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arg = ARGS[tag]
    if name == "linear_eval":
        arg = ",".join(a for a in (LINEAR_EVAL_INIT, arg) if a)
    return module.get_config(arg or None).to_json_best_effort(indent=1)


@pytest.mark.parametrize("tag", sorted(ARGS))
@pytest.mark.parametrize("name", CONFIGS)
def test_config_json_is_unchanged(name, tag):
    fixture = FIXTURES / f"{name}.{tag}.json"
    assert fixture.is_file(), f"no pinned JSON for {name} ({tag}): run {__file__} --write"
    assert config_json(name, tag) == fixture.read_text(), (
        f"configs/{name}.py ({tag}) changed its JSON; if deliberate: python {__file__} --write"
    )


def test_every_config_is_pinned():
    pinned = {p.name.split(".")[0] for p in FIXTURES.glob("*.json")}
    assert pinned == set(CONFIGS)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    sys.path.insert(0, str(REPO))
    for name in CONFIGS:
        for tag in ARGS:
            (FIXTURES / f"{name}.{tag}.json").write_text(config_json(name, tag))
