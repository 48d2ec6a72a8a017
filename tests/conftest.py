"""Test-wide set-up: 8 fake CPU devices, TensorFlow kept off accelerators.

XLA_FLAGS must be set before jax is first imported, so it lives here: every test
module sees 8 CPU devices and can test sharded code against single-device code.
"""

import os
import tempfile

# The tests' networks are tiny: compiling their steps is most of the suite's time,
# and XLA's CPU backend at -O0 compiles them faster (OPTIMIZED_FLAGS: for the
# tests that time real work, which drop it).
O0_FLAG = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {O0_FLAG}"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the CLI subprocesses they start) compile the same tiny
# training steps: a persistent XLA cache turns a ~50 s compile into ~5 s.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "micle_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data (the real medical datasets); a missing folder fails the test.

    CI and every development checkout have it next to the repository, so its
    absence is a broken set-up, not an optional feature: a skip would hide it.
    """
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"real data not found at {SHARED_DATA}: the tests that read real images need "
            "../shared/data next to the repository (see its README.md for the four datasets); "
            "check it out there or link it, then rerun",
            pytrace=False,
        )
    return SHARED_DATA
