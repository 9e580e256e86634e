"""The layer computation shared by the linen and nnx modules (pure functions).

The modules own variables; everything they compute lives here: validation,
training-mode normalization with the optional variants (ghost batches, batch
renormalization, adjustment), the statistics that feed the running averages,
and inference-mode normalization.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _checks, _ops
from jaxbn._running import update_running_stats
from jaxbn._stats import Moments, bound_axis_size, per_count


class Layout(NamedTuple):
    features: tuple[int, ...]
    red: tuple[int, ...]
    fshape: tuple[int, ...]
    sdtype: Any


def layout(x, *, axis, epsilon, momentum, mask, dtype, force_float32) -> Layout:
    """Validates a module call and returns where the features are and the stats dtype."""
    _checks.check_momentum(momentum)
    features, red = _ops.validate(x, None, None, axis, epsilon, mask)
    sdtype = _checks.stats_dtype(dtype if dtype is not None else x.dtype, force_float32=force_float32)
    return Layout(features, red, _checks.feature_shape(x.shape, features), sdtype)


def check_stats_shapes(fshape: tuple[int, ...], **stats: Any) -> None:
    """The stored running statistics (``name=value``, None skipped) have the input's feature shape."""
    for name, value in stats.items():
        if value is not None and tuple(jnp.shape(value)) != tuple(fshape):
            raise ValueError(
                f"`batch_stats/{name}` has shape {tuple(jnp.shape(value))}, but this BatchNorm's input "
                f"has the feature shape {tuple(fshape)} (variables from another model or layer?)."
            )


def check_virtual_batch_size(virtual_batch_size: Any) -> None:
    if virtual_batch_size is not None and (
        not isinstance(virtual_batch_size, numbers.Integral)
        or isinstance(virtual_batch_size, bool)
        or virtual_batch_size <= 0
    ):
        raise ValueError(f"`virtual_batch_size` must be a positive int or None, got {virtual_batch_size!r}.")


def renorm_clip(clipping: Mapping[str, float] | None) -> tuple[float, float, float]:
    """Keras's renorm_clipping dict as (rmax, rmin, dmax); missing keys mean inf, 0, inf."""
    clipping = dict(clipping or {})
    unknown = set(clipping) - {"rmax", "rmin", "dmax"}
    if unknown:
        raise ValueError(
            f"`renorm_clipping` keys must be among 'rmax', 'rmin', 'dmax', got {sorted(unknown)}."
        )
    rmax, rmin, dmax = clipping.get("rmax", math.inf), clipping.get("rmin", 0.0), clipping.get("dmax", math.inf)
    def number(v):
        if np.ndim(v) != 0:
            raise TypeError(f"`renorm_clipping` values must be real numbers, got {clipping}.")
        return float(_checks.real_numbers(v, "renorm_clipping", f"a dict of real numbers (got {clipping})"))

    rmax, rmin, dmax = number(rmax), number(rmin), number(dmax)
    if not (0 <= rmin <= 1 <= rmax) or not dmax >= 0:  # "not >=" also rejects NaN
        raise ValueError(
            f"`renorm_clipping` needs 0 <= rmin <= 1 <= rmax and dmax >= 0, got {clipping}."
        )
    return rmax, rmin, dmax


def infer(x, mean, var, scale, bias, lay: Layout, epsilon, out_dtype):
    """Inference mode: normalize with the given (running) statistics."""
    _checks.check_real_params(x, scale=scale, bias=bias, mean=mean, var=var)
    var = var.astype(_checks.real_dtype(lay.sdtype))
    inv = lax.rsqrt(var + _checks.like(epsilon, var))
    return _ops.apply_affine(x, mean.astype(lay.sdtype), inv, scale, bias, lay.red, out_dtype, lay.sdtype)


