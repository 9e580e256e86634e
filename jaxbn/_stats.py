"""Batch statistics: local moments and the count-weighted cross-device merge.

Local statistics are kept as ``(count, mean, M2)`` per feature, where ``M2`` is
the sum of squared deviations from the mean. Devices are merged with Chan et
al.'s pairwise formula, which is exact for unequal counts and never subtracts
two large sums::

    N    = sum_d n_d
    mean = sum_d n_d * mean_d / N
    M2   = sum_d M2_d + sum_d n_d * |mean_d - mean|^2
    var  = M2 / N

The merge needs every device's triple, gathered with a single ``psum`` (each
device writes its triple into its own slot of a zero buffer). That is one
collective per call whatever the axis names or groups, and it works under
``pmap``, ``vmap`` (nested, tuple names), ``shard_map`` alike.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks


class Moments(NamedTuple):
    """Per-feature batch statistics.

    Attributes:
      mean: the batch mean, one value per feature.
      var: the biased batch variance ``M2 / count`` (real, even for complex input).
      count: the number of (unmasked) elements reduced per feature, after any
        cross-device merge; same dtype as ``var``.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def abs_sq(x: jax.Array) -> jax.Array:
    if jnp.iscomplexobj(x):
        return lax.square(lax.real(x)) + lax.square(lax.imag(x))
    return lax.square(x)


def _first_element(x: jax.Array, red: tuple[int, ...]) -> jax.Array:
    """x at index 0 of every reduction axis (keepdims): a cheap shift close to the mean."""
    idx = tuple(slice(0, 1) if i in red else slice(None) for i in range(x.ndim))
    return x[idx]


def _sharded(x: jax.Array, red: tuple[int, ...]) -> bool:
    """True when a reduction axis of x is explicitly sharded (jax's sharding-in-types)."""
    try:
        spec = jax.typeof(x).sharding.spec
    except (AttributeError, TypeError):
        return False
    return any(i < len(spec) and spec[i] is not None for i in red)


