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

The micle_jax side runs as its trainer does: compiled with
conv.compiler_options() and with glibc's huge-page malloc tunable
(micle_jax/process_env.py, which `python -m micle_jax.main` sets for
itself); PyTorch with its default malloc, or the same with `--same_malloc`.

Any r<depth>x<width> without selective kernels: r50x1 at 64 px and 32 pairs
(the issue's figure), the demo's r18x0.25 at 48 px and 128 pairs.

On a GPU (`--device=gpu`, what benchmarks/gpu_check.sh runs): `--dtype=bfloat16`
is micle_jax's bfloat16 compute dtype and PyTorch's bf16 autocast,
`--channels_last` and `--torch_compile` PyTorch's fast paths. `--matmul_size=N`
also times an N^3 matmul in the dtype with JAX on the same device and prints,
for each side, the step's FLOP rate (XLA's count of the lowered step, the same
model on both sides) as a fraction of that matmul rate.
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
_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Where both sides run.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Compute dtype (PyTorch: autocast)."
)
_CHANNELS_LAST = flags.DEFINE_bool("channels_last", False, "PyTorch: NHWC memory format.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False, "PyTorch: torch.compile the model.")
_MATMUL = flags.DEFINE_integer(
    "matmul_size", 0, "Also time an N^3 matmul in the dtype (JAX) and print fractions of it."
)
_CIFAR_STEM = flags.DEFINE_bool("cifar_stem", False, "Internal: the side's stem (parent's rule).")
_SIDE = flags.DEFINE_enum("side", "", ["", "jax", "torch"], "Internal: run one side and print.")
_SAME_MALLOC = flags.DEFINE_bool(
    "same_malloc",
    False,
    "PyTorch too with the glibc malloc tunable micle_jax's trainer runs with (process_env.py).",
)
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
    from common import build_step, matmul_flops, matmul_flops_per_s, peak_bytes

    from micle_jax import models
    from micle_jax.models import conv

    args = (_ARCH.value, _IMAGE_SIZE.value, _BATCH.value, _DTYPE.value)
    step, state, batch = build_step(*args)
    params = models.count_params(state.params)
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    peak = peak_bytes(compiled)
    holder = {"state": state}

    def one():
        holder["state"], measurements = compiled(holder["state"], batch)
        jax.block_until_ready(measurements)

    for _ in range(2):
        one()
    seconds = _median_seconds(one, _STEPS.value)
    result = {
        "seconds": seconds,
        "peak_bytes": peak,
        "params": params,
        "device": jax.devices()[0].device_kind,
    }
    if _MATMUL.value:
        # The network's FLOPs are its convolutions', not those of the CPU's patch
        # matmuls (which multiply padding too) nor of both platform branches: a
        # step built anew with XLA's convolutions, since jit would reuse the trace above.
        with conv.xla_convolutions():
            counted, counted_state, counted_batch = build_step(*args)
            if jax.default_backend() == "cpu":
                cost = counted.lower(counted_state, counted_batch).cost_analysis()
                result["flops"] = float((cost[0] if isinstance(cost, list) else cost)["flops"])
                result["flops_source"] = "XLA cost analysis, lowered"
            else:
                # jax 0.11 on CUDA analyses no lowered computation, and the compiled
                # one's convolutions are cuDNN calls its count leaves out.
                traced = counted.trace(counted_state, counted_batch)
                result["flops"] = matmul_flops(traced.jaxpr.jaxpr)
                result["flops_source"] = "convolutions and dots of the step's jaxpr"
        result["matmul_flops_per_s"] = matmul_flops_per_s(_MATMUL.value, _DTYPE.value)
    return result


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
    device = torch.device("cuda" if _DEVICE.value == "gpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=gpu: this PyTorch sees no CUDA device")
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
    memory_format = torch.channels_last if _CHANNELS_LAST.value else torch.contiguous_format
    model = nn.Sequential(backbone, head).train().to(device, memory_format=memory_format)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    forward = torch.compile(model) if _TORCH_COMPILE.value else model
    rng = np.random.default_rng(0)
    shape = (2 * _BATCH.value, 3, _IMAGE_SIZE.value, _IMAGE_SIZE.value)
    views = torch.from_numpy(rng.random(shape, dtype=np.float32))
    views = views.to(device).contiguous(memory_format=memory_format)
    n = _BATCH.value
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(device)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=device)
    autocast = _DTYPE.value == "bfloat16"

    def one():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            z = nn.functional.normalize(forward(views).float(), dim=1)
        logits = (z @ z.T / _TEMPERATURE.value).masked_fill(self_mask, float("-inf"))
        loss = nn.functional.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        one()
    seconds = _median_seconds(one, _STEPS.value)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "peak_rss_bytes": peak_kib * 1024,
        "peak_device_bytes": (torch.cuda.max_memory_allocated() if device.type == "cuda" else None),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": params,
    }


