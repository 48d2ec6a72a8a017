"""Tests for micle_jax/process_env.py: the trainer's restart with glibc's huge-page malloc."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from micle_jax import process_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tuned_environ_adds_the_tunable_and_keeps_the_users():
    assert process_env.tuned_environ({"A": "1"}) == {
        "A": "1",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    }
    others = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert process_env.tuned_environ(others)["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    assert process_env.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert process_env.tuned_environ({process_env.OPT_OUT: "1"}) is None
    assert process_env.tuned_environ({process_env.OPT_OUT: "0"}) is not None


def test_tuned_environ_changes_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(process_env.platform, "libc_ver", lambda: ("", ""))
    assert process_env.tuned_environ({}) is None
    monkeypatch.setattr(process_env.sys, "platform", "darwin")
    assert process_env.tuned_environ({}) is None


def _main_starts(tmp_path, **env) -> list[dict]:
    """Every interpreter start of `python -m micle_jax.main` (without flags, so it
    stops at once): [{'pid', 'tunables'}], recorded by a sitecustomize."""
    hook, log = tmp_path / "hook", tmp_path / "starts.jsonl"
    hook.mkdir(parents=True)
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import json, os
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps({{"pid": os.getpid(),
                                     "tunables": os.environ.get("GLIBC_TUNABLES")}}) + "\\n")
            """
        )
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",)}
    environ.pop(process_env.OPT_OUT, None)
    environ.update(PYTHONPATH=os.pathsep.join([str(hook), REPO]), **env)
    done = subprocess.run(
        [sys.executable, "-m", "micle_jax.main"],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode != 0 and "is required" in done.stderr, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.skipif(process_env.tuned_environ({}) is None, reason="not Linux with glibc")
def test_main_restarts_itself_once_with_the_tunable(tmp_path):
    first, again = _main_starts(tmp_path)
    assert first == {"pid": first["pid"], "tunables": None}
    assert again == {"pid": first["pid"], "tunables": process_env.TUNABLE}


def test_main_starts_once_where_the_user_chose(tmp_path):
    (opted_out,) = _main_starts(tmp_path / "opt_out", **{process_env.OPT_OUT: "1"})
    assert opted_out["tunables"] is None
    (own,) = _main_starts(tmp_path / "own", GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert own["tunables"] == "glibc.malloc.hugetlb=0"