def local_moments(
    x: jax.Array,
    red: tuple[int, ...],
    *,
    mask: jax.Array | None,
    fast_variance: bool,
    dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns this device's ``(count, mean, M2)``, reduced over ``red``, in ``dtype``.

    Without a mask the default is a *shifted* one-pass formula: the data are
    shifted by the first element K of each feature, so ``sum(x-K)`` and
    ``sum(|x-K|^2)`` come from one read of x and the cancellation error is
    ``eps * |K-mean|^2 / var`` instead of ``eps * mean^2 / var``. With a mask the
    mean is taken first (two passes) so that no masked value can act as a shift.
    ``fast_variance=True`` is the plain one-pass ``E[x^2] - E[x]^2``.
    """
    x = x.astype(dtype)
    rdtype = _checks.real_dtype(dtype)
    fshape = tuple(d for i, d in enumerate(x.shape) if i not in red)
    size = math.prod(x.shape[i] for i in red)
    if size == 0:
        zeros = jnp.zeros(fshape, rdtype)
        return zeros, jnp.zeros(fshape, dtype), zeros

    if mask is None and not (not fast_variance and _sharded(x, red)):
        n = jnp.full(fshape, size, rdtype)
        shift = jnp.zeros((), dtype) if fast_variance else _first_element(x, red)
        d = x - shift
        s1 = jnp.sum(d, axis=red)
        s2 = jnp.sum(abs_sq(d), axis=red)
        mean_d = s1 / size
        m2 = jnp.maximum(s2 - size * abs_sq(mean_d), 0)
        mean = mean_d + (shift if fast_variance else jnp.squeeze(shift, red))
        return n, mean, m2

    if mask is None:
        mean = jnp.sum(x, axis=red) / size
        m2 = jnp.sum(abs_sq(x - jnp.expand_dims(mean, red)), axis=red)
        return jnp.full(fshape, size, rdtype), mean, m2
    valid = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    n = jnp.sum(valid, axis=red, dtype=rdtype)
    inv_n = jnp.where(n > 0, 1 / jnp.maximum(n, 1), 0).astype(rdtype)
    xs = jnp.where(valid, x, 0)
    mean = jnp.sum(xs, axis=red) * inv_n
    if fast_variance:
        m2 = jnp.maximum(jnp.sum(abs_sq(xs), axis=red) - n * abs_sq(mean), 0)
    else:
        d = jnp.where(valid, x - jnp.expand_dims(mean, red), 0)
        m2 = jnp.sum(abs_sq(d), axis=red)
    return n, mean, m2


def merge_moments(
    n: jax.Array,
    mean: jax.Array,
    m2: jax.Array,
    axis_name: Any,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pools per-device ``(count, mean, M2)`` over ``axis_name`` in one ``psum``."""
    complex_mean = jnp.iscomplexobj(mean)
    parts = [n, lax.real(mean), lax.imag(mean), m2] if complex_mean else [n, mean, m2]
    pack = jnp.stack(parts)
    size = lax.axis_size(axis_name)
    slots = jnp.zeros((size,) + pack.shape, pack.dtype)
    slots = lax.dynamic_update_index_in_dim(slots, pack, lax.axis_index(axis_name), 0)
    allp = lax.psum(slots, axis_name, axis_index_groups=axis_index_groups)
    ns = allp[:, 0]
    means = lax.complex(allp[:, 1], allp[:, 2]) if complex_mean else allp[:, 1]
    m2s = allp[:, -1]
    total = jnp.sum(ns, axis=0)
    inv = jnp.where(total > 0, 1 / jnp.maximum(total, 1), 0).astype(total.dtype)
    pooled_mean = jnp.sum(ns * means, axis=0) * inv
    pooled_m2 = jnp.sum(m2s, axis=0) + jnp.sum(ns * abs_sq(means - pooled_mean), axis=0)
    return total, pooled_mean, pooled_m2


def compute_moments(
    x: jax.Array,
    red: tuple[int, ...],
    *,
    mask: jax.Array | None = None,
    fast_variance: bool = False,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Moments:
    """Kernel behind :func:`moments` (arguments already validated)."""
    dtype = _checks.stats_dtype(x.dtype) if dtype is None else dtype
    n, mean, m2 = local_moments(x, red, mask=mask, fast_variance=fast_variance, dtype=dtype)
    if axis_name is not None:
        n, mean, m2 = merge_moments(n, mean, m2, axis_name, axis_index_groups)
    inv = jnp.where(n > 0, 1 / jnp.maximum(n, 1), 0).astype(n.dtype)
    return Moments(mean, m2 * inv, n)


def moments(
    x: jax.Array,
    axis: _checks.Axes = -1,
    *,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    mask: jax.Array | None = None,
    fast_variance: bool = False,
) -> Moments:
    """Per-feature mean, biased variance and element count of a batch.

    Statistics reduce over every axis of ``x`` except the feature axis or axes
    ``axis``; for conv activations ``(N, H, W, C)`` and ``axis=-1`` each channel
    reduces over ``N*H*W`` elements. Half-precision input accumulates in float32.

    The variance is accurate when ``|mean| >> std``: it is computed from data
    shifted by a value close to the mean (see :func:`local_moments`), not from
    ``E[x^2] - E[x]^2``, unless ``fast_variance=True`` asks for that.

    With ``axis_name`` (one name or a tuple of names; optional
    ``axis_index_groups``), every device's ``(count, mean, M2)`` is merged
    weighted by count in a single collective, so unequal per-device batches and
    masks give exactly the statistics of the pooled global batch.

    Args:
      x: floating-point (or complex) input.
      axis: the feature axis or axes (int or tuple; negative allowed).
      axis_name: mapped axis name(s) to pool statistics over.
      axis_index_groups: groups of device indices pooled separately (``pmap``).
      mask: boolean array broadcastable to ``x``; True marks elements to use.
      fast_variance: use the one-pass ``E[x^2] - E[x]^2`` formula.

    Returns:
      ``Moments(mean, var, count)``, each of the feature shape.
    """
    _checks.check_input(x)
    features = _checks.feature_axes(x.ndim, axis)
    _checks.check_mask(mask, x.shape)
    red = _checks.reduction_axes(x.ndim, features)
    return compute_moments(
        x,
        red,
        mask=mask,
        fast_variance=fast_variance,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )
