"""TensorFlow in a JAX process: kept off the accelerators, once, at first use."""

from __future__ import annotations

import tensorflow as tf
from absl import logging

_tf_on_host = False  # whether keep_tf_on_host has run in this process


def keep_tf_on_host() -> None:
    """Hides every GPU from TensorFlow, once per process, before its first op here.

    TensorFlow only feeds JAX (tf.data, decoding on the host); left alone it
    would take the GPU's memory (big_vision does the same). The entry points
    (main.py, predict.py) call it first, and pipeline.open_data before it opens
    any data; later calls cost nothing. If TensorFlow already
    initialised its devices elsewhere they can no longer change: a warning
    then says whether it holds a GPU.
    """
    global _tf_on_host
    if _tf_on_host:
        return
    _tf_on_host = True
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # Already initialised: the devices are fixed by now.
        if tf.config.get_visible_devices("GPU"):
            logging.warning("TensorFlow was initialised before the input pipeline and holds a GPU")
