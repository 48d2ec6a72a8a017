"""What tests of the CPU lowerings (test_conv.py, test_pool.py) read: lowered StableHLO text."""

import jax
import jax.numpy as jnp


def lowered(fn, *args, platforms=("cpu",)) -> str:
    """The StableHLO text of jit(fn)(*args) lowered for `platforms`."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=platforms).as_text()


def resnet_grad_lowerings(model, image_shape, platforms=("cpu", "cuda")) -> dict[str, str]:
    """{platform: the lowered gradient of a training-mode loss of `model` on zero images}."""
    images = jnp.zeros(image_shape)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))

    def loss(params, batch_stats, images):
        out, _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(out**2)

    args = (variables["params"], variables["batch_stats"], images)
    return {p: lowered(jax.grad(loss), *args, platforms=(p,)) for p in platforms}