class TrainOut(NamedTuple):
    y: jax.Array
    batch: Moments  # statistics that feed the running averages (feature shape)
    renorm_mean: jax.Array | None  # batch mean and std for the renorm moving averages
    renorm_std: jax.Array | None
    # With ghost batches: the average of each ghost's unbiased variance, which
    # unbiased_running_var stores (n/(n-1) of the average needs each ghost's n).
    unbiased_var: jax.Array | None = None


def _ghost_view(x, mask, lay: Layout, virtual_batch_size: int):
    """Reshapes the leading batch axis into (ghosts, virtual_batch_size)."""
    if not lay.red or lay.red[0] != 0:
        raise ValueError("`virtual_batch_size` needs axis 0 to be a batch (reduction) axis.")
    n = x.shape[0]
    if virtual_batch_size <= 0 or n % virtual_batch_size:
        raise ValueError(
            f"`virtual_batch_size`={virtual_batch_size} must be a positive divisor of the "
            f"batch size {n}."
        )
    g = n // virtual_batch_size
    xg = x.reshape((g, virtual_batch_size) + x.shape[1:])
    mg = None
    if mask is not None:
        m = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
        mg = m.reshape(xg.shape)
    features = (0,) + tuple(f + 1 for f in lay.features)
    red = tuple(i for i in range(xg.ndim) if i not in features)
    return xg, mg, features, red, g


def _in_layout(v, lay: Layout):
    """A feature-shaped ``v`` with size-1 axes inserted at x's reduction axes (else ``v``)."""
    if jnp.ndim(v) == len(lay.fshape) and jnp.shape(v) == lay.fshape:
        return jnp.expand_dims(jnp.asarray(v), lay.red)
    return v


def _ghost_reduce(mom: Moments, axis_name, groups) -> tuple[Moments, jax.Array]:
    """Count-weighted average over ghost batches (and devices) of their mean and variance.

    Also returns the average of each ghost's unbiased variance ``n/(n-1) var``
    (what ``unbiased_running_var`` stores: it needs each ghost's own n), in the
    same collective.
    """
    w = mom.count
    unbiased = mom.var * (w / jnp.maximum(w - 1, 1)).astype(mom.var.dtype)
    # One buffer (one collective) in the widest dtype: counts are at least float32.
    wide = _checks.result_dtype(mom.mean, mom.var, w)
    ww = w.astype(wide)
    sums = jnp.stack([jnp.sum(ww * v.astype(wide), 0) for v in (mom.mean, mom.var, unbiased)] + [jnp.sum(ww, 0)])
    if axis_name is not None:
        _checks.check_groups(groups, bound_axis_size(axis_name))
        sums = lax.psum(sums, axis_name, axis_index_groups=groups)
    total = jnp.real(sums[3])
    mean, var, unbiased = (per_count(t, total) for t in sums[:3])
    pooled = Moments(mean.astype(mom.mean.dtype), jnp.real(var).astype(mom.var.dtype), total.astype(w.dtype))
    return pooled, jnp.real(unbiased).astype(mom.var.dtype)


