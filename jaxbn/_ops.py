"""normalize (inference) and batch_norm (training, custom VJP with the hand-derived backward).

Notation, per feature, over the m elements reduced (pooled across devices under
``axis_name``; masked-out elements excluded)::

    mu = sum(x) / m,  var = sum((x - mu)^2) / m,  s = 1 / sqrt(var + eps)
    xhat = (x - mu) * s,  y = gamma * xhat + beta

Backward, with dy the cotangent of y and (g_mu, g_var) those of the returned
statistics::

    dbeta  = sum(dy)                 dgamma = sum(dy * xhat)
    dxhat  = dy * gamma
    dvar   = sum(dxhat * (x - mu)) * -s^3 / 2 + g_var
    dmean  = -s * sum(dxhat) + g_mu                       # sum(x - mu) = 0
    dx     = dxhat * s + dvar * 2 (x - mu) / m + dmean / m

which simplifies to::

    dx = gamma*s * (dy - sum(dy)/m - xhat * sum(dy*xhat)/m) + g_mu/m + 2 g_var (x - mu)/m

Only two reductions over the batch remain (sum(dy) and sum(dy*xhat), which are
also dbeta and dgamma); under ``axis_name`` they are summed across devices in
one ``psum``, together with their products by each device's gamma, which the
sums in dx take when gamma differs between devices. With a mask, m counts the
unmasked elements and the (mu, var) terms of dx vanish at masked positions,
while the two sums run over every output (masked ones are normalized too).
dgamma and dbeta stay per-device, like the gradient of any replicated
parameter. The custom VJP computes the dy terms; the g_mu and g_var
terms come from ``_stat_links``, a tangent map on the returned statistics
that JAX transposes, so that their cotangents are pooled across devices as JAX
pools any collective's (under ``vmap`` they arrive once for all devices, under
``pmap`` once per device). Statistics that are not differentiated (the modules
stop their gradient) cost nothing there.

Memory traffic (the kernels are memory-bound). A training step reads x for the
statistics, reads x and writes y, reads dy and x for the backward reductions,
and reads dy and x again to write dx: 8 tensor-sized reads and writes. The
compiled program makes these kernels and no full-size temporary. On CPU, for
inputs of up to ``jaxbn._stats.PAIRED_MAX_SIZE`` elements, each pair of sums
is one kernel (``jaxbn._stats.paired_sums``), which gives the 8; the
statistics of larger float32 inputs take XLA:CPU's two YNNPACK reductions
(9 passes; see ``paired_sums`` for why), and other platforms take each sum
separately (GPU reductions fuse their elementwise operand). Only x and
per-feature vectors are kept for the backward.
Half-precision x and dy are read as they are and cast to float32 inside the
reductions: the run-time checks below take them uncast (XLA materializes a
conditional's operands, so cast ones were full-size float32 copies), and on
CPU their sums take the blocked kernel at any size where its row blocks tile
the input's W runs (above 2M elements, every run) (YNNPACK's reductions read a materialized cast). So do
masked sums, whose selects YNNPACK would read materialized too; the mask is
read inside the same kernels (the statistics' count with their sums), so a
masked fwd+bwd runs the same 4 full-size kernels as an unmasked one.

On CPU the reductions avoid broadcast operands, which halve XLA:CPU's
reduction speed: the statistics come from the plain sums of x and |x|^2, and
sum(dy*(x-mu)) from sum(dy*x) - mu*sum(dy), both only while every feature has
``|mu|^2 <= 8 (var + eps)`` (``jaxbn._stats.WELL_CONDITIONED``), where they are
as accurate as the centered forms; otherwise a ``lax.cond`` computes the
centered sums, so accuracy never depends on the offset of the data. Other
platforms (``lax.platform_dependent``) always use the shifted and centered sums,
which fuse there at no extra cost and need no data-dependent branch (a GPU
conditional would wait for the device). Reductions see the input
through ``jaxbn._stats.View`` (a free reshape to a matrix with rows at least 64
wide), which makes them several times faster over few channels; elementwise
work keeps the input's layout.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _checks, _stats
from jaxbn._stats import (
    WELL_CONDITIONED,
    Moments,
    abs_sq,
    compute_moments,
    paired_sums,
    per_count,
    static_shape,
    view,
)


def _expand(v: jax.Array | None, red: tuple[int, ...]) -> jax.Array | None:
    return None if v is None else jnp.expand_dims(v, red)


def apply_affine(x, mean, inv, scale, bias, red, out_dtype, sdtype):
    """y = (x - mean) * inv * scale + bias computed in ``sdtype``, returned in ``out_dtype``.

    Elementwise work stays in the input's own layout: per-feature vectors
    broadcast along trailing axes fuse into neighbouring elementwise ops (an
    activation, say) as cheaply as a bias. Only reductions use the 2-D View.
    """
    inv = inv.astype(sdtype)  # complex for complex x (strict dtype promotion mixes no kinds)
    mul = inv if scale is None else inv * scale.astype(sdtype)
    y = (x.astype(sdtype) - _expand(mean, red)) * _expand(mul, red)
    if bias is not None:
        y = y + _expand(bias.astype(sdtype), red)
    return y.astype(out_dtype)


def validate(x, scale, bias, axis, epsilon, mask):
    _checks.check_input(x)
    features = _checks.feature_axes(x.ndim, axis)
    fshape = _checks.feature_shape(x.shape, features)
    _checks.check_param(scale, fshape, name="scale")
    _checks.check_param(bias, fshape, name="bias")
    _checks.check_real_params(x, scale=scale, bias=bias)
    _checks.check_epsilon(epsilon)
    _checks.check_mask(mask, x.shape)
    return features, _checks.reduction_axes(x.ndim, features)


def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: _checks.Axes = -1,
    epsilon: float = 1e-5,
) -> jax.Array:
    """Normalizes ``x`` with given statistics: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    This is batch norm's inference transform (running statistics). Arithmetic is
    done in at least float32; the result has the standard promotion of ``x``,
    ``scale`` and ``bias`` (as flax.linen.BatchNorm).

    Args:
      x: input array.
      mean, var: per-feature statistics of the feature shape.
      scale, bias: optional per-feature gamma and beta.
      axis: the feature axis or axes.
      epsilon: added to the variance; must be > 0.
    """
    features, red = validate(x, scale, bias, axis, epsilon, None)
    fshape = _checks.feature_shape(x.shape, features)
    _checks.check_param(mean, fshape, name="mean", required=True)
    _checks.check_param(var, fshape, name="var", required=True)
    _checks.check_real_params(x, mean=mean, var=var)
    sdtype = _checks.stats_dtype(x.dtype)
    var = jnp.asarray(var).astype(_checks.real_dtype(sdtype))
    inv = lax.rsqrt(var + _checks.like(epsilon, var))
    mean = jnp.asarray(mean).astype(sdtype)
    out = _checks.result_dtype(x, scale, bias)
    return apply_affine(x, mean, inv, scale, bias, red, out, sdtype)


def check_reducible(shape: tuple[int, ...], red: tuple[int, ...], axis_name: Any) -> None:
    """Training mode needs more than one element per feature (on one device)."""
    if axis_name is None and static_shape(shape) and math.prod(shape[i] for i in red) == 1:
        raise ValueError(
            f"batch_norm in training mode reduces over a single element per feature "
            f"(input shape {tuple(shape)}, reduction axes {red}): the batch variance is "
            f"undefined. Use a larger batch, or normalize with running statistics."
        )


class _Config(NamedTuple):
    red: tuple[int, ...]
    epsilon: float
    axis_name: Any
    axis_index_groups: Any
    fast_variance: bool
    sdtype: Any
    out_dtype: Any


def _forward(cfg: _Config, x, scale, bias, mask):
    mom = compute_moments(
        x,
        cfg.red,
        mask=mask,
        fast_variance=cfg.fast_variance,
        axis_name=cfg.axis_name,
        axis_index_groups=cfg.axis_index_groups,
        dtype=cfg.sdtype,
    )
    inv = lax.rsqrt(mom.var + cfg.epsilon)
    if mask is None:
        y = apply_affine(x, mom.mean, inv, scale, bias, cfg.red, cfg.out_dtype, cfg.sdtype)
    else:
        # Masked-out positions are normalized like the others (as in flax), except
        # over NaN or inf padding, whose outputs are 0. (y also depends on the mask,
        # so that under vmap it is batched whenever the mask is: each member then
        # receives its own cotangent.)
        keep = finite_or_kept(x, mask)
        y = apply_affine(jnp.where(keep, x, 0), mom.mean, inv, scale, bias, cfg.red, cfg.out_dtype, cfg.sdtype)
        y = jnp.where(keep, y, jnp.zeros((), y.dtype))
    return y, mom, inv


def finite_or_kept(x, mask):
    """Positions whose output is normalized: unmasked, or masked over finite padding."""
    return jnp.asarray(mask, bool) | finite(x)


def finite(x):
    """``isfinite(x)`` as a test of the exponent bits of x cast to at least float32.

    XLA:CPU compiled ``isfinite`` of a bfloat16 x inside the backward's masked
    sums to scalar code (bfloat16 (4096, 512): 1.10 ms against 0.30 ms); the
    bit test is vector code. Unlike ``x - x == 0``, it holds under XLA's fast
    math (which may assume no NaN) and forms no NaN (``jax_debug_nans``).
    """
    if jnp.iscomplexobj(x):
        return finite(lax.real(x)) & finite(lax.imag(x))
    xf = x.astype(_checks.stats_dtype(x.dtype))
    info = jnp.finfo(xf.dtype)
    exponent = ((1 << info.nexp) - 1) << info.nmant
    bits = lax.bitcast_convert_type(xf, jnp.int64 if info.bits == 64 else jnp.int32)
    return (bits & exponent) != exponent


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _batch_norm(cfg: _Config, x, scale, bias, mask):
    y, mom, _ = _forward(cfg, x, scale, bias, mask)
    return y, mom


def _batch_norm_fwd(cfg: _Config, x, scale, bias, mask):
    y, mom, inv = _forward(cfg, x, scale, bias, mask)
    # Residuals: x, the mask, and per-feature vectors only.
    return (y, mom), (x, scale, bias, mask, mom.mean, inv, mom.count)


def _batch_norm_bwd(cfg: _Config, res, cts):
    x, scale, bias, mask, mean, inv, count = res
    dy, dmom = cts
    sd = cfg.sdtype
    # Work on the View of x (a free reshape; see jaxbn._stats.view).
    v = view(x, cfg.red)
    dyn = dy.astype(sd)
    xs = x
    if mask is not None:
        # Outputs over NaN or inf padding are constant zeros: their cotangents are
        # dropped, and that padding is replaced by the mean wherever x - mu is
        # formed, so that no 0 * NaN reaches any derivative.
        keep = finite_or_kept(x, mask)
        dyn = jnp.where(keep, dyn, 0)
        xs = jnp.where(keep, x, _expand(mean, cfg.red).astype(x.dtype))
    # The sums accumulate in at least float32 (a float16 sum overflows past 65504).
    acc = _checks.stats_dtype(sd)
    # The two reductions of the backward pass, sum(dy) and sum(dy*(x-mu)), read
    # dy and x (see _backward_sums), cast to acc inside the kernels, and the mask
    # as it is: every output depends on the statistics, masked-out ones too (they
    # are normalized like the others), so the sums run over all kept positions.
    # dy itself where its cast to sd is exact (a half-precision dy reaches the
    # kernels uncast; see _checked_backward_sums).
    dy_in = dy if _checks.widens(dy.dtype, sd) else dy.astype(sd)
    operands = (v.of(dy_in), v.of(x), mean.astype(acc), inv.astype(_checks.real_dtype(acc)))
    col_dy, sum_dy_xc = lax.platform_dependent(
        *operands, *(() if mask is None else (jnp.asarray(mask),)),
        cpu=partial(_checked_backward_sums, v, x.shape),
        default=partial(_backward_sums, v, x.shape),
    )
    # Per-feature work stays in the accumulation dtype; only dx is formed in sd.
    inv_acc = inv.astype(_checks.real_dtype(acc))
    sum_dy = v.fold_sum(col_dy)
    sum_dy_xhat = v.fold_sum(sum_dy_xc) * inv_acc
    # dmom, the cotangent of the returned statistics, is taken by _stat_links.
    del dmom
    # dx needs sum_j(gamma_j * sum_dy_j) and sum_j(gamma_j * sum_dy_xhat_j) over the
    # devices j: each device's gamma scales its own share of the loss's dependence on
    # the shared statistics (gamma differs per device under vmap with per-member
    # parameters). scale/bias take the unweighted sums. One psum for all four.
    g = None if scale is None else scale.astype(sd)
    ga = None if g is None else g.astype(acc)
    parts = [sum_dy, sum_dy_xhat] + ([] if g is None else [ga * sum_dy, ga * sum_dy_xhat])
    if cfg.axis_name is not None:
        parts = list(lax.psum(jnp.stack(parts), cfg.axis_name, axis_index_groups=cfg.axis_index_groups))
    tot_dy, tot_dy_xhat = parts[0], parts[1]
    g_dy, g_dy_xhat = parts[-2], parts[-1]
    a = inv if g is None else inv * g  # gamma * s
    b = per_count(-inv_acc * g_dy, count).astype(sd)
    c = (per_count(-inv_acc * g_dy_xhat, count) * inv_acc).astype(sd)
    # dx = a*dy + b + c*(x - mu), in the input's layout (see apply_affine). The
    # statistics do not depend on masked-out x: there dx = a*dy only (zero when
    # the loss ignores those outputs, as it does padding).
    red = cfg.red
    through_stats = _expand(b, red) + _expand(c, red) * (xs.astype(sd) - _expand(mean, red))
    if mask is not None:
        through_stats = jnp.where(jnp.asarray(mask, bool), through_stats, 0)
    dx = _expand(a, red) * dyn + through_stats
    # An x that does not vary over a mesh axis its cotangent varies over (a
    # replicated x with a per-device mask in a typed shard_map) takes the sum.
    spread = _varying(dx) - _varying(x)
    if spread:
        dx = lax.psum(dx, tuple(sorted(spread)))
    dscale = _param_grad(sum_dy_xhat, tot_dy_xhat, scale, cfg.axis_name)
    dbias = _param_grad(sum_dy, tot_dy, bias, cfg.axis_name)
    return dx.astype(x.dtype), dscale, dbias, None


def _cast(dy, x, mean) -> bool:
    """True when the backward sums read a cast of dy or x (see ``jaxbn._stats.paired_sums``)."""
    return dy.dtype != mean.dtype or x.dtype != mean.dtype


def _backward_sums(v, shape, dy, x, mean, inv, mask=None, neg_mean=None):
    """Per-column ``sum(dy)`` and ``sum(dy * (x - mu))`` (dy and x seen through the View ``v``).

    dy and x are cast to the dtype of ``mean`` (the accumulation dtype) here.
    ``x + (-mu)`` keeps its broadcast apart from the ``x - mu`` of dx, so XLA
    fuses each into its consumer instead of materializing a full-size x - mu.
    ``mask``: the user's (broadcastable to the input's ``shape``); the sums then
    skip the outputs that are constant zeros (see :func:`_dy_sums`).
    ``neg_mean``: ``v.bcast(-mean)`` computed by the caller (see
    :func:`_checked_backward_sums`).
    """
    del inv
    neg_mean = v.bcast(-mean) if neg_mean is None else neg_mean
    return _dy_sums(v, shape, dy, x.astype(mean.dtype) + neg_mean, x, mask, mean)


def _dy_sums(v, shape, dy, t, x, mask, mean):
    """Per-column ``sum(dy)`` and ``sum(dy * t)``, ``t`` formed from ``x``, dy cast to ``mean``'s dtype.

    With a ``mask``, outputs over NaN or inf padding are constant zeros (see
    :func:`finite_or_kept`): their terms are dropped, so that no ``0 * NaN``
    reaches the sums.
    """
    dyf = dy.astype(mean.dtype)
    p, q = dyf, dyf * t
    if mask is not None:
        # dy selected, and its product with t selected again: the backward's own
        # derivative then never forms 0 * NaN at padding (t itself is not selected:
        # a select of t rather than of the product was scalar code).
        keep = _stats.mask_view(mask, shape, v) | finite(x)
        p = jnp.where(keep, dyf, 0)
        q = jnp.where(keep, p * t, 0)
        limit = _stats.MASKED_CAST_BLOCKS if _cast(dy, x, mean) else _stats.MASKED_BLOCKS
        return _stats.blocked_sums((p, q), v.red, run=v.runs, limit=limit)
    return paired_sums(p, q, v.red, cast=_cast(dy, x, mean), any_size=True, run=v.runs)


def _checked_backward_sums(v, shape, dy, x, mean, inv, mask=None):
    """:func:`_backward_sums` on CPU: both sums in one read of dy and x (``jaxbn._stats.paired_sums``).

    XLA:CPU reads ``dy * x`` at full memory speed but slows down on a broadcast
    operand such as ``x - mu``, so ``sum(dy * (x - mu))`` is taken as
    ``sum(dy * x) - mu * sum(dy)`` where that is accurate: the uncentered form
    loses about ``|mu| * s`` rounding units of ``sum(dy * xhat)``; with
    ``|mu|^2 <= WELL_CONDITIONED * (var + eps)`` for every feature that is as
    accurate as the forward's statistics (see ``jaxbn._stats.WELL_CONDITIONED``);
    otherwise a ``lax.cond`` takes the centered sum.

    dy and x are cast to the accumulation dtype (that of ``mean``) inside each
    branch, and the ``mask`` is broadcast there: an operand of a ``lax.cond``
    is materialized, so cast ones would be full-size float32 copies of
    half-precision tensors, written on every call.
    """
    ok = jnp.all(abs_sq(mean * inv) <= WELL_CONDITIONED)
    mean_col = jnp.squeeze(v.bcast(mean), v.red)

    def uncentered():
        col_dy, s = _dy_sums(v, shape, dy, x.astype(mean.dtype), x, mask, mean)
        return col_dy, s - mean_col * col_dy

    # mu enters the centered branch already broadcast to the view's columns (as an
    # operand of the cond, materialized): tiled inside it, the sums of a View were
    # scalar code (an index modulo C per element).
    def centered():
        return _backward_sums(v, shape, dy, x, mean, inv, mask, -jnp.expand_dims(mean_col, v.red))

    return lax.cond(ok, uncentered, centered)


def _varying(t) -> frozenset:
    """The manual mesh axes ``t`` varies over (empty outside a typed shard_map)."""
    try:
        return frozenset(jax.typeof(t).manual_axis_type.varying)
    except AttributeError:
        return frozenset()


def _param_grad(local, total, param, axis_name):
    """Cotangent of scale or bias: per device, like any replicated parameter's.

    In a typed shard_map a parameter that is invariant over a mesh axis needs a
    cotangent of the same type, i.e. summed over that axis: the total already
    reduced over ``axis_name`` is reused, and any other axis the batch varies over
    is summed here.
    """
    if param is None:
        return None
    d = local
    # Outside a typed shard_map nothing varies and this is the local sum. (The
    # cotangent's type follows from dy, not from x: a replicated x with a
    # per-device mask or bias still gives a varying cotangent.)
    names = set(axis_name) if isinstance(axis_name, tuple) else {axis_name}
    if axis_name is not None and names <= _varying(local) - _varying(param):
        d = total
    left = _varying(d) - _varying(param)
    if left:
        d = lax.psum(d, tuple(sorted(left)))
    return d.astype(param.dtype)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def _pooled_sum(cfg: _Config, t, mask):
    """``sum(t)`` over the batch axes and over ``axis_name``, masked-out positions excluded."""
    if mask is not None:  # masked-out x may be NaN or inf padding
        t = jnp.where(jnp.broadcast_to(jnp.asarray(mask, bool), t.shape), t, 0)
    s = jnp.sum(t, axis=cfg.red)
    if cfg.axis_name is not None:
        s = lax.psum(s, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)
    return s


# The custom VJP above takes only the cotangent of y. ``batch_norm`` returns
# the statistics through ``_mean_link`` and ``_var_link``: identities on the
# statistics whose tangents (replacing the statistics' own) are those of the
# batch statistics as functions of x,
#
#     d mean = sum(dx) / m,    d var = 2 sum(dx * (x - mu)) / m    (pooled)
#
# (``sum(x - mu) = 0`` drops mu's own tangent from ``d var``), so the
# cotangents of the returned statistics reach x through the transpose of these
# maps. JAX transposes their ``psum`` as it transposes any collective, under
# every transform: a cotangent that ``vmap`` delivers once for all devices (the
# statistics are not batched there) is not summed again, one that ``pmap``
# delivers per device is. ``_var_link`` takes the linked mean, so that second
# derivatives see mu's dependence on x. Statistics whose cotangent is zero
# cost nothing here. (The links pass their statistic through rather than
# returning zeros to be added: a zeros output is unbatched under ``vmap``
# while its tangent is batched, which JAX fails to transpose inside ``jit``.)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _mean_link(cfg: _Config, x, mask, mean, count):
    del x, mask, count
    return mean


@_mean_link.defjvp
def _mean_link_jvp(cfg: _Config, primals, tangents):
    _, mask, mean, count = primals
    sd = mean.dtype
    # The primal goes through the link again, so that higher derivatives see it.
    return _mean_link(cfg, *primals), per_count(_pooled_sum(cfg, tangents[0].astype(sd), mask), count)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _var_link(cfg: _Config, x, mask, mean, var, count):
    del x, mask, mean, count
    return var


@_var_link.defjvp
def _var_link_jvp(cfg: _Config, primals, tangents):
    x, mask, mean, var, count = primals
    sd = var.dtype
    d = x.astype(sd) - _expand(mean, cfg.red)
    if mask is not None:  # the transpose multiplies by d: no NaN padding in it
        d = jnp.where(jnp.asarray(mask, bool), d, 0)
    return _var_link(cfg, *primals), 2 * per_count(_pooled_sum(cfg, tangents[0].astype(sd) * d, mask), count)


def _batch_norm_linked(cfg: _Config, x, scale, bias, mask):
    y, mom = _batch_norm(cfg, x, scale, bias, mask)
    # Only the links carry the statistics' derivatives: their tangents replace
    # whatever the statistics carry (higher-order differentiation also traces
    # _batch_norm's forward as plain JAX, whose own derivative of the statistics
    # is dropped there). The statistics need no stop_gradient, which inside
    # lax.scan made JAX lose part of the second derivatives.
    mean, var, count = mom.mean, mom.var, lax.stop_gradient(mom.count)
    mean = _mean_link(cfg, x, mask, mean, count)
    return y, Moments(mean, _var_link(cfg, x, mask, mean, var, count), count)


# Called outside jit (eager code, ``Module.init``), the kernel would run op by op,
# compiling and dispatching a few dozen tiny programs; as one jitted program it
# compiles once per configuration. Inside jit this is inlined and costs nothing.
_batch_norm_jit = jax.jit(_batch_norm_linked, static_argnums=(0,))


def batch_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: _checks.Axes = -1,
    epsilon: float = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    mask: jax.Array | None = None,
    fast_variance: bool = False,
    stats_dtype: Any = None,
) -> tuple[jax.Array, Moments]:
    """Training-mode batch norm: normalizes with this batch's statistics.

    ``y = (x - mean) / sqrt(var + eps) * scale + bias`` with ``mean``/``var`` the
    per-feature statistics of the batch (see :func:`jaxbn.moments`), pooled over
    ``axis_name`` when given. This is a ``jax.custom_vjp`` whose backward pass is
    the hand-derived one (module docstring of ``jaxbn._ops``): it keeps only ``x``
    and per-feature vectors as residuals, does both batch reductions in one pass,
    and under ``axis_name`` sums them across devices in one collective (sync-BN's
    backward). Cotangents flowing into the returned statistics are honoured.
    Masked-out positions (``mask`` False) do not enter the statistics; they are
    normalized with the statistics of the others (as in flax) and the gradient
    is that of this function. A loss that ignores them, as losses ignore
    padding, gives them zero gradient and leaves every other gradient as if they
    were absent. Padding may hold NaN or inf: the outputs there are 0 and pass
    no gradient, at any order. Complex inputs are supported through automatic
    differentiation of the same forward pass.
    Being a ``custom_vjp``, it supports reverse-mode differentiation (also of
    higher order: ``jax.hessian`` works) but not ``jax.jvp``/``jax.jacfwd``.

    Args:
      x: floating-point input.
      scale, bias: optional per-feature gamma and beta of the feature shape.
      axis: the feature axis or axes.
      epsilon: added to the variance; must be > 0.
      axis_name: mapped axis name(s) to pool statistics over.
      axis_index_groups: groups of device indices pooled separately.
      mask: boolean (or integer) array broadcastable to ``x``; True (nonzero) marks elements to use.
      fast_variance: use the one-pass ``E[x^2] - E[x]^2`` variance.
      stats_dtype: dtype of the statistics and of their per-feature arithmetic (default:
        at least float32); the sums over the batch accumulate in at least float32
        whatever it is, and ``count`` is at least float32.

    Returns:
      ``(y, Moments(mean, var, count))``; y has the standard promotion of x,
      scale and bias.

    Raises:
      ValueError: if each feature would reduce over a single element (variance
        undefined) on a single device, or on any invalid argument.
    """
    _, red = validate(x, scale, bias, axis, epsilon, mask)
    check_reducible(x.shape, red, axis_name)
    if stats_dtype is None:
        sdtype = _checks.stats_dtype(x.dtype)
    else:
        sdtype = _checks.stats_dtype(stats_dtype, force_float32=False, name="stats_dtype")
    return batch_norm_impl(
        x,
        scale,
        bias,
        mask,
        red=red,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        fast_variance=fast_variance,
        sdtype=sdtype,
        out_dtype=_checks.result_dtype(x, scale, bias),
    )


def batch_norm_impl(
    x, scale, bias, mask, *, red, epsilon, axis_name, axis_index_groups, fast_variance, sdtype, out_dtype
) -> tuple[jax.Array, Moments]:
    """:func:`batch_norm` on validated arguments (used by the modules)."""
    if isinstance(epsilon, jax.core.Tracer) or np.ndim(epsilon) != 0:
        raise TypeError(
            "`epsilon` of batch_norm must be a concrete scalar (it is static: the compiled "
            f"backward pass depends on it), got {epsilon!r}; jaxbn.normalize accepts traced "
            "or per-feature values."
        )
    cfg = _Config(
        tuple(red),
        float(epsilon),
        tuple(axis_name) if isinstance(axis_name, list) else axis_name,
        _freeze(axis_index_groups),
        bool(fast_variance),
        sdtype,
        out_dtype,
    )
    if jnp.iscomplexobj(x):
        y, mom, _ = _forward(cfg, x, scale, bias, mask)
        return y, mom
    return _batch_norm_jit(cfg, x, scale, bias, mask)


def _freeze(groups):
    return None if groups is None else tuple(tuple(int(i) for i in g) for g in groups)
