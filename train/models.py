"""LeNet and MLP for MNIST, with a selectable normalization layer.

The normalization sits between each hidden conv/dense layer and its activation
(the placement of the original batch-norm paper). ``norm="jaxbn"`` uses
``jaxbn.BatchNorm``, ``"flax"`` uses ``flax.linen.BatchNorm`` (same variables,
so the two can be compared in the same loop), ``"none"`` leaves it out. Layers
followed by batch norm carry no bias: the norm's shift replaces it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxbn
from train import config_base

NUM_CLASSES = 10

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": nn.sigmoid,
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
}

KERNEL_INITS: dict[str, Callable[..., Any]] = {
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "lecun_normal": nn.initializers.lecun_normal(),
    "he_normal": nn.initializers.he_normal(),
}


def norm_layer(
    norm: str,
    *,
    train: bool,
    momentum: float,
    epsilon: float,
    axis_name: str | None,
    name: str,
) -> nn.Module | None:
    """Returns the normalization module named by `norm`, or None for "none".

    Args:
      norm: "jaxbn", "flax" or "none".
      train: normalize with batch statistics (and update the running ones);
        otherwise use the running statistics.
      momentum: running-average momentum (new = momentum * old + (1 - momentum)
        * batch).
      epsilon: added to the variance.
      axis_name: mapped axis over which batch statistics are pooled (data
        parallel), or None.
      name: the module name.

    Raises:
      ValueError: for an unknown `norm`.
    """
    kwargs = dict(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        axis_name=axis_name,
        name=name,
    )
    if norm == "jaxbn":
        return jaxbn.BatchNorm(**kwargs)
    if norm == "flax":
        return nn.BatchNorm(**kwargs)
    if norm == "none":
        return None
    raise ValueError(f"norm={norm!r}: expected 'jaxbn', 'flax' or 'none'.")


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 (VALID: an odd last row/column is dropped).

    The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, computed as a
    max over a reshape. The windows do not overlap, so the reshape is free and
    the gradient is elementwise (``dy * (x == max) / ties``), where
    ``nn.max_pool``'s reduce-window gradient becomes an argmax reduce-window
    over index arrays and a scatter: the lenet_bn training step on CPU spent
    about 2 ms of 7 in it (BENCHMARKS.md). Where a window holds tied maxima
    the gradient is shared equally among them (``nn.max_pool`` routes it all
    to one); both are subgradients of the max.
    """
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2]
    return x.reshape((n, h2, 2, w2, 2, c)).max(axis=(2, 4))


class _Block(nn.Module):
    """Shared options of the hidden layers: norm, activation, init."""

    norm: str = "jaxbn"
    activation: str = "sigmoid"
    kernel_init: str = "glorot_uniform"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    axis_name: str | None = None

    def _post(self, x: jax.Array, train: bool, name: str) -> jax.Array:
        layer = norm_layer(
            self.norm,
            train=train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            axis_name=self.axis_name,
            name=name,
        )
        if layer is not None:
            x = layer(x)
        return ACTIVATIONS[self.activation](x)

    def _dense_stack(self, x: jax.Array, features: Sequence[int], train: bool) -> jax.Array:
        init = KERNEL_INITS[self.kernel_init]
        for i, width in enumerate(features):
            x = nn.Dense(width, use_bias=self.norm == "none", kernel_init=init,
                         name=f"dense{i}")(x)
            x = self._post(x, train, f"bn_dense{i}")
        return nn.Dense(NUM_CLASSES, kernel_init=init, name="logits")(x)


class LeNet(_Block):
    """LeNet: [conv -> norm -> activation -> 2x2 max-pool] blocks, then dense layers.

    The defaults are the classic recipe: Conv(6, 5x5) and Conv(16, 5x5) with
    VALID padding, Dense 120 and 84, sigmoid, 10 logits.

    Attributes:
      conv_features: channels of each conv block.
      conv_kernel: square kernel size.
      conv_padding: "VALID" or "SAME".
      dense_features: widths of the hidden dense layers.
    """

    conv_features: Sequence[int] = (6, 16)
    conv_kernel: int = 5
    conv_padding: str = "VALID"
    dense_features: Sequence[int] = (120, 84)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps images (N, 28, 28, 1) to logits (N, 10)."""
        init = KERNEL_INITS[self.kernel_init]
        k = self.conv_kernel
        for i, channels in enumerate(self.conv_features):
            x = nn.Conv(channels, (k, k), padding=self.conv_padding,
                        use_bias=self.norm == "none", kernel_init=init, name=f"conv{i}")(x)
            x = max_pool_2x2(self._post(x, train, f"bn_conv{i}"))
        x = x.reshape((x.shape[0], -1))
        return self._dense_stack(x, self.dense_features, train)


class MLP(_Block):
    """Multi-layer perceptron on flattened images: [dense -> norm -> activation]*, logits.

    Attributes:
      dense_features: widths of the hidden layers (784 -> 32 -> 32 -> 10 by default).
    """

    dense_features: Sequence[int] = (32, 32)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps images (N, 28, 28, 1) to logits (N, 10)."""
        x = x.reshape((x.shape[0], -1))
        return self._dense_stack(x, self.dense_features, train)


def largest_activation(config: Any, batch: int) -> int:
    """Elements of the largest activation (a conv/dense output) of the model for `batch` examples."""
    sizes = [batch * 28 * 28, *(batch * w for w in config.dense_features)]
    if config.model == "lenet":
        sides = config_base.lenet_conv_sides(config)
        sizes += [batch * s * s * c for s, c in zip(sides, config.conv_features)]
    return max(sizes)


def create_model(config: Any, axis_name: str | None = None) -> nn.Module:
    """Builds the model described by `config`.

    Args:
      config: an experiment config (see train.config_base).
      axis_name: the mapped axis the batch statistics are synced over, or None.

    Returns:
      A LeNet or MLP; call it as ``model.apply(variables, images, train=...)``.
    """
    common = dict(
        norm=config.norm,
        activation=config.activation,
        kernel_init=config.kernel_init,
        bn_momentum=config.bn_momentum,
        bn_epsilon=config.bn_epsilon,
        axis_name=axis_name,
        dense_features=tuple(config.dense_features),
    )
    if config.model == "lenet":
        return LeNet(
            conv_features=tuple(config.conv_features),
            conv_kernel=config.conv_kernel,
            conv_padding=config.conv_padding,
            **common,
        )
    if config.model == "mlp":
        return MLP(**common)
    raise ValueError(f"config.model={config.model!r}: expected 'lenet' or 'mlp'.")