def train(
    x,
    scale,
    bias,
    mask,
    lay: Layout,
    *,
    epsilon: float,
    axis_name: Any,
    axis_index_groups: Any,
    fast_variance: bool,
    out_dtype: Any,
    virtual_batch_size: int | None = None,
    renorm: tuple[jax.Array, jax.Array] | None = None,
    renorm_clipping: Mapping[str, float] | None = None,
    adjustment: tuple[jax.Array, jax.Array] | None = None,
    initializing: bool = False,
) -> TrainOut:
    """Training mode: normalize with batch statistics, with the optional variants.

    Ghost batches (``virtual_batch_size``) normalize each sub-batch of the leading
    axis with its own statistics; the running statistics receive their
    count-weighted average. Under ``axis_name`` ghost batches stay per device
    (that is their purpose); only the averages are pooled.

    Batch renormalization (``renorm=(moving_mean, moving_std)``) applies
    ``xhat * r + d`` with ``r = clip(std_B / moving_std, rmin, rmax)`` and
    ``d = clip((mean_B - moving_mean) / moving_std, -dmax, dmax)`` held under
    ``stop_gradient``. ``adjustment=(a, b)`` then maps the value to ``v * a + b``
    before gamma and beta (Keras's order). ``initializing`` skips the
    single-element check, and the ghost batches when ``virtual_batch_size``
    does not divide the batch (flax initializes with whatever example it is
    given; the output's shape is the same).
    """
    _checks.check_real_params(x, scale=scale, bias=bias)
    if renorm is not None and jnp.iscomplexobj(x):
        raise TypeError(
            f"`renorm=True` needs a real `x`, got {x.dtype}: its correction d = clip((mean - moving_mean) / "
            "moving_std, -dmax, dmax) clips the mean, and complex values have no order."
        )
    xk, mk, red, ghosts = x, mask, lay.red, None
    stat_axis_name, stat_groups = axis_name, axis_index_groups
    if initializing and virtual_batch_size and x.shape[0] % virtual_batch_size:
        virtual_batch_size = None
    if virtual_batch_size is not None:
        xk, mk, _, red, ghosts = _ghost_view(x, mask, lay, virtual_batch_size)
        stat_axis_name = stat_groups = None
    if not initializing:  # init may trace with a single example (flax allows it)
        if ghosts is not None and _ops.static_shape(xk.shape) and math.prod(xk.shape[i] for i in red) == 1:
            raise ValueError(
                f"`virtual_batch_size`={virtual_batch_size} leaves a single element per feature in "
                "each ghost batch: its variance is undefined."
            )
        _ops.check_reducible(xk.shape, red, stat_axis_name)

    plain = renorm is None and adjustment is None
    sd = lay.sdtype
    tile = (lambda v: v) if ghosts is None else (lambda v: jnp.broadcast_to(v, (ghosts,) + v.shape))
    expand = (lambda v: v) if ghosts is None else (lambda v: jnp.expand_dims(v, 0))

    if plain:
        y, mom = _ops.batch_norm_impl(
            xk,
            None if scale is None else tile(scale),
            None if bias is None else tile(bias),
            mk,
            red=red,
            epsilon=epsilon,
            axis_name=stat_axis_name,
            axis_index_groups=stat_groups,
            fast_variance=fast_variance,
            sdtype=sd,
            out_dtype=out_dtype,
        )
    else:
        xhat, mom = _ops.batch_norm_impl(
            xk,
            None,
            None,
            mk,
            red=red,
            epsilon=epsilon,
            axis_name=stat_axis_name,
            axis_index_groups=stat_groups,
            fast_variance=fast_variance,
            sdtype=sd,
            out_dtype=sd,
        )
        a = jnp.ones(mom.var.shape, sd)
        b = jnp.zeros(mom.var.shape, sd)
        if renorm is not None:
            rmax, rmin, dmax = renorm_clip(renorm_clipping)
            moving_mean, moving_std = (expand(v.astype(sd)) for v in renorm)
            std_b = jnp.sqrt(mom.var + _checks.like(epsilon, mom.var))
            a = lax.stop_gradient(jnp.clip(std_b / moving_std, rmin, rmax)).astype(sd)
            b = lax.stop_gradient(jnp.clip((mom.mean - moving_mean) / moving_std, -dmax, dmax)).astype(sd)
        bshape = tuple(xk.shape[i] if i not in red else 1 for i in range(xk.ndim))
        a, b = a.reshape(bshape), b.reshape(bshape)
        if adjustment is not None:
            _check_adjustment(adjustment, x.shape, lay.fshape)
            adj_scale, adj_bias = (_in_layout(v, lay) for v in adjustment)
            if ghosts is not None:
                adj_scale, adj_bias = (
                    jnp.reshape(jnp.broadcast_to(v, x.shape), xk.shape) for v in (adj_scale, adj_bias)
                )
            a = a * jnp.asarray(adj_scale, sd)
            b = b * jnp.asarray(adj_scale, sd) + jnp.asarray(adj_bias, sd)
        if scale is not None:
            s = jnp.expand_dims(expand(scale.astype(sd)), red)
            a, b = a * s, b * s
        if bias is not None:
            b = b + jnp.expand_dims(expand(bias.astype(sd)), red)
        y = (xhat * a + b).astype(out_dtype)

    unbiased_var = None
    if ghosts is not None:
        y = y.reshape(x.shape)
    if mask is not None and (renorm is not None or adjustment is not None):
        # As in batch_norm: outputs over NaN or inf padding are 0 and pass no gradient.
        keep = _ops.finite_or_kept(x, mask)
        y = jnp.where(keep, y, jnp.zeros((), y.dtype))
    if ghosts is not None:
        batch, unbiased_var = _ghost_reduce(mom, axis_name, axis_index_groups)
    else:
        batch = mom
    rmean = rstd = None
    if renorm is not None:
        rmean, rstd = batch.mean, jnp.sqrt(batch.var + _checks.like(epsilon, batch.var))
    return TrainOut(y, batch, rmean, rstd, unbiased_var)


