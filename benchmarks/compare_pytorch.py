r"""The SimCLR training step in micle_jax and in PyTorch, side by side on one machine.

  pip install -e '.[bench]'     # PyTorch and torchvision: never a package dependency
  python benchmarks/compare_pytorch.py --arch=r50x1 --image_size=64 --batch=32

(On a CPU-only machine PyTorch's CPU wheel is the one to install, e.g.
`pip install torch --index-url https://download.pytorch.org/whl/cpu`;
`--torch_python` runs the PyTorch side in another environment.)

The same step in both: the same ResNet (micle_jax's; in PyTorch torchvision's
BasicBlock / Bottleneck in SimCLR's layout at the same depth and width, which
for r50x1 is torchvision's resnet50 without its fc layer; both sides print
their parameter counts) with SimCLR v2's 3-layer projection head (Dense without bias, BatchNorm,
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

Any r<depth>x<width> without selective kernels: r50x1 at 64 px and 32 pairs
(the issue's figure), the demo's r18x0.25 at 48 px and 128 pairs.
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

_ARCH = flags.DEFINE_string("arch", "r50x1", "r<depth>x<width>: r50x1, r18x0.25, ...")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "View size in pixels.")
_BATCH = flags.DEFINE_integer("batch", 32, "Pairs per step (2 x batch views).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per round (after 2 warm-up steps).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds of each side.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.1, "NT-Xent temperature.")
_CIFAR_STEM = flags.DEFINE_bool("cifar_stem", False, "Internal: the side's stem (parent's rule).")
_SIDE = flags.DEFINE_enum("side", "", ["", "jax", "torch"], "Internal: run one side and print.")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", sys.executable, "Python with torch, torchvision, numpy and absl-py installed"
)

RESULT = "RESULT "  # the child's last line: RESULT {json}
# Blocks per group, as SimCLR's resnet() table (micle_jax/models/resnet.py DEPTHS).
BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def _depth_width() -> tuple[int, float]:
    match = re.fullmatch(r"r(\d+)x(\d+(?:\.\d+)?)", _ARCH.value)
    if not match or int(match.group(1)) not in BLOCKS:
        raise app.UsageError(
            f"--arch={_ARCH.value!r}: use r<depth>x<width> with depth one of "
            f"{', '.join(map(str, BLOCKS))} (e.g. r50x1, r18x0.25); selective kernels "
            "have no torchvision twin"
        )
    return int(match.group(1)), float(match.group(2))


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

    from micle_jax import models

    step, state, batch = build_step(_ARCH.value, _IMAGE_SIZE.value, _BATCH.value, "float32")
    params = models.count_params(state.params)
    compiled = step.lower(state, batch).compile()
    peak = peak_bytes(compiled)
    holder = {"state": state}

    def one():
        holder["state"], measurements = compiled(holder["state"], batch)
        jax.block_until_ready(measurements)

    for _ in range(2):
        one()
    seconds = _median_seconds(one, _STEPS.value)
    return {"seconds": seconds, "peak_bytes": peak, "params": params}


def _torch_backbone(nn, tv_resnet, cifar_stem: bool):
    """torchvision's BasicBlock / Bottleneck in SimCLR's layout (micle_jax's ResNet).

    base = int(64 * width) channels after the stem; a projection shortcut in
    the first block of every block group (also in group 1 of ResNet-18/34,
    where torchvision's own resnet18 has none); SimCLR's stem rule (a 3x3
    stride-1 stem without max-pool at 32 px or less). For r50x1 and deeper
    width-1 networks this is torchvision's resnet50 etc. without its fc layer.

    Returns:
      (module: images -> pooled features, feature width).
    """
    depth, width = _depth_width()
    block = tv_resnet.BasicBlock if depth < 50 else tv_resnet.Bottleneck
    base = int(64 * width)
    if cifar_stem:
        stem = [nn.Conv2d(3, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU()]
    else:
        stem = [nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU()]
        stem.append(nn.MaxPool2d(3, 2, 1))
    blocks, inplanes = [], base
    for group, count in enumerate(BLOCKS[depth]):
        planes, stride = base * 2**group, 1 if group == 0 else 2
        for i in range(count):
            projection = None
            if i == 0:
                out = planes * block.expansion
                projection = nn.Sequential(
                    tv_resnet.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out)
                )
            blocks.append(block(inplanes, planes, stride if i == 0 else 1, projection))
            inplanes = planes * block.expansion
    return nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten()), inplanes


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
    backbone, width = _torch_backbone(nn, torchvision.models.resnet, _CIFAR_STEM.value)
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
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _child(side: str) -> dict:
    python = _TORCH_PYTHON.value if side == "torch" else sys.executable
    argv = [python, os.path.abspath(__file__), f"--side={side}"]
    argv += [f"--{f}={getattr(flags.FLAGS, f)}" for f in ("arch", "image_size", "batch", "steps")]
    argv.append(f"--temperature={_TEMPERATURE.value}")
    argv.append(f"--cifar_stem={_CIFAR_STEM.value}")
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {side} side failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def main(argv):
    del argv
    _depth_width()
    if _SIDE.value:
        result = run_jax() if _SIDE.value == "jax" else run_torch()
        print(RESULT + json.dumps(result), flush=True)
        return
    from micle_jax.models import resnet

    size = _IMAGE_SIZE.value
    flags.FLAGS.cifar_stem = resnet.uses_cifar_stem(None, (1, size, size, 3))
    views = 2 * _BATCH.value
    print(
        f"machine: {os.cpu_count()} CPUs; {_ARCH.value}, {size} px "
        f"({'CIFAR' if _CIFAR_STEM.value else 'ImageNet'} stem), {_BATCH.value} pairs "
        f"({views} views), float32, {_STEPS.value} timed steps per round"
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
    print(f"parameters: micle_jax {last['jax']['params']:,}, pytorch {last['torch']['params']:,}")
    print(f"ratio micle_jax/pytorch: {jax_rate / torch_rate:.2f}")


if __name__ == "__main__":
    app.run(main)
