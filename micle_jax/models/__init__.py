"""Models chosen by name: a backbone plus SimCLR's heads, built from a config.

Usage (a trainer):

    model = models.build_model(config.model)
    variables = model.init(key, images, train=False)  # {'params', 'batch_stats'}
    out, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
    out['features'], out['projections'], out['logits']  # logits iff num_classes > 0

The model config fields (defaults: config_lib.MODEL_DEFAULTS, SimCLR's values):
  name: backbone family, one of BACKBONES ('resnet').
  depth, width, sk_ratio: the ResNet (see resnet.ResNet).
  cifar_stem: True = SimCLR's CIFAR stem (conv3x3/1, no max-pool), False = the
    ImageNet stem, None = SimCLR's rule (tf2/model.py cifar_stem=image_size <= 32),
    decided from the images the model is initialised and applied on.
  proj_layers, proj_dim: projection head depth and output width (SimCLR v2: 3, 128).
  num_classes: >0 adds the linear head `head` and the `logits` output.
  head_input: which tensor the head reads, SimCLR's ft_proj_selector: 0 = the
    backbone features, k = the output of projection layer k.
  head_stop_gradient: True in pre-training (SimCLR's lineareval_while_pretraining:
    an online linear probe that does not train the backbone), False in fine-tuning.
  fine_tune_after_block: -1 trains all; k >= 0 freezes the stem and block groups
    up to k (resnet.frozen_stages gives their names for the optimizer mask).
  dtype: 'float32' or 'bfloat16' (compute dtype; parameters stay float32).
  bn_momentum, bn_epsilon: BatchNorm decay and epsilon (SimCLR: 0.9, 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from micle_jax import config_lib
from micle_jax.models import resnet
from micle_jax.models.heads import LinearHead, ProjectionHead
from micle_jax.models.resnet import ResNet, frozen_stages

__all__ = [
    "BACKBONES",
    "DTYPES",
    "LinearHead",
    "ProjectionHead",
    "ResNet",
    "SimCLRModel",
    "build_model",
    "count_params",
    "frozen_stages",
    "get_config",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_config(**overrides) -> ml_collections.ConfigDict:
    """A model config with SimCLR's defaults, `overrides` applied (unknown keys: error)."""
    defaults = config_lib.MODEL_DEFAULTS
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown model config fields {unknown}; accepted: {sorted(defaults)}")
    return ml_collections.ConfigDict({**defaults, **overrides})


def _build_resnet(config: ml_collections.ConfigDict, dtype: Any) -> nn.Module:
    if config.depth not in resnet.DEPTHS:
        raise ValueError(
            f"model.depth={config.depth!r} is not supported for name='resnet'; accepted: "
            f"{', '.join(map(str, resnet.DEPTHS))}"
        )
    if not isinstance(config.width, int | float) or int(64 * config.width) < 1:
        raise ValueError(
            f"model.width={config.width!r} must be a positive number with "
            "int(64 * width) >= 1: 1, 2, 3, 4 as SimCLR, or e.g. 0.25 for a tiny CPU model"
        )
    if not isinstance(config.sk_ratio, int | float) or not 0 <= config.sk_ratio < 1:
        raise ValueError(
            f"model.sk_ratio={config.sk_ratio!r} must be in [0, 1): 0 = no selective "
            "kernels, 0.0625 = SimCLR v2's SK"
        )
    if not (config.cifar_stem is None or isinstance(config.cifar_stem, bool)):
        raise ValueError(
            f"model.cifar_stem={config.cifar_stem!r} must be True (SimCLR's CIFAR stem: "
            "conv3x3/1, no max-pool), False (the ImageNet stem) or None (CIFAR stem iff "
            "the images are at most 32 px, as SimCLR)"
        )
    return ResNet(
        depth=config.depth,
        width_multiplier=config.width,
        sk_ratio=config.sk_ratio,
        cifar_stem=config.cifar_stem,
        fine_tune_after_block=config.fine_tune_after_block,
        dtype=dtype,
        bn_momentum=config.bn_momentum,
        bn_epsilon=config.bn_epsilon,
    )


# name -> builder(model config, compute dtype) -> backbone module whose
# __call__(images [B, H, W, C], train) returns features [B, C'] float32.
BACKBONES: dict[str, Callable[[ml_collections.ConfigDict, Any], nn.Module]] = {
    "resnet": _build_resnet,
}