def _check_adjustment(adjustment: Any, shape: tuple[int, ...], fshape: tuple[int, ...]) -> None:
    """The adjustment's ``(a, b)``: each of the feature shape or broadcastable to the input's."""
    if not (isinstance(adjustment, (tuple, list)) and len(adjustment) == 2):
        raise TypeError(f"`adjustment` must return a pair (a, b), got {type(adjustment).__name__}.")
    for name, v in zip("ab", adjustment):
        vshape = tuple(jnp.shape(v))
        try:
            fits = vshape == tuple(fshape) or jnp.broadcast_shapes(vshape, tuple(shape)) == tuple(shape)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"`adjustment` returned `{name}` of shape {vshape}: expected the feature shape "
                f"{tuple(fshape)} or a shape that broadcasts to the input's {tuple(shape)}."
            )


def call_adjustment(adjustment: Callable, shape: tuple[int, ...], rng: jax.Array | None):
    """Calls a tf.keras-style adjustment(shape) or adjustment(shape, rng), as its signature takes them.

    The choice is made from the signature, not by catching a ``TypeError``, so
    that a ``TypeError`` raised inside the user's function reaches the user.
    """
    try:
        sig = inspect.signature(adjustment)
    except (TypeError, ValueError):  # no signature to read (some builtins): pass both
        return adjustment(shape, rng)
    try:
        sig.bind(shape, rng)
    except TypeError:
        return adjustment(shape)
    return adjustment(shape, rng)


class RunningState(NamedTuple):
    mean: jax.Array
    var: jax.Array
    count: jax.Array | None = None
    renorm_mean: jax.Array | None = None
    renorm_std: jax.Array | None = None


def update_running(
    state: RunningState,
    out: TrainOut,
    *,
    momentum: float,
    mode: str,
    unbiased: bool,
    renorm_momentum: float,
) -> RunningState:
    """Folds a training call's statistics into the running state (renorm averages included)."""
    batch = lax.stop_gradient(out.batch)
    if unbiased and out.unbiased_var is not None:
        batch, unbiased = batch._replace(var=lax.stop_gradient(out.unbiased_var)), False
    mean, var, count = update_running_stats(
        state.mean, state.var, batch, momentum=momentum, mode=mode, unbiased=unbiased, count=state.count
    )
    rn_mean, rn_std = state.renorm_mean, state.renorm_std
    if rn_mean is not None:
        seen = batch.count > 0
        m = _checks.like(renorm_momentum, rn_mean)
        # In the averages' own dtype (float32 even for float64 input under x64).
        b_mean = lax.stop_gradient(out.renorm_mean).astype(rn_mean.dtype)
        b_std = lax.stop_gradient(out.renorm_std).astype(rn_std.dtype)
        rn_mean = jnp.where(seen, m * rn_mean + (1 - m) * b_mean, rn_mean)
        rn_std = jnp.where(seen, m * rn_std + (1 - m) * b_std, rn_std)
    return RunningState(mean, var, count, rn_mean, rn_std)
