"""SimCLR's heads (google-research/simclr, tf2/model.py).

- `ProjectionHead`: SimCLR v2's non-linear projection, whose per-layer outputs
  (`hiddens`) are what fine-tuning can start from (`ft_proj_selector`).
- `LinearHead`: the supervised head, used for the online linear probe during
  pre-training and for fine-tuning / linear evaluation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# SimCLR's LinearLayer: every head's Dense starts at N(0, 0.01^2).
head_kernel_init = nn.initializers.normal(stddev=0.01)


class ProjectionHead(nn.Module):
    """SimCLR v2's projection head: `num_layers` x (Dense, BN[, ReLU]).

    Every layer is Dense then BatchNorm; all but the last add a ReLU. As SimCLR's
    LinearLayer(use_bn=True), no Dense has a bias (BatchNorm's beta makes it
    redundant), and the last BatchNorm has no centre (beta) either, so the
    output is not shifted (SimCLR's `use_bias=False` for the last layer).
    num_layers=0 is SimCLR's proj_head_mode='none': projections are the input.

    Attributes:
      num_layers: number of Dense+BN layers (SimCLR v2: 3).
      out_dim: width of the last layer (SimCLR: 128).
      hidden_dim: width of the other layers; None = the input's width, as SimCLR.
      dtype: compute dtype; parameters are always float32.
      bn_momentum: BatchNorm running-average decay (SimCLR: 0.9).
      bn_epsilon: BatchNorm epsilon (SimCLR: 1e-5).
    """

    num_layers: int = 3
    out_dim: int = 128
    hidden_dim: int | None = None
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, list[jax.Array]]:
        """Projects backbone features.

        Args:
          x: [B, C] features.
          train: BatchNorm on batch statistics if True, running averages if False.

        Returns:
          projections: [B, out_dim] float32 ([B, C] when num_layers == 0).
          hiddens: num_layers + 1 arrays, float32: hiddens[0] is the input and
            hiddens[i] the output of layer i (SimCLR's hiddens_list, indexed by
            ft_proj_selector); hiddens[-1] is the projection.
        """
        if x.ndim != 2:
            raise ValueError(
                f"ProjectionHead expects features [batch, channels], got shape {x.shape}; "
                "pool the spatial axes first"
            )
        if self.num_layers < 0:
            raise ValueError(f"ProjectionHead num_layers={self.num_layers} must be >= 0")
        hidden_dim = self.hidden_dim or x.shape[-1]
        hiddens = [x.astype(jnp.float32)]
        for i in range(1, self.num_layers + 1):
            last = i == self.num_layers
            y = nn.Dense(
                self.out_dim if last else hidden_dim,
                use_bias=False,
                kernel_init=head_kernel_init,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"dense{i}",
            )(hiddens[-1])
            y = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                use_bias=not last,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"bn{i}",
            )(y)
            if not last:
                y = nn.relu(y)
            hiddens.append(y.astype(jnp.float32))
        return hiddens[-1], hiddens


class LinearHead(nn.Module):
    """SimCLR's supervised head: one Dense, kernel N(0, 0.01^2), zero bias.

    Attributes:
      num_classes: number of output logits.
      dtype: compute dtype; parameters are always float32.
    """

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, C] -> logits [B, num_classes] float32."""
        if x.ndim != 2:
            raise ValueError(f"LinearHead expects features [batch, channels], got shape {x.shape}")
        logits = nn.Dense(
            self.num_classes,
            kernel_init=head_kernel_init,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="dense",
        )(x)
        return logits.astype(jnp.float32)
