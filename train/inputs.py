"""The input pipeline: dataset choice, held-out split, device-side batching and augmentation.

The whole dataset is put on the devices once, as uint8. A batch is gathered
on device from a per-epoch permutation, converted to float32 and, optionally,
randomly shifted; nothing crosses the host-device boundary during an epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import config_base
from train.data import NUM_CLASSES, Mnist

# Mean and standard deviation of the MNIST training pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclasses.dataclass(frozen=True)
class Splits:
    """Train / validation / test arrays on the host (uint8 images, int32 labels)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def num_train(self) -> int:
        return len(self.train_labels)


def synthetic_mnist(num_train: int, num_test: int, seed: int = 0) -> Mnist:
    """A small deterministic, learnable stand-in for MNIST (for tests).

    Each class is a fixed random blob pattern; an example is its class's
    pattern, randomly shifted by up to 3 pixels, with random contrast and noise.

    Args:
      num_train, num_test: numbers of examples.
      seed: seeds the patterns and the examples.

    Returns:
      An `Mnist` with uint8 (N, 28, 28, 1) images and int32 labels.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    templates = np.zeros((10, 28, 28), np.float32)
    for c in range(10):
        for _ in range(3):
            cy, cx = rng.uniform(7, 21, size=2)
            sigma = rng.uniform(2.0, 4.0)
            templates[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    templates /= templates.max(axis=(1, 2), keepdims=True)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        if n == 0:
            return np.zeros((0, 28, 28, 1), np.uint8), np.zeros((0,), np.int32)
        labels = rng.integers(0, 10, size=n).astype(np.int32)
        shifts = rng.integers(-3, 4, size=(n, 2))
        contrast = rng.uniform(0.6, 1.0, size=(n, 1, 1)).astype(np.float32)
        images = np.stack([
            np.roll(templates[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts)
        ])
        images = images * contrast + rng.normal(0.0, 0.15, size=images.shape)
        images = np.clip(images * 255.0, 0, 255).astype(np.uint8)
        return images[..., None], labels

    train_images, train_labels = make(num_train)
    test_images, test_labels = make(num_test)
    return Mnist(train_images, train_labels, test_images, test_labels, source="synthetic")


def load_dataset(config: Any, *, verbose: bool = True) -> Mnist:
    """Loads the dataset named by ``config.dataset``, truncated to the configured sizes."""
    n_train, n_test = config_base.dataset_sizes(config)
    if config.dataset == "synthetic":
        return synthetic_mnist(n_train, n_test)
    from train.data import load_mnist

    data = load_mnist(config.data_source, data_dir=config.data_dir, verbose=verbose)
    return truncate(data, n_train, n_test)


def truncate(data: Mnist, num_train: int, num_test: int) -> Mnist:
    """Keeps the first `num_train` training and `num_test` test examples."""
    return Mnist(
        data.train_images[:num_train],
        data.train_labels[:num_train],
        data.test_images[:num_test],
        data.test_labels[:num_test],
        source=data.source,
    )


def make_splits(data: Mnist, validation_fraction: float, seed: int) -> Splits:
    """Holds out a random `validation_fraction` of the training set (fixed by `seed`)."""
    n = len(data.train_labels)
    _, n_val = config_base.split_sizes(n, validation_fraction)
    order = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return Splits(
        train_images=np.ascontiguousarray(data.train_images[train]),
        train_labels=np.ascontiguousarray(data.train_labels[train], dtype=np.int32),
        val_images=np.ascontiguousarray(data.train_images[val]),
        val_labels=np.ascontiguousarray(data.train_labels[val], dtype=np.int32),
        test_images=np.ascontiguousarray(data.test_images),
        test_labels=np.ascontiguousarray(data.test_labels, dtype=np.int32),
    )


def check_data(data: Mnist) -> None:
    """Checks shapes and dtypes of an injected dataset.

    Raises:
      ValueError: naming the array and what was expected.
    """
    for name in ("train_images", "test_images"):
        x = getattr(data, name)
        if x.ndim != 4 or x.shape[1:] != (28, 28, 1) or x.dtype != np.uint8:
            raise ValueError(
                f"data.{name} has shape {x.shape} and dtype {x.dtype}; expected uint8 "
                "(N, 28, 28, 1)."
            )
    for name, images in (("train_labels", "train_images"), ("test_labels", "test_images")):
        y = getattr(data, name)
        if y.shape != (len(getattr(data, images)),) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"data.{name} has shape {y.shape} and dtype {y.dtype}; expected integer "
                f"labels of shape ({len(getattr(data, images))},)."
            )
        if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise ValueError(
                f"data.{name} holds labels from {y.min()} to {y.max()}; expected 0..{NUM_CLASSES - 1} "
                "(out-of-range labels would make the loss NaN)."
            )


def to_float(images: jax.Array, scaling: str) -> jax.Array:
    """uint8 images to float32: ``x / 255`` ("unit") or standardized ("standardize")."""
    x = images.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
    if scaling == "standardize":
        x = (x - jnp.float32(MNIST_MEAN)) * jnp.float32(1.0 / MNIST_STD)
    return x


def random_shift(images: jax.Array, key: jax.Array, positions: jax.Array, max_shift: int) -> jax.Array:
    """Shifts each image by a random offset in [-max_shift, max_shift]^2, zero-filled.

    The offset of an example depends only on `key` and its position in the
    epoch's order, so it does not depend on how the batch is split over devices.

    Args:
      images: (b, H, W, C) images.
      key: the epoch's augmentation key.
      positions: (b,) int32 positions of the examples in the epoch order.
      max_shift: largest shift in pixels.
    """
    if max_shift == 0:
        return images
    _, h, w, c = images.shape
    pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
    padded = jnp.pad(images, pad)

    def one(image: jax.Array, pos: jax.Array) -> jax.Array:
        offset = jax.random.randint(jax.random.fold_in(key, pos), (2,), 0, 2 * max_shift + 1)
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(one)(padded, positions)
