"""SimCLR's ResNet v1 backbone in Flax (google-research/simclr, tf2/resnet.py).

The layout follows SimCLR's code, not torchvision's, where the two differ:
- the stride of a bottleneck block sits in its 3x3 convolution (ResNet v1.5);
- the first block of every block group has a projection shortcut
  (conv1x1 + BatchNorm), also in block_group1 of ResNet-18/34;
- the last BatchNorm of every residual branch starts with gamma = 0, so each
  block starts as the identity (Goyal et al., as SimCLR);
- strided convolutions pad explicitly ((k-1)//2 before, the rest after), so
  results do not depend on the input size being even;
- convolutions have no bias and use Keras' VarianceScaling() default
  (scale 1, fan-in, truncated normal), as SimCLR;
- with selective kernels (sk_ratio > 0, SimCLR v2) the stem is three 3x3
  convolutions, every bottleneck's 3x3 convolution is a two-stream SK
  convolution and projection shortcuts average-pool before their conv1x1
  (ResNet-D), as SimCLR's code does;
- images of 32 px or less get SimCLR's CIFAR stem (one 3x3 stride-1 conv,
  BN, ReLU, no max-pool, with or without selective kernels), so a 32 px input
  is only downsampled by block groups 2-4 (to 4x4) instead of to 1x1.

BatchNorm is written on the global batch (no axis_name): under `jax.jit` with
the batch sharded over devices, XLA computes the statistics over the whole
batch, which is SimCLR's `global_bn`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from micle_jax.models import conv as conv_lib
from micle_jax.models import pool

# depth: (block type, blocks per group), as SimCLR's resnet() table.
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

# The backbone's stages in order; fine_tune_after_block=k freezes the first k+1.
STAGES = ("stem", "block_group1", "block_group2", "block_group3", "block_group4")

# SimCLR tf2/model.py builds its ResNet with cifar_stem=FLAGS.image_size <= 32.
CIFAR_STEM_MAX_SIZE = 32

# Keras' VarianceScaling() default, SimCLR's kernel initializer for every conv.
conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def frozen_stages(fine_tune_after_block: int) -> tuple[str, ...]:
    """Names of the backbone submodules that `fine_tune_after_block` freezes.

    SimCLR semantics: -1 trains everything, 0 freezes the stem, k in 1..4
    freezes the stem and block groups 1..k. An optimizer mask should leave these
    parameters alone (no update, no weight decay), as SimCLR marks them
    `trainable=False`.
    """
    if fine_tune_after_block not in range(-1, len(STAGES)):
        raise ValueError(
            f"fine_tune_after_block={fine_tune_after_block} is not supported; accepted: "
            "-1 (train all), 0 (freeze the stem) or 1..4 (freeze up to that block group)"
        )
    return STAGES[: fine_tune_after_block + 1]


def uses_cifar_stem(cifar_stem: bool | None, image_shape: tuple[int, ...]) -> bool:
    """Whether a ResNet with this `cifar_stem` setting runs the CIFAR stem.

    Args:
      cifar_stem: True (CIFAR stem), False (ImageNet stem) or None (SimCLR's
        rule: the CIFAR stem iff the images are at most 32 px).
      image_shape: [B, H, W, C] of the images the ResNet is applied to.

    Returns:
      True for the CIFAR stem (conv3x3/1, no max-pool), False for the ImageNet
      one (conv7x7/2 or SK's three 3x3 convs, then max-pool 3x3/2).
    """
    if cifar_stem is None:
        # The input is where the image size is known for certain: the trainers,
        # the evaluators and predict all init and apply at config.data.image_size.
        return max(image_shape[1:3]) <= CIFAR_STEM_MAX_SIZE
    return cifar_stem


class _Layers(nn.Module):
    """Shared attributes and the conv / BatchNorm factories of every ResNet part."""

    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def conv(self, features: int, kernel: int, strides: int = 1, name: str | None = None):
        # SimCLR's Conv2dFixedPadding: explicit (k-1)//2 / rest padding.
        pad = ((kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2)
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(strides, strides),
            padding=(pad, pad),
            use_bias=False,
            kernel_init=conv_kernel_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            conv_general_dilated=conv_lib.conv_general_dilated,  # patch matmuls on the CPU
            name=name,
        )

    def norm(self, train: bool, zero_init: bool = False, name: str | None = None):
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )


class SelectiveKernelConv(_Layers):
    """SimCLR v2's two-stream selective-kernel 3x3 convolution (arXiv 1903.06586).

    One 3x3 conv makes two streams of `features` channels; a squeeze (global
    pool, conv1x1 to max(features * sk_ratio, 32), BN, ReLU, conv1x1) gives
    per-channel softmax weights over the two streams.
    """

    features: int = 64
    strides: int = 1
    sk_ratio: float = 0.0625
    min_dim: int = 32  # SimCLR's SK_Conv2D default

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: [B, H, W, C] -> [B, H/strides, W/strides, features]."""
        x = self.conv(2 * self.features, 3, self.strides, name="conv")(x)
        x = nn.relu(self.norm(train, name="bn")(x))
        streams = jnp.stack(jnp.split(x, 2, axis=-1))  # [2, B, H, W, features]
        squeezed = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2), keepdims=True)
        mid_dim = max(int(self.features * self.sk_ratio), self.min_dim)
        squeezed = self.conv(mid_dim, 1, name="squeeze_conv")(squeezed)
        squeezed = nn.relu(self.norm(train, name="squeeze_bn")(squeezed))
        mixing = self.conv(2 * self.features, 1, name="mixing_conv")(squeezed)
        mixing = nn.softmax(jnp.stack(jnp.split(mixing, 2, axis=-1)), axis=0)
        return jnp.sum(streams * mixing, axis=0)


