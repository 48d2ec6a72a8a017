"""Test-wide set-up: 8 fake CPU devices, TensorFlow kept off accelerators.

XLA_FLAGS must be set before jax is first imported, so it lives here: every test
module sees 8 CPU devices and can test sharded code against single-device code;
the programs the tests start see one (below).
"""

import os
import tempfile

# The tests' networks are tiny: compiling their steps is most of the suite's time,
# and XLA's CPU backend compiles them fastest with LLVM at -O0 and its classic
# (non-MLIR) fusion emitters: a tiny ResNet-18 step in 4.4 s against 6.9 s at -O0
# alone and 10.7 s at the default -O2 (the steps then run slower, which a test of
# a few steps does not feel). Tests that time or run real work drop these flags.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
TEST_DEVICES = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {TEST_DEVICES} {FAST_COMPILE_FLAGS}"
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

import jax  # noqa: E402
import pytest  # noqa: E402

# XLA reads XLA_FLAGS once, when its CPU client starts: this process keeps 8 devices.
jax.devices()
# The programs the tests start (the CLI, sweeps, launchers) inherit this
# environment and run as a user's do on a CPU machine, on its one device; 8 fake
# devices there would have 2 cores run every replicated computation (the
# initialisation, the optimizer update) 8 times. Sharding is tested in this process
# on 8 devices and by the multi-process tests, which set their own XLA_FLAGS.
os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"].replace(
    TEST_DEVICES, "--xla_force_host_platform_device_count=1"
)

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
