"""The training process's malloc: glibc's, asked for transparent huge pages.

XLA:CPU allocates a compiled step's temporary buffers anew at every
execution. glibc serves blocks that large with a fresh mmap and returns them
with munmap, so every step faults its temporaries in again, 4 KiB at a time:
31,000 page faults (~120 MiB) and ~80 ms of kernel time per step of the
demo's network on the 2-core machine, 198,000 (~770 MiB) and ~450 ms per
ResNet-50 1x step at 64 px, 32 pairs. With
glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks for transparent huge
pages (madvise), 2 MiB at a time: ~450 and ~1,000 faults per step, the
demo's step 0.72x its time and ResNet-50's 0.9x, for 1% more resident
memory (docs/performance.md). PyTorch's step, which allocates per tensor,
was not faster with it.

glibc reads tunables when a process starts, so `python -m micle_jax.main`
restarts itself once with the tunable added (`restart_with_tuned_malloc`:
os.execve, the same process id, interpreter and arguments) before it imports
anything heavy. Nothing changes where it does not apply: not Linux with
glibc, a GLIBC_TUNABLES that already sets `glibc.malloc.hugetlb` (the user's
choice stands), or MICLE_JAX_DEFAULT_MALLOC=1 (opt out, e.g. under a
debugger that a restart would leave). A kernel with transparent huge pages
off (`/sys/kernel/mm/transparent_hugepage/enabled` = never) ignores the
request.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "MICLE_JAX_DEFAULT_MALLOC"


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with TUNABLE added to GLIBC_TUNABLES; None where nothing is to change."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    if environ.get(OPT_OUT, "") not in ("", "0"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, TUNABLE) if t)}


def restart_with_tuned_malloc() -> None:
    """Replaces this process by itself started with tuned_environ; returns where none applies."""
    environ = tuned_environ(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
