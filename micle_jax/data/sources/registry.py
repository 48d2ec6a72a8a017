"""The source of images named by `data.source`:

  'synthetic[:num_cases=256,num_classes=10,image_size=64,max_images_per_case=3]'
      generated in memory: class-dependent colour, stripes and a disk, plus
      noise; 1..max images per case so MICLe runs without any data.
      ',multilabel=True' gives multilabel targets (for multilabel smoke runs).
  'records:PATH'          the case records of micle_jax.data.records.
  'tfds:NAME[?data_dir=DIR]'  a prepared TFDS dataset, one image per case.
  'arrays:PATH.npz'       MedMNIST-style {split}_images / {split}_labels.
  or a Source object, e.g. `in_memory.from_arrays(images, labels, case_ids)`.

The first and the last are in memory (in_memory.py), records and TFDS are
streamed (streamed.py); interface.py is what they all provide. Every call
opens the source anew: a run opens its data once (pipeline.open_data) and
passes the handle down.
"""

from __future__ import annotations

from micle_jax import config_lib
from micle_jax.data.sources import in_memory, interface, streamed


def get_source(spec) -> interface.Source:
    """The Source named by `spec` (a string as in this module's docstring) or `spec` itself."""
    if isinstance(spec, interface.Source):
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"data.source must be a string or a Source (sources/interface.py), got {type(spec)}"
        )
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return in_memory.from_synthetic(arg)
    if kind in ("records", "tfds") and arg:
        if kind == "records":
            return streamed.RecordsSource(arg)
        name, _, query = arg.partition("?")
        options = config_lib.parse_arg(query.replace("&", ","), data_dir="")
        return streamed.TfdsSource(name, options.data_dir or None)
    if kind == "arrays" and arg:
        return in_memory.from_npz(arg)
    raise ValueError(
        f"data.source={spec!r} is not understood; use one of 'synthetic[:key=value,...]', "
        "'records:PATH', 'tfds:NAME[?data_dir=DIR]', 'arrays:PATH.npz'"
    )
