r"""Writes one batch, as the trainer sees it, as a PNG grid to check by eye.

  python -m micle_jax.data.stream.preview --config=configs/micle_medical.py:runlocal=True \
      --out=preview.png [--rows=8] [--config.data.augment=simclr]

One row per example. Contrastive modes ('simclr', 'micle') show view1 | view2
with the case id and whether the views come from two different images of the
case (MICLe's positive pair) or from the same image; 'supervised' and 'eval'
show the one view with its label. The batch is built by the training pipeline
(config.data, config.data.mode, config.seed) for one process, with --rows
examples per batch. The augmentation is the one training uses: with
data.augment='auto' the policy resolved from the data (pipeline.Data.augment_policy),
named in the title and printed with the reason.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure
from ml_collections import config_flags

from micle_jax.data.stream import pipeline


def define_flags() -> None:
    """The command's flags; defined only when it runs, so importing `render` adds none."""
    config_flags.DEFINE_config_file("config", None, "config file[:args]", lock_config=True)
    flags.DEFINE_string("out", "preview.png", "PNG file to write")
    flags.DEFINE_integer("rows", 8, "examples shown (the batch size of the preview)")
    flags.DEFINE_integer("step", 0, "show batch `step` of a stream of --rows examples per batch")


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _captions(batch: dict, i: int) -> list[str]:
    """Titles of row i's panels."""
    case = _text(batch["case_id"][i])
    if "view1" in batch:
        same = "2 different images" if batch["multi_instance"][i] else "same image"
        return [
            f"{case} | {same}\nview1: {_text(batch['image_id1'][i])}",
            f"view2: {_text(batch['image_id2'][i])}",
        ]
    label = batch["label"][i]
    label = np.array2string(label, precision=0) if np.ndim(label) else str(int(label))
    return [f"{case} | label {label}"]


# The PNG's resolution, and the title's characters per line per column of
# panels (a 2.6 in wide column holds about 36 characters of 8 pt text).
DPI = 100
TITLE_CHARS = 36


def figure(batch: dict, title: str = "") -> Figure:
    """The PNG grid of `batch` as a Figure (see `render`); its layout is computed when drawn."""
    keys = ["view1", "view2"] if "view1" in batch else ["image"]
    rows = len(batch[keys[0]])
    # A bare Figure (no pyplot): no global state, no GUI backend. The
    # constrained layout keeps room for the title above the first row's
    # captions, whatever the number of rows (tight_layout did not).
    fig = Figure(figsize=(2.6 * len(keys), 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, len(keys), squeeze=False)
    for i in range(rows):
        for j, (key, caption) in enumerate(zip(keys, _captions(batch, i), strict=True)):
            axes[i, j].imshow(np.clip(batch[key][i], 0.0, 1.0), interpolation="nearest")
            axes[i, j].set_title(caption, fontsize=7)
            axes[i, j].axis("off")
    if title:
        fig.suptitle(textwrap.fill(title, TITLE_CHARS * len(keys)), fontsize=8)
    return fig


def render(batch: dict, path: str, title: str = "") -> None:
    """Writes `batch` (numpy dict from Data.dataset) as a PNG grid at `path`.

    Args:
      batch: 'view1', 'view2' [b, s, s, 3] (contrastive) or 'image' [b, s, s, 3],
        float in [0, 1], plus the ids and labels Data.dataset returns.
      path: output PNG file.
      title: the figure's title.
    """
    fig = figure(batch, title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)


def main(argv) -> None:
    del argv
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("--config=CONFIG_FILE[:args] is required")
    if flags.FLAGS.rows < 1:
        raise app.UsageError(f"--rows={flags.FLAGS.rows} must be >= 1")
    mode = config.data.mode
    data = pipeline.open_data(config.data, seed=config.seed)
    # The policy the batch is drawn with (resolved once per handle), for the title.
    policy, why = data.augment_policy()
    dataset = data.dataset(
        mode,
        flags.FLAGS.rows,
        start_step=flags.FLAGS.step,
        process_index=0,
        process_count=1,
    )
    batch = next(dataset.as_numpy_iterator())
    title = f"{config.data.source} | {mode} | augment {policy!r} ({why}) | step {flags.FLAGS.step}"
    render(batch, flags.FLAGS.out, title)
    if "multi_instance" in batch:
        logging.info(
            "multi-instance pairs: %d of %d", batch["multi_instance"].sum(), flags.FLAGS.rows
        )
    print(f"augment policy {policy!r} ({why})")
    print(f"wrote {flags.FLAGS.out}: {flags.FLAGS.rows} rows of mode {mode!r}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