def _child(side: str) -> dict:
    from micle_jax import process_env

    python = _TORCH_PYTHON.value if side == "torch" else sys.executable
    argv = [python, os.path.abspath(__file__), f"--side={side}"]
    names = ("arch", "image_size", "batch", "steps", "temperature", "cifar_stem", "device", "dtype")
    names += ("channels_last", "torch_compile", "matmul_size")
    argv += [f"--{f}={getattr(flags.FLAGS, f)}" for f in names]
    platform = "cuda" if _DEVICE.value == "gpu" else "cpu"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", platform)}
    if side == "jax" or _SAME_MALLOC.value:
        # micle_jax's trainer runs with glibc's huge-page malloc (micle_jax/process_env.py).
        env = process_env.tuned_environ(env) or env
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
    from micle_jax import process_env
    from micle_jax.models import resnet

    size = _IMAGE_SIZE.value
    flags.FLAGS.cifar_stem = resnet.uses_cifar_stem(None, (1, size, size, 3))
    views = 2 * _BATCH.value
    torch_options = [
        name
        for name, on in (
            ("channels_last", _CHANNELS_LAST.value),
            ("torch.compile", _TORCH_COMPILE.value),
        )
        if on
    ]
    print(
        f"machine: {os.cpu_count()} CPUs, --device={_DEVICE.value}; {_ARCH.value}, {size} px "
        f"({'CIFAR' if _CIFAR_STEM.value else 'ImageNet'} stem), {_BATCH.value} pairs "
        f"({views} views), {_DTYPE.value}, {_STEPS.value} timed steps per round; pytorch "
        f"{' + '.join(torch_options) or 'eager, contiguous'}; glibc malloc tunable "
        f"{process_env.TUNABLE} for micle_jax (as its trainer runs)"
        + (" and pytorch" if _SAME_MALLOC.value else ", pytorch's default malloc")
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
    jax_last, torch_last = last["jax"], last["torch"]
    peak = jax_last["peak_bytes"]
    print(
        f"micle_jax on {jax_last['device']}: {jax_rate:.1f} views/s (median of {_ROUNDS.value})"
        + (f", step memory {peak / 2**20:.0f} MiB (XLA memory analysis)" if peak else "")
    )
    torch_peak = torch_last["peak_device_bytes"]
    print(
        f"pytorch {torch_last['torch']}: {torch_rate:.1f} views/s (median of {_ROUNDS.value}), "
        + (
            f"peak device memory {torch_peak / 2**20:.0f} MiB (max_memory_allocated)"
            if torch_peak
            else f"peak resident memory {torch_last['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
    )
    print(f"parameters: micle_jax {jax_last['params']:,}, pytorch {torch_last['params']:,}")
    if _MATMUL.value:
        # Both sides train the same network: micle_jax's count of its step (flops_source).
        reference, flops = jax_last["matmul_flops_per_s"], jax_last["flops"]
        print(
            f"step FLOPs ({jax_last['flops_source']}): {flops / 1e9:.2f} GFLOP; "
            f"reference {_MATMUL.value}^3 {_DTYPE.value} matmul: {reference / 1e12:.2f} TFLOP/s"
        )
        for name, rate in (("micle_jax", jax_rate), ("pytorch", torch_rate)):
            achieved = flops * rate / views
            print(
                f"{name}: {achieved / 1e12:.3f} TFLOP/s, fraction of the matmul rate "
                f"{achieved / reference:.3f}"
            )
    print(f"ratio micle_jax/pytorch: {jax_rate / torch_rate:.2f}")


if __name__ == "__main__":
    app.run(main)
