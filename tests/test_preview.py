"""Tests for micle_jax/data/preview.py: the CLI writes a readable PNG grid."""

import pathlib
import subprocess
import sys

import numpy as np
from fixtures import tiny_records
from PIL import Image

from micle_jax.data import preview

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "fixtures" / "preview_config.py"


def test_preview_cli_writes_png(tmp_path):
    out = tmp_path / "sub" / "preview.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "micle_jax.data.preview",
            f"--config={CONFIG}",
            f"--out={out}",
            "--rows=3",
            "--config.data.image_size=12",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout and "3 rows of mode 'micle'" in result.stdout
    with Image.open(out) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert height > width  # 3 rows of 2 panels
    assert pixels.std() > 10  # pictures, not a blank canvas


def test_render_single_view_batch(tmp_path):
    batch = {
        "image": np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32),
        "label": np.array([1, -1], np.int32),
        "case_id": np.array([b"a", b"b"], object),
    }
    path = tmp_path / "grid.png"
    preview.render(batch, str(path), "title")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[1] > image.size[0]


def test_preview_shows_the_policy_training_resolves(tmp_path):
    # RGB records under configs/micle_medical.py, whose augment defaults to
    # 'auto': the preview names the resolved policy and its views are in colour.
    rng = np.random.default_rng(0)
    cases = [
        dict(
            case_id=f"c{i}",
            images=[tiny_records.png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))],
            image_ids=[f"c{i}/0"],
        )
        for i in range(4)
    ]
    tiny_records.write(tmp_path / "derm", cases, num_shards=1, label_type="none")
    out = tmp_path / "preview.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "micle_jax.data.preview",
            f"--config={REPO / 'configs' / 'micle_medical.py'}:records={tmp_path / 'derm'},"
            "runlocal=True",
            f"--out={out}",
            "--rows=4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB")).astype(np.int32)
    # The 'cxr' policy would draw every panel gray (R = G = B everywhere).
    colour = np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2])
    assert (colour > 30).mean() > 0.05
    assert "augment policy 'simclr' (auto: tiny train images are RGB" in result.stdout