class SimCLRModel(nn.Module):
    """Backbone, projection head and optional linear head, as SimCLR's Model.

    Attributes:
      backbone: images [B, H, W, C], train -> features [B, C'] float32.
      projection_head: a ProjectionHead.
      head: a LinearHead, or None for no logits.
      head_input: index into the projection head's hiddens (SimCLR's
        ft_proj_selector): 0 = backbone features, k = projection layer k.
      head_stop_gradient: stop the head's gradient at its input (pre-training's
        online linear probe) or not (fine-tuning).
    """

    backbone: nn.Module
    projection_head: ProjectionHead
    head: LinearHead | None = None
    head_input: int = 0
    head_stop_gradient: bool = True

    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        """Runs the model.

        Args:
          images: [B, H, W, C] float images.
          train: BatchNorm on batch statistics (pass mutable=['batch_stats'] to
            apply) if True, on running averages if False.

        Returns:
          features: [B, C'] float32, the backbone's pooled output.
          projections: [B, proj_dim] float32, for the contrastive loss.
          logits: [B, num_classes] float32, only when there is a head.
        """
        features = self.backbone(images, train=train)
        projections, hiddens = self.projection_head(features, train=train)
        outputs = {"features": features, "projections": projections}
        if self.head is not None:
            head_input = hiddens[self.head_input]
            if self.head_stop_gradient:
                head_input = jax.lax.stop_gradient(head_input)
            outputs["logits"] = self.head(head_input)
        return outputs


def _check_int(config: ml_collections.ConfigDict, field: str, low: int, high: int | None = None):
    value = config[field]
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not valid or (high is not None and value > high):
        accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"model.{field}={value!r} is not valid; accepted: {accepted}")


def build_model(model_config: ml_collections.ConfigDict) -> SimCLRModel:
    """Builds the model a config describes (fields: see the module docstring).

    Missing fields take SimCLR's defaults (config_lib.MODEL_DEFAULTS); unknown fields and bad
    values raise ValueError naming the field and the accepted values.

    Returns:
      A SimCLRModel with submodules `backbone`, `projection_head` and (when
      num_classes > 0) `head`; variables {'params', 'batch_stats'}.
    """
    unknown = sorted(set(model_config) - set(config_lib.MODEL_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown model config fields {unknown} (misspelled?); "
            f"accepted: {sorted(config_lib.MODEL_DEFAULTS)}"
        )
    config = get_config(**dict(model_config))
    if config.name not in BACKBONES:
        raise ValueError(
            f"model.name={config.name!r} is not registered; accepted: {', '.join(BACKBONES)}"
        )
    if config.dtype not in DTYPES:
        raise ValueError(f"model.dtype={config.dtype!r} is not valid; accepted: {list(DTYPES)}")
    _check_int(config, "proj_layers", 0)
    _check_int(config, "proj_dim", 1)
    _check_int(config, "num_classes", 0)
    _check_int(config, "head_input", 0, config.proj_layers)
    _check_int(config, "fine_tune_after_block", -1, len(resnet.STAGES) - 1)
    if not isinstance(config.head_stop_gradient, bool):
        raise ValueError(
            f"model.head_stop_gradient={config.head_stop_gradient!r} must be True "
            "(pre-training's online linear probe) or False (fine-tuning)"
        )
    if not 0 <= config.bn_momentum < 1:
        raise ValueError(f"model.bn_momentum={config.bn_momentum!r} must be in [0, 1) (SimCLR 0.9)")
    if not config.bn_epsilon > 0:
        raise ValueError(f"model.bn_epsilon={config.bn_epsilon!r} must be > 0 (SimCLR 1e-5)")

    dtype = DTYPES[config.dtype]
    backbone = BACKBONES[config.name](config, dtype)
    projection_head = ProjectionHead(
        num_layers=config.proj_layers,
        out_dim=config.proj_dim,
        dtype=dtype,
        bn_momentum=config.bn_momentum,
        bn_epsilon=config.bn_epsilon,
    )
    head = LinearHead(config.num_classes, dtype=dtype) if config.num_classes > 0 else None
    return SimCLRModel(
        backbone=backbone,
        projection_head=projection_head,
        head=head,
        head_input=config.head_input,
        head_stop_gradient=config.head_stop_gradient,
    )


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or jax.eval_shape's structs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
