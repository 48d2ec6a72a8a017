"""The model's outputs over an eval dataset, on the training mesh (`Predictor`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from micle_jax import sharding
from micle_jax.models import conv


def _gather_strings(values: np.ndarray) -> np.ndarray:
    """All processes' [n_p] strings, concatenated in process order."""
    encoded = [str(v.decode() if isinstance(v, bytes) else v).encode() for v in values]
    width = max([len(e) for e in encoded] + [1])
    width = int(np.max(multihost_utils.process_allgather(np.array([width]))))
    codes = np.zeros((len(encoded), width), np.uint8)
    for i, e in enumerate(encoded):
        codes[i, : len(e)] = np.frombuffer(e, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(codes, tiled=True))
    return np.array([bytes(row).rstrip(b"\0").decode() for row in gathered], dtype=object)


class Predictor:
    """Runs the model over an eval dataset on the training mesh; gathers the outputs.

    One jitted forward pass per batch (BatchNorm on running averages), the
    batch sharded over the data axis as in training. Outputs are taken back
    to each process's own rows, joined with the host-side fields (labels,
    case and image ids), gathered across processes, and the padding rows
    (mask 0) dropped, so every process returns every real image exactly once.
    """

    def __init__(self, model, mesh: Mesh):
        self.mesh = mesh

        def forward(variables, images):
            return model.apply(variables, images, train=False)

        self._forward = jax.jit(
            forward,
            out_shardings=sharding.batch_sharding(mesh),
            compiler_options=conv.compiler_options(),
        )

    def predict(
        self, variables: Mapping, batches: Iterable[Mapping[str, np.ndarray]], outputs: Sequence
    ) -> dict[str, np.ndarray]:
        """Model outputs and host fields for every real image.

        Args:
          variables: {'params', 'batch_stats'} of the model.
          batches: host batches of the pipeline's 'eval' mode: 'image'
            [b, s, s, 3], 'mask' [b], 'label', optional 'label_mask',
            'case_id', 'image_id'.
          outputs: model outputs to keep, e.g. ('logits',) or ('features',).

        Returns:
          {output: [n, ...] float32, 'label', 'label_mask' (if present),
           'case_id', 'image_id': [n] str} for the n real (mask 1) images.
        """
        local: dict[str, list] = {}
        for batch in batches:
            images = sharding.host_to_global({"image": batch["image"]}, self.mesh)["image"]
            out = self._forward(dict(variables), images)
            missing = [k for k in outputs if k not in out]
            if missing:
                raise ValueError(
                    f"the model has no output {missing} (available: {sorted(out)}); a "
                    "classification eval needs a model with a head (num_classes > 0)"
                )
            host = multihost_utils.global_array_to_host_local_array(
                {k: out[k] for k in outputs}, self.mesh, P(sharding.DATA_AXIS)
            )
            for key in outputs:
                local.setdefault(key, []).append(np.asarray(host[key]))
            for key in ("mask", "label", "label_mask", "case_id", "image_id"):
                if key in batch:
                    local.setdefault(key, []).append(np.asarray(batch[key]))
        if "mask" not in local:
            raise ValueError("the evaluation data is empty: it yielded no batch")
        result = {k: np.concatenate(v, axis=0) for k, v in local.items()}
        if jax.process_count() > 1:
            for key, value in list(result.items()):
                if value.dtype.kind in "OSU":
                    result[key] = _gather_strings(value)
                else:
                    result[key] = np.asarray(multihost_utils.process_allgather(value, tiled=True))
        keep = result.pop("mask") > 0
        result = {k: v[keep] for k, v in result.items()}
        for key in ("case_id", "image_id"):
            if key in result:
                result[key] = np.array(
                    [v.decode() if isinstance(v, bytes) else str(v) for v in result[key]],
                    dtype=object,
                )
        return result
