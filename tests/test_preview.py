"""Tests for micle_jax/data/stream/preview.py: the CLI writes a readable PNG grid."""

import pathlib
import subprocess
import sys

import numpy as np
from fixtures import tiny_records
from PIL import Image

from micle_jax.data.stream import preview

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "fixtures" / "preview_config.py"


def test_preview_cli_writes_png(tmp_path):
    out = tmp_path / "sub" / "preview.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "micle_jax.data.stream.preview",
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
            "micle_jax.data.stream.preview",
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


def test_title_leaves_room_for_the_first_row_labels(tmp_path):
    # Eight rows and a title of several lines: tight_layout printed such a title
    # over the first row's captions. White panels, so only text is dark.
    rows = 8
    batch = {
        "image": np.ones((rows, 8, 8, 3), np.float32),
        "label": np.arange(rows, dtype=np.int32),
        "case_id": np.array([f"case{i}".encode() for i in range(rows)], object),
    }
    title = (
        "records:/data/a/long/path/to/the/dataset | supervised | augment 'simclr' "
        "(auto: dataset train images are RGB, first 16 checked; no modality recorded) | step 0"
    )
    path = tmp_path / "grid.png"
    preview.render(batch, str(path), title)
    with Image.open(path) as image:
        dark = (np.asarray(image.convert("L")) < 160).any(axis=1)  # rows holding text

    # Where the layout puts the title and the first caption, in PNG rows (top = 0).
    fig = preview.figure(batch, title)
    fig.set_dpi(preview.DPI)
    fig.draw_without_rendering()
    height = round(fig.get_figheight() * preview.DPI)
    assert len(dark) == height

    def png_rows(artist):
        box = artist.get_window_extent()
        return int(np.floor(height - box.y1)), int(np.ceil(height - box.y0))

    suptitle = fig.texts[0]
    assert suptitle.get_text().startswith("records:")
    (title_top, title_bottom), (label_top, label_bottom) = (
        png_rows(suptitle),
        png_rows(fig.axes[0].title),
    )
    assert title_bottom <= label_top, "the title overlaps the first row's caption"
    # The PNG shows them there: text in both boxes, nothing dark above the
    # first panel outside them (one row of antialiasing aside).
    assert dark[title_top:title_bottom].any() and dark[label_top:label_bottom].any()
    panel_top, _ = png_rows(fig.axes[0])
    outside = np.ones(panel_top, bool)
    outside[max(title_top - 1, 0) : title_bottom + 1] = False
    outside[max(label_top - 1, 0) : label_bottom + 1] = False
    assert not dark[:panel_top][outside].any()