class _Block(_Layers):
    """Common part of the two residual blocks: the shortcut."""

    features: int = 64  # width of the block's 3x3 convolutions
    strides: int = 1
    use_projection: bool = False
    sk_ratio: float = 0.0

    def shortcut(self, x: jax.Array, out_features: int, train: bool) -> jax.Array:
        if not self.use_projection:
            return x
        if self.sk_ratio > 0:
            # ResNet-D (arXiv 1812.01187): average-pool, then a stride-1 conv1x1.
            if self.strides > 1:
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
                x = nn.avg_pool(x, (2, 2), strides=(self.strides,) * 2, padding="VALID")
            else:
                # TF's SAME average pool divides by the number of real pixels.
                x = nn.avg_pool(x, (2, 2), padding="SAME", count_include_pad=False)
            x = self.conv(out_features, 1, name="proj_conv")(x)
        else:
            x = self.conv(out_features, 1, self.strides, name="proj_conv")(x)
        return self.norm(train, name="proj_bn")(x)


class BasicBlock(_Block):
    """ResNet-18/34 block: conv3x3(stride) BN ReLU, conv3x3 BN(gamma=0), add, ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: [B, H, W, C] -> [B, H/strides, W/strides, features]."""
        shortcut = self.shortcut(x, self.features, train)
        y = self.conv(self.features, 3, self.strides, name="conv1")(x)
        y = nn.relu(self.norm(train, name="bn1")(y))
        y = self.conv(self.features, 3, name="conv2")(y)
        y = self.norm(train, zero_init=True, name="bn2")(y)
        return nn.relu(y + shortcut)


class BottleneckBlock(_Block):
    """ResNet-50+ block: conv1x1, conv3x3(stride) or SK conv, conv1x1 to 4x width."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: [B, H, W, C] -> [B, H/strides, W/strides, 4 * features]."""
        shortcut = self.shortcut(x, 4 * self.features, train)
        y = self.conv(self.features, 1, name="conv1")(x)
        y = nn.relu(self.norm(train, name="bn1")(y))
        if self.sk_ratio > 0:
            y = SelectiveKernelConv(
                dtype=self.dtype,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                features=self.features,
                strides=self.strides,
                sk_ratio=self.sk_ratio,
                name="sk_conv",
            )(y, train)
        else:
            y = self.conv(self.features, 3, self.strides, name="conv2")(y)
            y = nn.relu(self.norm(train, name="bn2")(y))
        y = self.conv(4 * self.features, 1, name="conv3")(y)
        y = self.norm(train, zero_init=True, name="bn3")(y)
        return nn.relu(y + shortcut)


class Stem(_Layers):
    """conv7x7/2 (or three 3x3 convs with SK), BN, ReLU, max-pool 3x3/2.

    With `cifar` (SimCLR's cifar_stem): conv3x3/1, BN, ReLU and no max-pool,
    whatever sk_ratio, as SimCLR tf2/resnet.py.
    """

    features: int = 64
    sk_ratio: float = 0.0
    cifar: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: [B, H, W, 3] -> [B, H/4, W/4, features] ([B, H, W, features] if cifar)."""
        if self.cifar:
            x = self.conv(self.features, 3, name="conv1")(x)
            return nn.relu(self.norm(train, name="bn1")(x))
        if self.sk_ratio > 0:
            # SimCLR v2 (ResNet-D): 3x3/2 and 3x3 at half width, then 3x3.
            x = self.conv(self.features // 2, 3, 2, name="conv1")(x)
            x = nn.relu(self.norm(train, name="bn1")(x))
            x = self.conv(self.features // 2, 3, name="conv2")(x)
            x = nn.relu(self.norm(train, name="bn2")(x))
            x = self.conv(self.features, 3, name="conv3")(x)
            x = nn.relu(self.norm(train, name="bn3")(x))
        else:
            x = self.conv(self.features, 7, 2, name="conv1")(x)
            x = nn.relu(self.norm(train, name="bn1")(x))
        return pool.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")


class BlockGroup(_Layers):
    """`num_blocks` blocks; the first one strides and has the projection shortcut."""

    block: str = "bottleneck"
    features: int = 64
    num_blocks: int = 1
    strides: int = 1
    sk_ratio: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: [B, H, W, C] -> [B, H/strides, W/strides, features (x4 for bottleneck)]."""
        block_cls = BottleneckBlock if self.block == "bottleneck" else BasicBlock
        for i in range(self.num_blocks):
            x = block_cls(
                dtype=self.dtype,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                features=self.features,
                strides=self.strides if i == 0 else 1,
                use_projection=i == 0,
                sk_ratio=self.sk_ratio,
                name=f"block{i + 1}",
            )(x, train)
        return x


