r"""The SimCLR training step in micle_jax and in PyTorch, side by side on one machine.

  pip install -e '.[bench]'     # PyTorch and torchvision: never a package dependency
  python benchmarks/compare_pytorch.py --arch=r50x1 --image_size=64 --batch=32

(On a CPU-only machine PyTorch's CPU wheel is the one to install, e.g.
`pip install torch --index-url https://download.pytorch.org/whl/cpu`;
`--torch_python` runs the PyTorch side in another environment.)

The same step in both: a ResNet of the same depth (torchvision's, width 1)
with SimCLR v2's 3-layer projection head (Dense without bias, BatchNorm,
ReLU; the last BatchNorm without beta; 128 outputs), NT-Xent over the
2 x batch views at temperature 0.1, forward and backward of both views and
an optimizer update (micle_jax: its LARS; PyTorch: SGD with momentum 0.9),
float32, the same batch and image size. Each side runs in its own child
process (JAX and PyTorch would fight over the cores in one), alternating
`--rounds` times so that load drifts on a shared machine hit both; each
round times `--steps` steps after 2 warm-up steps and reports the median.
Printed: each round's views/s, the medians, micle_jax's peak step memory
(XLA's memory analysis of the compiled step: arguments, outputs and
temporaries) and PyTorch's peak resident memory, and last
`ratio micle_jax/pytorch: X.XX` (above 1: micle_jax is faster).

Only width-1 ResNets (r18x1, r34x1, r50x1, r101x1, r152x1): torchvision has
no width multiplier, so the demo's r18x0.25 has no torchvision twin.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_ARCH = flags.DEFINE_string("arch", "r50x1", "r18x1 | r34x1 | r50x1 | r101x1 | r152x1")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "View size in pixels.")
_BATCH = flags.DEFINE_integer("batch", 32, "Pairs per step (2 x batch views).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per round (after 2 warm-up steps).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds of each side.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.1, "NT-Xent temperature.")
_SIDE = flags.DEFINE_enum("side", "", ["", "jax", "torch"], "Internal: run one side and print.")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", sys.executable, "Python with torch, torchvision, numpy and absl-py installed"
)

RESULT = "RESULT "  # the child's last line: RESULT {json}
DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}


def _depth() -> int:
    match = re.fullmatch(r"r(\d+)x1", _ARCH.value)
    if not match or int(match.group(1)) not in DEPTHS:
        raise app.UsageError(
            f"--arch={_ARCH.value!r}: torchvision has width-1 ResNets only; use one of "
            f"{', '.join(f'r{d}x1' for d in DEPTHS)}"
        )
    return int(match.group(1))


def _median_seconds(run_step, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_jax() -> dict:
    """micle_jax's trainer step (benchmarks/step_throughput.py's build_step)."""
    import jax
    from common import build_step, peak_bytes

    step, state, batch = build_step(_ARCH.value, _IMAGE_SIZE.value, _BATCH.value, "float32")
    compiled = step.lower(state, batch).compile()
    peak = peak_bytes(compiled)
    holder = {"state": state}

    def one():
        holder["state"], measurements = compiled(holder["state"], batch)
        jax.block_until_ready(measurements)

    for _ in range(2):
        one()
    seconds = _median_seconds(one, _STEPS.value)
    return {"seconds": seconds, "peak_bytes": peak, "threads": os.cpu_count()}


def run_torch() -> dict:
    """The same step in PyTorch: torchvision ResNet, SimCLR v2 head, NT-Xent, SGD."""
    import torch
    from torch import nn

    try:
        import torchvision
    except RuntimeError:
        # A torchvision wheel built for another torch build (PyPI's CUDA one next to
        # the CPU torch) fails registering fake kernels of its compiled ops (nms, ...);
        # its ResNets use none of them, so import it without those registrations.
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        register_fake = torch.library.register_fake
        torch.library.register_fake = lambda *args, **kwargs: lambda fn: fn
        try:
            import torchvision
        finally:
            torch.library.register_fake = register_fake

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    backbone = getattr(torchvision.models, DEPTHS[_depth()])(weights=None)
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    head = nn.Sequential(
        nn.Linear(width, width, bias=False),
        nn.BatchNorm1d(width, eps=1e-5, momentum=0.1),
        nn.ReLU(),
        nn.Linear(width, width, bias=False),
        nn.BatchNorm1d(width, eps=1e-5, momentum=0.1),
        nn.ReLU(),
        nn.Linear(width, 128, bias=False),
        nn.BatchNorm1d(128, eps=1e-5, momentum=0.1, affine=True),
    )
    head[-1].bias.requires_grad_(False)  # SimCLR: the last BatchNorm has no beta
    model = nn.Sequential(backbone, head).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    shape = (2 * _BATCH.value, 3, _IMAGE_SIZE.value, _IMAGE_SIZE.value)
    views = torch.from_numpy(rng.random(shape, dtype=np.float32))
    n = _BATCH.value
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    self_mask = torch.eye(2 * n, dtype=torch.bool)

    def one():
        optimizer.zero_grad(set_to_none=True)
        z = nn.functional.normalize(model(views), dim=1)
        logits = (z @ z.T / _TEMPERATURE.value).masked_fill(self_mask, float("-inf"))
        loss = nn.functional.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        one()
    seconds = _median_seconds(one, _STEPS.value)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "peak_rss_bytes": peak_kib * 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _child(side: str) -> dict:
    python = _TORCH_PYTHON.value if side == "torch" else sys.executable
    argv = [python, os.path.abspath(__file__), f"--side={side}"]
    argv += [f"--{f}={getattr(flags.FLAGS, f)}" for f in ("arch", "image_size", "batch", "steps")]
    argv.append(f"--temperature={_TEMPERATURE.value}")
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {side} side failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def main(argv):
    del argv
    _depth()
    if _SIDE.value:
        result = run_jax() if _SIDE.value == "jax" else run_torch()
        print(RESULT + json.dumps(result), flush=True)
        return
    views = 2 * _BATCH.value
    print(
        f"machine: {os.cpu_count()} CPUs; {_ARCH.value}, {_IMAGE_SIZE.value} px, "
        f"{_BATCH.value} pairs ({views} views), float32, {_STEPS.value} timed steps per round"
    )
    rates = {"jax": [], "torch": []}
    last = {}
    for r in range(_ROUNDS.value):
        for side in ("jax", "torch"):
            last[side] = _child(side)
            rates[side].append(views / last[side]["seconds"])
        print(
            f"round {r + 1}: micle_jax {rates['jax'][-1]:.1f} views/s, "
            f"pytorch {rates['torch'][-1]:.1f} views/s",
            flush=True,
        )
    jax_rate, torch_rate = float(np.median(rates["jax"])), float(np.median(rates["torch"]))
    peak = last["jax"]["peak_bytes"]
    print(
        f"micle_jax: {jax_rate:.1f} views/s (median of {_ROUNDS.value}), step memory "
        f"{peak / 2**20:.0f} MiB (XLA memory analysis)"
        if peak is not None
        else f"micle_jax: {jax_rate:.1f} views/s (median of {_ROUNDS.value})"
    )
    print(
        f"pytorch {last['torch']['torch']}: {torch_rate:.1f} views/s (median of "
        f"{_ROUNDS.value}), peak resident memory {last['torch']['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    print(f"ratio micle_jax/pytorch: {jax_rate / torch_rate:.2f}")


if __name__ == "__main__":
    app.run(main)