class ResNet(nn.Module):
    """SimCLR's ResNet v1 backbone: images -> globally average-pooled features.

    Attributes:
      depth: 18, 34 (basic blocks) or 50, 101, 152, 200 (bottleneck blocks).
      width_multiplier: channel multiplier; the stem has int(64 * width)
        channels. SimCLR uses 1..4; a float such as 0.25 makes tiny CPU models.
      sk_ratio: selective-kernel squeeze ratio; 0 = plain ResNet, SimCLR v2
        uses 0.0625.
      cifar_stem: True for SimCLR's CIFAR stem (conv3x3/1, no max-pool), False
        for the ImageNet stem, None (default) for SimCLR's rule: CIFAR stem iff
        the input images are at most 32 px (see `uses_cifar_stem`).
      fine_tune_after_block: -1 trains everything; k >= 0 puts a stop_gradient
        after stage k (0 = stem, 1..4 = block groups) and runs the frozen
        stages' BatchNorm on running averages, as SimCLR's fine-tuning.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters are always float32.
      bn_momentum: BatchNorm running-average decay (SimCLR's batch_norm_decay 0.9).
      bn_epsilon: BatchNorm epsilon (SimCLR's BATCH_NORM_EPSILON 1e-5).
    """

    depth: int = 50
    width_multiplier: float = 1
    sk_ratio: float = 0.0
    cifar_stem: bool | None = None
    fine_tune_after_block: int = -1
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def _check(self, images: jax.Array) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(
                f"ResNet depth={self.depth} is not supported; accepted: "
                f"{', '.join(map(str, DEPTHS))}"
            )
        if not int(64 * self.width_multiplier) // (2 if self.sk_ratio > 0 else 1) >= 1:
            raise ValueError(
                f"ResNet width_multiplier={self.width_multiplier} leaves no channels; "
                "use a value with int(64 * width) >= 1 (>= 2 with sk_ratio > 0)"
            )
        if not 0 <= self.sk_ratio < 1:
            raise ValueError(
                f"ResNet sk_ratio={self.sk_ratio} must be in [0, 1); 0 = no selective "
                "kernels, SimCLR v2 uses 0.0625"
            )
        if not (self.cifar_stem is None or isinstance(self.cifar_stem, bool)):
            raise ValueError(
                f"ResNet cifar_stem={self.cifar_stem!r} must be True (CIFAR stem), False "
                "(ImageNet stem) or None (CIFAR stem iff images are at most 32 px)"
            )
        frozen_stages(self.fine_tune_after_block)  # validates
        if images.ndim != 4:
            raise ValueError(
                f"ResNet expects images [batch, height, width, channels], got shape "
                f"{images.shape}; add the missing batch axis or merge the extra ones"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f"ResNet expects float images, got {images.dtype}; convert them with "
                "images.astype(jnp.float32) / 255 (or use the data pipeline's output)"
            )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        """Runs the backbone.

        Args:
          images: [B, H, W, C] float images.
          train: batch statistics (and their running averages updated) if True;
            running averages if False.

        Returns:
          features: [B, int(64 * width) * (8 basic, 32 bottleneck)] float32.
        """
        self._check(images)
        block, num_blocks = DEPTHS[self.depth]
        base = int(64 * self.width_multiplier)
        layers = functools.partial(
            dict, dtype=self.dtype, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon
        )
        cifar = uses_cifar_stem(self.cifar_stem, images.shape)
        if self.is_initializing():  # once per model build, not on every trace
            logging.info(
                "ResNet-%d stem for %dx%d images: %s",
                self.depth,
                images.shape[1],
                images.shape[2],
                "CIFAR (conv3x3/1, no max-pool)"
                if cifar
                else "ImageNet (stride 2, max-pool 3x3/2)",
            )
        stem = Stem(**layers(features=base, sk_ratio=self.sk_ratio, cifar=cifar), name=STAGES[0])
        stages = [stem]
        for i, blocks in enumerate(num_blocks):
            stages.append(
                BlockGroup(
                    **layers(
                        block=block,
                        features=base * 2**i,
                        num_blocks=blocks,
                        strides=1 if i == 0 else 2,
                        sk_ratio=self.sk_ratio,
                    ),
                    name=STAGES[i + 1],
                )
            )
        x = images.astype(self.dtype)
        for i, stage in enumerate(stages):
            frozen = i <= self.fine_tune_after_block
            x = stage(x, train=train and not frozen)
            if i == self.fine_tune_after_block:
                x = jax.lax.stop_gradient(x)
        # Pool in float32: a bf16 mean over 49+ positions loses precision.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
