"""Pure functions: forward against NumPy, hand-derived backward against autodiff, numerics, errors."""

import contextlib
import math
import os
import re
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn


@contextlib.contextmanager
def x64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def np_moments(x, features, mask=None):
    red = tuple(i for i in range(x.ndim) if i not in features)
    x = np.asarray(x, np.float64)
    if mask is None:
        return x.mean(red), x.var(red), np.full(x.mean(red).shape, x.size / x.mean(red).size)
    m = np.broadcast_to(np.asarray(mask, bool), x.shape)
    n = m.sum(red)
    mean = np.where(m, x, 0).sum(red) / n
    var = np.where(m, (x - np.expand_dims(mean, red)) ** 2, 0).sum(red) / n
    return mean, var, n


def np_batch_norm(x, scale, bias, features, eps, mask=None):
    red = tuple(i for i in range(x.ndim) if i not in features)
    mean, var, _ = np_moments(x, features, mask)
    xhat = (np.asarray(x, np.float64) - np.expand_dims(mean, red)) / np.sqrt(np.expand_dims(var, red) + eps)
    return xhat * np.expand_dims(scale, red) + np.expand_dims(bias, red)


SHAPES = [
    ((32, 7), -1, (1,)),
    ((8, 5, 5, 3), -1, (3,)),
    ((8, 3, 5, 5), 1, (1,)),  # channels-first
    ((6, 4, 5, 3), (1, -1), (1, 3)),  # tuple of feature axes
]


@pytest.mark.parametrize("shape,axis,features", SHAPES)
def test_forward_matches_numpy(shape, axis, features):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    fshape = tuple(shape[a] for a in features)
    scale = rng.uniform(0.5, 2, fshape).astype(np.float32)
    bias = rng.normal(size=fshape).astype(np.float32)
    y, mom = jaxbn.batch_norm(x, scale, bias, axis=axis, epsilon=1e-3)
    np.testing.assert_allclose(y, np_batch_norm(x, scale, bias, features, 1e-3), rtol=1e-4, atol=1e-4)
    mean, var, count = np_moments(x, features)
    np.testing.assert_allclose(mom.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mom.var, var, rtol=1e-5)
    np.testing.assert_array_equal(mom.count, count)
    m2 = jaxbn.moments(x, axis)
    np.testing.assert_allclose(m2.var, var, rtol=1e-5)
    y2 = jaxbn.normalize(x, mean.astype(np.float32), var.astype(np.float32), scale, bias, axis=axis, epsilon=1e-3)
    np.testing.assert_allclose(y2, y, rtol=1e-4, atol=1e-4)


def test_masked_moments_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 4, 3)).astype(np.float32)
    mask = rng.uniform(size=(10, 4, 1)) > 0.4
    x_nan = np.where(mask, x, np.nan).astype(np.float32)  # masked-out values never leak
    for fast in (False, True):
        mom = jaxbn.moments(x_nan, -1, mask=mask, fast_variance=fast)
        mean, var, n = np_moments(x, (2,), mask)
        np.testing.assert_allclose(mom.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mom.var, var, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(mom.count, n)


def _plain_bn(x, scale, bias, axis, eps, mask=None):
    """Plain-jnp reference (autodiff through it); masked positions are padding."""
    features = tuple(sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    red = tuple(i for i in range(x.ndim) if i not in features)
    if mask is None:
        mean = x.mean(red)
        var = ((x - jnp.expand_dims(mean, red)) ** 2).mean(red)
    else:
        m = jnp.broadcast_to(mask, x.shape)
        n = m.sum(red, dtype=x.dtype)
        xs = jnp.where(m, x, 0)
        mean = xs.sum(red) / n
        var = jnp.where(m, (xs - jnp.expand_dims(mean, red)) ** 2, 0).sum(red) / n
    xhat = (x - jnp.expand_dims(mean, red)) / jnp.sqrt(jnp.expand_dims(var, red) + eps)
    y = xhat * jnp.expand_dims(scale, red) + jnp.expand_dims(bias, red)
    return y, mean, var


def _loss(y, mean, var, w, mask=None):
    out = jnp.sum(jnp.sin(y) * w)
    if mask is not None:
        out = jnp.sum(jnp.where(jnp.broadcast_to(mask, y.shape), jnp.sin(y) * w, 0))
    return out + jnp.sum(mean**2 * 0.3) + jnp.sum(jnp.cos(var))


@pytest.mark.parametrize("shape,axis,features", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("loc", [1.0, 1e3])  # the plain and the centered sums (see OFFSETS)
def test_custom_backward_equals_autodiff_of_reference(shape, axis, features, masked, loc):
    with x64():
        rng = np.random.default_rng(2)
        x = jnp.asarray(rng.normal(loc, 2.0, shape))
        w = jnp.asarray(rng.normal(size=shape))
        fshape = tuple(shape[a] for a in features)
        scale = jnp.asarray(rng.uniform(0.5, 2, fshape))
        bias = jnp.asarray(rng.normal(size=fshape))
        mask = jnp.asarray(rng.uniform(size=shape) > 0.3) if masked else None

        def ours(x, s, b):
            y, mom = jaxbn.batch_norm(x, s, b, axis=axis, epsilon=1e-3, mask=mask)
            return _loss(y, mom.mean, mom.var, w, mask)

        def ref(x, s, b):
            return _loss(*_plain_bn(x, s, b, axis, 1e-3, mask), w, mask)

        g_ours = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
        g_ref = jax.grad(ref, argnums=(0, 1, 2))(x, scale, bias)
        for a, b in zip(g_ours, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
        if masked:
            assert np.all(np.asarray(g_ours[0])[~np.asarray(mask)] == 0)


@pytest.mark.parametrize("nan_padding", [False, True])
def test_masked_outputs_are_differentiated_like_the_others(nan_padding):
    """Masked-out positions are normalized too; a loss that reads them (say a conv
    over padded positions) must get their share of dscale, dbias and dx, as
    autodiff of the plain function (and flax) gives. It used to drop it."""
    with x64():
        rng = np.random.default_rng(5)
        shape = (7, 3, 4)
        x = jnp.asarray(rng.normal(1.0, 2.0, shape))
        w = jnp.asarray(rng.normal(size=shape))
        scale = jnp.asarray(rng.uniform(0.5, 2, (4,)))
        bias = jnp.asarray(rng.normal(size=(4,)))
        mask = jnp.asarray(rng.uniform(size=(7, 3, 1)) > 0.3).at[0].set(True)

        def ours(x, s, b, m):
            y, mom = jaxbn.batch_norm(x, s, b, epsilon=1e-3, mask=mask)
            return _loss(y, mom.mean, mom.var, w, m)

        def ref(x, s, b, m):
            return _loss(*_plain_bn(x, s, b, -1, 1e-3, mask), w, m)

        if not nan_padding:  # the loss reads every output
            g_ours = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias, None)
            g_ref = jax.grad(ref, argnums=(0, 1, 2))(x, scale, bias, None)
        else:  # padding holds NaN; the loss ignores it
            xn = jnp.where(mask, x, jnp.nan)
            g_ours = jax.grad(ours, argnums=(0, 1, 2))(xn, scale, bias, mask)
            g_ref = jax.grad(ref, argnums=(0, 1, 2))(x, scale, bias, mask)
            assert np.all(np.asarray(g_ours[0])[~np.broadcast_to(np.asarray(mask), shape)] == 0)
        for a, b in zip(g_ours, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 0, 3, 8), (0, 16)])
def test_gradient_of_an_empty_masked_batch(shape):
    """An empty batch with a mask differentiates to empty gradients (the blocked sums once
    divided by zero choosing their blocks)."""
    x, mask = jnp.zeros(shape), jnp.ones(shape, bool)
    gx, gs = jax.grad(lambda x, s: jnp.sum(jaxbn.batch_norm(x, s, mask=mask)[0]), argnums=(0, 1))(x, jnp.ones(shape[-1]))
    assert gx.shape == shape and np.all(np.asarray(gs) == 0)


def test_finite_padding_test_matches_isfinite():
    from jaxbn._ops import finite

    vals = np.array([0.0, -0.0, 1.0, -3e38, 3e38, 1e-45, np.inf, -np.inf, np.nan], np.float32)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x = jnp.asarray(vals).astype(dtype)
        np.testing.assert_array_equal(finite(x), jnp.isfinite(x))
    z = jnp.asarray(np.array([1 + 1j, complex(np.nan, 0), complex(0, np.inf)], np.complex64))
    np.testing.assert_array_equal(finite(z), [True, False, False])


def test_nan_padding_under_fast_math_and_debug_nans():
    """Outputs and gradients over NaN and inf padding stay 0 with XLA's fast math (which may
    assume no NaN), and inf padding raises nothing under jax_debug_nans. A finiteness test
    as x - x == 0 let NaN through under fast math, and formed a NaN from inf padding."""
    code = (
        "import jax, jax.numpy as jnp, numpy as np, jaxbn\n"
        "x = jnp.array([[1.0, 2.0], [3.0, np.nan], [np.inf, 0.5], [0.25, -1.0]])\n"
        "m = jnp.isfinite(x)\n"
        "f = lambda x: jnp.sum(jaxbn.batch_norm(x, mask=m)[0] * jnp.arange(8.0).reshape(4, 2))\n"
        "y = jax.jit(lambda x: jaxbn.batch_norm(x, mask=m)[0])(x)\n"
        "g = jax.jit(jax.grad(f))(x)\n"
        "assert np.all(np.isfinite(y)) and np.all(np.isfinite(g)), (y, g)\n"
        "assert np.all(np.asarray(y)[~np.asarray(m)] == 0) and np.all(np.asarray(g)[~np.asarray(m)] == 0)\n"
        "x = jnp.where(m, x, jnp.inf)  # inf padding: no NaN anywhere, so none may be formed\n"
        "jax.config.update('jax_debug_nans', True)\n"
        "with jax.disable_jit():\n"
        "    jax.grad(f)(x)\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_fast_math=true", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("offset", [0.0, 1e3])  # both sides of the run-time check
def test_gradient_of_masked_statistics_ignores_nan_padding(offset):
    """d var / dx = 2 (x - mean) / n at kept positions, 0 over NaN padding. The centered
    sums once squared before selecting: 2 * NaN * 0 made every entry NaN."""
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(64, 4)) + offset).astype(np.float32)
    mask = rng.random((64, 4)) < 0.7
    xp = jnp.asarray(np.where(mask, x, np.nan))
    g = jax.grad(lambda x: jaxbn.moments(x, mask=mask).var.sum())(xp)
    xd = np.where(mask, x.astype(np.float64), 0)
    n = mask.sum(0)
    expected = np.where(mask, 2 * (xd - xd.sum(0) / n) / n, 0)
    np.testing.assert_allclose(g, expected, atol=1e-6 * max(1, offset) / 30)


def test_second_order_through_masked_backward_ignores_nan_padding():
    """A gradient penalty (reverse over reverse) through batch_norm over NaN padding equals
    that over zero padding. The backward's masked sums once formed dy * x before selecting,
    and their own derivative took NaN * 0 at the padding."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    mask = rng.random((16, 3)) < 0.75
    w = jnp.asarray(rng.normal(size=(16, 3)).astype(np.float32))

    def penalty(w, x, zero_padding):
        def loss(x):
            y, _ = jaxbn.batch_norm(x, mask=mask, epsilon=1e-3)
            # Outputs over NaN padding are zeros by contract; over zero padding they
            # are normalized like the others, and the loss leaves them out.
            return jnp.sum((jnp.where(mask, jnp.sin(y), 0) if zero_padding else jnp.sin(y)) * w)
        return jnp.sum(jnp.where(mask, jax.grad(loss)(x), 0) ** 2)

    got = jax.grad(penalty)(w, jnp.asarray(np.where(mask, x, np.nan)), False)
    expected = jax.grad(penalty)(w, jnp.asarray(np.where(mask, x, 0)), True)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 8), (32, 4, 4, 4), (64, 20)])
def test_forward_over_reverse_with_a_constant_cotangent(shape):
    """jax.hessian (forward over reverse) and Hessian-vector products of a loss linear in y,
    on inputs large enough for the blocked paired sums: the backward's dy is then a
    constant whose tangent is a symbolic zero, on which JAX's JVP of the blocked
    reduce failed (TypeError: Zero passed to reshape)."""
    with x64():
        rng = np.random.default_rng(11)
        x = jnp.asarray(rng.normal(1.0, 2.0, shape))
        w = jnp.asarray(rng.normal(size=shape))
        g = jnp.asarray(rng.normal(1.0, 0.1, shape[-1]))

        def ours(x):
            return jnp.sum(jaxbn.batch_norm(x, g, epsilon=1e-3)[0] * w)

        def ref(x):
            return jnp.sum(_plain_bn(x, g, jnp.zeros(shape[-1]), -1, 1e-3)[0] * w)

        v = jnp.asarray(rng.normal(size=shape))
        hvp, hvp_ref = (jax.jvp(jax.grad(f), (x,), (v,))[1] for f in (ours, ref))
        np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-9, atol=1e-9)
        if x.size <= 512:
            np.testing.assert_allclose(jax.hessian(ours)(x), jax.hessian(ref)(x), rtol=1e-9, atol=1e-9)
        # The statistics alone, differentiated twice (their sums are the same kernels).
        stats = lambda x: jnp.sum(jaxbn.moments(x).var * g)
        stats_ref = lambda x: jnp.sum(x.var(tuple(range(x.ndim - 1))) * g)
        np.testing.assert_allclose(jax.jvp(jax.grad(stats), (x,), (v,))[1],
                                   jax.jvp(jax.grad(stats_ref), (x,), (v,))[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("loop", ["none", "scan", "map"])
def test_second_derivatives_inside_loops(loop):
    """Hessian of a loss of y and of the statistics, also inside lax.scan / lax.map.

    With the statistics gradient-stopped before their links, JAX lost part of
    the second derivative inside loops (errors up to 0.42 under scan, 7.1 under map).
    """
    with x64():
        rng = np.random.default_rng(6)
        x = jnp.asarray(rng.normal(1.0, 2.0, (6, 3)))
        w = jnp.asarray(rng.normal(size=(6, 3)))

        def ours(x):
            y, mom = jaxbn.batch_norm(x, epsilon=1e-3)
            return _loss(y, mom.mean, mom.var, w)

        def ref(x):
            return _loss(*_plain_bn(x, jnp.ones(3), jnp.zeros(3), -1, 1e-3), w)

        def looped(f):
            if loop == "scan":
                return lambda x: lax.scan(lambda c, _: (c + f(x), None), 0.0, None, length=1)[0]
            if loop == "map":
                return lambda x: jnp.sum(lax.map(lambda _: f(x), jnp.arange(2)))
            return f

        np.testing.assert_allclose(jax.hessian(looped(ours))(x), jax.hessian(looped(ref))(x), rtol=1e-9, atol=1e-10)


def test_nan_padding_keeps_every_derivative_finite():
    """Outputs over NaN padding are 0 and drop their cotangents: a loss with a plain
    where, and its second derivatives, stay finite and equal those with zero padding."""
    with x64():
        x = jnp.asarray(np.random.default_rng(7).normal(size=(8, 3)))
        mask = jnp.ones((8, 1), bool).at[6:].set(False)

        def loss(x):
            y, mom = jaxbn.batch_norm(x, mask=mask)
            return jnp.sum(jnp.where(mask, jnp.sin(y), 0)) + jnp.sum(mom.var**2)

        def curvature(x):
            return jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x)

        y, _ = jaxbn.batch_norm(jnp.where(mask, x, jnp.nan), mask=mask)
        np.testing.assert_array_equal(y[6:], 0)
        for f in (jax.grad(loss), curvature):
            got = f(jnp.where(mask, x, jnp.nan))
            want = f(jnp.where(mask, x, 0.0))
            np.testing.assert_allclose(got[:6], want[:6], rtol=1e-9, atol=1e-12)
            np.testing.assert_array_equal(got[6:], 0)


@pytest.mark.parametrize("masked", [False, True])
def test_check_grads_finite_differences(masked):
    with x64():
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.normal(size=(6, 3, 4)))
        w = jnp.asarray(rng.normal(size=(6, 3, 4)))
        scale = jnp.asarray(rng.uniform(0.5, 2, (4,)))
        bias = jnp.asarray(rng.normal(size=(4,)))
        mask = jnp.asarray(rng.uniform(size=(6, 3, 1)) > 0.3) if masked else None

        def f(x, s, b):
            y, mom = jaxbn.batch_norm(x, s, b, mask=mask)
            return _loss(y, mom.mean, mom.var, w, mask)

        check_grads(f, (x, scale, bias), order=1, modes=("rev",))
        # Second order: differentiating the hand-written backward itself.
        check_grads(f, (x, scale, bias), order=2, modes=("rev",))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("order", ["grad(vmap)", "vmap(grad)"])
def test_grad_around_vmap_without_axis_name(masked, order):
    """Independent batches under vmap (an ensemble, no axis_name), differentiated outside it.

    The statistics' links used to return zeros that vmap left unbatched while
    their tangents were batched, and JAX could not transpose that inside jit:
    ``grad(vmap(batch_norm))`` raised a TypeError for every input.
    """
    with x64():
        rng = np.random.default_rng(4)
        shape, axis = (3, 5, 2, 4), -1  # 3 independent batches of (5, 2, 4)
        x = jnp.asarray(rng.normal(1.0, 2.0, shape))
        w = jnp.asarray(rng.normal(size=shape))
        scale = jnp.asarray(rng.uniform(0.5, 2, (3, 4)))
        bias = jnp.asarray(rng.normal(size=(3, 4)))
        mask = jnp.asarray(rng.uniform(size=shape[:-1] + (1,)) > 0.3) if masked else None
        mask = mask.at[:, 0].set(True) if masked else None

        def member(bn):
            def f(x, s, b, w, m):
                return _loss(*bn(x, s, b, m), w, m)
            return f

        def ours(x, s, b, m):
            y, mom = jaxbn.batch_norm(x, s, b, axis=axis, epsilon=1e-3, mask=m)
            return y, mom.mean, mom.var

        def ref(x, s, b, m):
            return _plain_bn(x, s, b, axis, 1e-3, m)

        m_axes = 0 if masked else None
        def total(bn):
            return lambda x, s, b: jnp.sum(jax.vmap(member(bn), (0, 0, 0, 0, m_axes))(x, s, b, w, mask))

        want = jax.grad(total(ref), argnums=(0, 1, 2))(x, scale, bias)
        if order == "grad(vmap)":
            got = jax.jit(jax.grad(total(ours), argnums=(0, 1, 2)))(x, scale, bias)
        else:
            per = jax.vmap(jax.grad(member(ours), argnums=(0, 1, 2)), (0, 0, 0, 0, m_axes))
            got = jax.jit(per)(x, scale, bias, w, mask)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_export_with_a_symbolic_batch_size():
    """jax.export with a polymorphic batch: the reshaped views and row blocks need
    static sizes, so symbolic shapes take the plain reductions (it used to raise)."""
    (n,) = jax.export.symbolic_shape("n")
    spec = jax.ShapeDtypeStruct((n, 5, 3), jnp.float32)
    x = jnp.asarray(np.random.default_rng(8).normal(2.0, 3.0, (4, 5, 3)), jnp.float32)
    bn = jaxbn.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)

    def fwdbwd(x):
        y, mom = jaxbn.batch_norm(x)
        return y, mom.mean, mom.var, jax.grad(lambda x: jnp.sum(jnp.sin(jaxbn.batch_norm(x)[0])))(x)

    def module(x):
        return bn.apply(variables, x, mutable=["batch_stats"])

    mask = (jnp.arange(5) < 4)[None, :, None]

    def masked(x):
        return jax.grad(lambda x: jnp.sum(jnp.sin(jaxbn.batch_norm(x, mask=mask)[0])))(x)

    for f in (fwdbwd, module, lambda x: jaxbn.moments(x, axis=(1, 2)), masked):
        exported = jax.export.export(jax.jit(f))(spec)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     exported.call(x), jax.jit(f)(x))


def test_backward_keeps_only_x_and_feature_vectors():
    x = jnp.ones((16, 8, 8, 4), jnp.float32) * jnp.arange(4.0, dtype=jnp.float32)
    x = x + jax.random.normal(jax.random.key(0), x.shape)
    scale, bias = jnp.ones(4), jnp.zeros(4)
    _, vjp = jax.vjp(lambda x, s, b: jaxbn.batch_norm(x, s, b)[0], x, scale, bias)
    big = [leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "size") and leaf.size >= x.size]
    assert len(big) == 1 and big[0].shape == x.shape


def test_variance_stable_when_mean_dominates():
    x = 1e4 + jax.random.normal(jax.random.key(0), (4096, 8), jnp.float32)
    true_var = np.asarray(x, np.float64).var(0)
    ours = jaxbn.moments(x).var
    assert np.max(np.abs(ours / true_var - 1)) < 1e-3
    y, mom = jaxbn.batch_norm(x)
    assert np.max(np.abs(mom.var / true_var - 1)) < 1e-3
    assert abs(float(jnp.std(y)) - 1) < 1e-2
    # The one-pass formula (flax's default) is far off here; ours only when asked.
    fast = jaxbn.moments(x, fast_variance=True).var
    assert np.max(np.abs(fast / true_var - 1)) > 1e-2


def _np_fwdbwd(x, w, eps=1e-5):
    """float64 NumPy training-mode statistics and gradients of sum(y * w) (scale 1, bias 0)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    m = x.shape[0]
    mean, var = x.mean(0), x.var(0)
    s = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * s
    dbias, dscale = w.sum(0), (w * xhat).sum(0)
    return mean, var, s * (w - dbias / m - xhat * dscale / m), dscale, dbias


# Offsets in standard deviations, on both sides of the |mean|^2 <= 8 var line where
# the CPU kernels switch from the plain sums to the centered ones.
OFFSETS = [0.0, 2.5, 3.5, 30.0, 1e3]


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _offset_problem(offset):
    rng = np.random.default_rng(5)
    # Per-feature offsets around `offset`, one feature exactly centered.
    shift = offset * np.array([1.0, -1.0, 0.9, 1.1, 0.0, 1.0, -0.95, 1.05])
    x = (rng.standard_normal((8192, 8)) + shift).astype(np.float32)
    w = rng.standard_normal((8192, 8)).astype(np.float32)
    # float32 holds x only to eps * |x|: error growing with the offset is the data's,
    # but 10x less than the uncentered sums lose (2.6e-4 at offset 1e3, 1e-5 at 30).
    tol = 1e-6 + 1e-7 * offset
    return x, w, tol


@pytest.mark.parametrize("offset", OFFSETS)
def test_float32_statistics_and_gradients_accurate_at_any_offset(offset):
    x, w, tol = _offset_problem(offset)
    mean, var, dx, dscale, dbias = _np_fwdbwd(x, w)

    def loss(x, s, b):
        y, mom = jaxbn.batch_norm(x, s, b)
        return jnp.sum(y * w), mom

    (gx, gs, gb), mom = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, jnp.ones(8), jnp.zeros(8))
    assert _rel(mom.var, var) < 3e-6  # the variance is exact whatever the offset
    tol = 2 * tol  # the float32 mean's own rounding enters the gradients too
    assert np.max(np.abs(np.asarray(mom.mean, np.float64) - mean)) < tol
    assert _rel(gx, dx) < tol and _rel(gs, dscale) < tol and _rel(gb, dbias) < 3e-6
    assert _rel(jaxbn.moments(x).var, var) < 3e-6


@pytest.mark.parametrize("offset", OFFSETS)
def test_every_platforms_kernels_accurate_at_any_offset(offset):
    """CPU runs the checked sums, other platforms the shifted and centered ones: both are exact."""
    from jaxbn import _ops, _stats

    x, w, tol = _offset_problem(offset)
    mean, var, _, dscale, _ = _np_fwdbwd(x, w)
    v = _stats.View(x.shape, (0,), 1, (8,))  # the kernels on x itself, one column per feature
    for kernel in (_stats._checked_moments, _stats._shifted_moments):
        c, d, m2 = jax.jit(partial(kernel, v=v))(x)
        assert _rel(m2 / x.shape[0], var) < 3e-6, kernel.__name__
        # The mean comes as a shift c and a correction d (unrounded to c's magnitude).
        got_mean = np.asarray(c, np.float64) + np.asarray(d, np.float64)
        assert np.max(np.abs(got_mean - mean)) < tol, kernel.__name__
    inv = (1 / np.sqrt(var + 1e-5)).astype(np.float32)
    for kernel in (_ops._checked_backward_sums, _ops._backward_sums):
        col_dy, got = jax.jit(partial(kernel, v, x.shape))(w, x, mean.astype(np.float32), inv)
        assert _rel(col_dy, w.astype(np.float64).sum(0)) < 3e-6, kernel.__name__
        assert _rel(got * inv, dscale) < tol, kernel.__name__


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape", [(8192, 8), (64, 8, 16, 8)])
def test_every_platforms_masked_kernels_accurate_at_any_offset(offset, shape):
    """The masked kernels (CPU: the checked sums and count in one reduce; elsewhere the
    mean first) sum and count only the kept elements, exactly at any offset, and drop
    the cotangents over NaN padding. (64, 8, 16, 8) is reduced through a View (k > 1)."""
    from jaxbn import _ops, _stats

    x, w, tol = _offset_problem(offset)
    x, w = x.reshape(shape), w.reshape(shape)
    rng = np.random.default_rng(6)
    mask = rng.random(shape) < 0.7
    # Masked-out elements: NaN padding at some, finite values (normalized, so their
    # cotangents count in the backward's sums) at the others.
    padded = ~mask & (rng.random(shape) < 0.5)
    xp = np.where(padded, np.nan, x).astype(np.float32)
    red = tuple(range(len(shape) - 1))
    # x itself (one column per feature), or a View with rows of 8 positions.
    v = _stats.View(shape, (0,), 1, (8,)) if len(shape) == 2 else _stats.view(xp, red)
    assert v.k == (1 if len(shape) == 2 else 8)
    xd, wd = x.astype(np.float64).reshape(-1, 8), w.astype(np.float64).reshape(-1, 8)
    kept, keep = mask.reshape(-1, 8), ~padded.reshape(-1, 8)
    n = kept.sum(0)
    mean = np.where(kept, xd, 0).sum(0) / n
    var = np.where(kept, (xd - mean) ** 2, 0).sum(0) / n
    kernels = (
        partial(_stats._checked_moments, v=v, shape=shape),
        partial(_stats._masked_moments, v=v, dtype=jnp.float32, shape=shape),
    )
    for kernel in kernels:
        got_n, c, d, m2 = jax.jit(kernel)(v.of(jnp.asarray(xp)), jnp.asarray(mask))
        np.testing.assert_array_equal(got_n, n)
        assert _rel(np.asarray(m2, np.float64) / n, var) < 3e-6, kernel.func.__name__
        got_mean = np.asarray(c, np.float64) + np.asarray(d, np.float64)
        assert np.max(np.abs(got_mean - mean)) < tol, kernel.func.__name__
    inv = (1 / np.sqrt(var + 1e-5)).astype(np.float32)
    ref_dy = np.where(keep, wd, 0).sum(0)
    ref_dyx = np.where(keep, wd * (np.where(keep, xd, 0) - mean), 0).sum(0)
    for kernel in (_ops._checked_backward_sums, _ops._backward_sums):
        run = jax.jit(partial(kernel, v, shape))
        col_dy, got = run(v.of(jnp.asarray(w)), v.of(jnp.asarray(xp)), mean.astype(np.float32), inv, jnp.asarray(mask))
        assert _rel(v.fold_sum(col_dy), ref_dy) < 3e-6, kernel.__name__
        assert _rel(v.fold_sum(got) * inv, ref_dyx * inv) < tol, kernel.__name__


@pytest.mark.parametrize("shape", [(64, 3), (64, 8), (128, 16), (8, 6, 6, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_narrow_features_keep_the_variance_exact_at_large_offsets(shape, masked):
    """Inputs with <= 16 features are reduced as a wider matrix (k columns per feature):
    rounding each column's mean to float32 cost up to 2e-4 of the variance at mean 1e4, std 1."""
    from jaxbn import _stats

    rng = np.random.default_rng(1)
    x = (rng.normal(size=shape) + 1e4).astype(np.float32)
    mask = rng.random(shape[:-1] + (1,)) < 0.7 if masked else None
    xd = x.astype(np.float64)
    keep = np.broadcast_to(mask, shape) if masked else np.ones(shape, bool)
    red = tuple(range(len(shape) - 1))
    ref = np.array([xd[..., f][keep[..., f]].var() for f in range(shape[-1])])
    assert _stats.view(x, red).k > 1
    got = jaxbn.moments(x, mask=mask).var
    assert _rel(got, ref) < 3e-6
    if not masked:  # both platforms' kernels on the view
        v = _stats.view(x, red)
        for kernel in (_stats._checked_moments, _stats._shifted_moments):
            *_, m2 = jax.jit(partial(kernel, v=v))(v.of(jnp.asarray(x)))
            assert _rel(np.asarray(m2, np.float64) / x[..., 0].size, ref) < 3e-6, kernel.__name__


@pytest.mark.parametrize(
    "shape, red",
    [
        ((3072, 72), (0,)),  # blocks of 32 rows
        ((64, 8, 8, 16), (0, 1, 2)),  # several leading axes
        ((40, 120), (0,)),  # blocks of 20 rows
        ((1009, 6), (0,)),  # a prime row count: plain sums
        ((8, 50, 4), (0, 2)),  # not the leading axes: plain sums
        ((7,), (0,)),  # no feature axis
    ],
)
def test_paired_sums_equal_two_sums(shape, red):
    """Both sums of paired_sums (one read of x on CPU) are the sums, as accurate as jnp.sum."""
    from jaxbn import _stats

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) + 2
    s1, s2 = jax.jit(lambda x: _stats.paired_sums(x, x * x, red))(x)
    x64 = x.astype(np.float64)
    ref1, ref2 = x64.sum(red), (x64 * x64).sum(red)
    assert s1.shape == ref1.shape and s2.shape == ref2.shape
    assert _rel(s1, ref1) < 1e-6 and _rel(s2, ref2) < 1e-6
    plain = jax.jit(lambda x: jnp.sum(x * x, red))(x)
    assert np.max(np.abs(s2 - ref2)) <= 2 * np.max(np.abs(np.asarray(plain, np.float64) - ref2)) + 1e-6 * np.abs(ref2).max()


def test_paired_sums_read_x_once_on_cpu():
    """On CPU, sum(x) and sum(x * x) of a LeNet-sized input are one variadic reduce: x * x is never written."""
    from jaxbn import _stats

    x = jnp.ones((3072, 72))
    for opts in ({}, {"xla_cpu_experimental_ynn_fusion_type": ""}):
        text = jax.jit(lambda x: _stats.paired_sums(x, x * x, (0,))).lower(x).compile(opts).as_text()
        entry = text[text.index("ENTRY"):]
        full = [line for line in entry.splitlines() if (" = f32[3072,72]" in line or " = f32[96,32,72]" in line) and "parameter(" not in line and "bitcast(" not in line]
        assert full == [], full  # no full-size temporary
        assert "(f32[96,72]{1,0}, f32[96,72]{1,0})" in entry  # the two block sums from one kernel


def test_paired_sums_compile_to_vector_code(tmp_path):
    """The blocked reduce of conv activations compiles to vector code without a division per element.

    Blocks that cross the ends of the W runs at offsets XLA:CPU cannot
    simplify (32 rows over W = 56 or 24) gave scalar code with divisions,
    3.5x slower; ``_stats._row_block`` picks blocks that tile the W runs, and
    ``_stats._row_multiple`` rows of a View that tile them too. Operands cast
    from half precision take blocks of at most 16-22 rows below 2M elements
    (XLA:CPU compiled larger ones to scalar code).
    """
    f32, bf16 = "float32", "bfloat16"
    cases = [(s, f32, "stats") for s in [(8, 56, 56, 64), (16, 24, 24, 32), (32, 24, 24, 96), (8, 28, 28, 32),
                                         (16, 7, 7, 256), (8, 100, 64)]]
    # Narrow inputs seen through a View (rows of k positions), in float32 and cast from
    # bfloat16 on the fly (any size): blocks of 32 rows of 8 positions crossed the W runs
    # of 112 or 224 (1.86-2.28 ms against 0.34-0.41 ms for the fwd+bwd of (8, 112, 112, 8)).
    # Above 2M elements (only cast operands take the blocked sums there) the blocks tile
    # whole images too: blocks of 224 positions crossed the 784 of (512, 28, 28, 8)
    # (fwd+bwd 6.2 ms against 1.3 ms in blocks of 112).
    cases += [((8, 112, 112, 8), f32, "stats")]
    cases += [(s, bf16, "stats") for s in [(8, 224, 224, 8), (16, 112, 112, 16), (8, 100, 100, 8), (512, 28, 28, 8)]]
    # Blocks that tile W but cross images, float32 ((16, 28, 28, 8) was 1.72x flax's time).
    cases += [(s, f32, "stats") for s in [(16, 28, 28, 8), (64, 24, 24, 4), (32, 12, 12, 8)]]
    # Rows that cross W runs: rows of 4 positions over W = 14 ((64, 14, 14, 16) took
    # 1.9-2.4x flax's time), of 16 over W = 28, of 64 over W = 56.
    cases += [(s, f32, "stats") for s in [(64, 14, 14, 16), (16, 28, 28, 4), (64, 28, 28, 4), (128, 56, 56, 1)]]
    # The backward's sums of dy and dy * x cast from bfloat16: blocks of 25-32 rows gave
    # scalar code (fwd+bwd of (32, 56, 56, 64) 7.2 ms against 5.2 ms in blocks of 14),
    # and from 23 rows with x centered (the branch for data with a large offset; left
    # as it is for inputs seen through a View, whose tiled mean gives scalar code at any
    # block size, see BENCHMARKS.md).
    cases += [(s, bf16, "backward") for s in [(32, 56, 56, 64), (8, 28, 28, 32), (4096, 512), (64, 28, 28, 8),
                                              (64, 8, 8, 16), (32, 24, 24, 32)]]
    cases += [(s, bf16, "centered") for s in [(32, 56, 56, 64), (8, 28, 28, 32), (4096, 512), (32, 24, 24, 32)]]
    # float32 backward sums above 2M elements, which take the blocked sums where blocks tile
    # every run (104 conv and 2-D shapes of 2-32M elements compiled to vector code).
    cases += [(s, f32, "backward") for s in [(32, 56, 56, 64), (128, 28, 28, 32), (8, 112, 112, 64), (16384, 256)]]
    cases += [(s, f32, "centered") for s in [(32, 56, 56, 64), (8, 112, 112, 64), (16384, 256)]]
    # W with no divisor in [8, 16]: blocks of 17-22 rows that tile W, or of 16 that cross it
    # (blocks of 23-32 rows were scalar code); above 2M elements, blocks of 17.
    for dt in (bf16, "float16"):
        cases += [(s, dt, kind) for s in [(32, 31, 31, 32), (32, 25, 25, 32), (32, 19, 19, 32), (128, 17, 17, 64)]
                  for kind in ("backward", "centered")]
        cases += [((16, 100, 100, 16), dt, "backward")]
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jaxbn import _stats\n"
        f"for i, (shape, dtype, kind) in enumerate({cases!r}):\n"
        "    red = tuple(range(len(shape) - 1))\n"
        "    v = _stats.view(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)), red)\n"
        "    def f(x, dy, mean, v=v, kind=kind):\n"
        "        xv = v.of(x).astype(jnp.float32)\n"
        "        p = xv if kind == 'stats' else v.of(dy).astype(jnp.float32)\n"
        "        q = xv + v.bcast(-mean) if kind == 'centered' else xv\n"
        "        return _stats.paired_sums(p, p * q, v.red, cast=dtype != 'float32', any_size=kind != 'stats', run=v.runs)\n"
        "    f.__name__ = f'case{i}'\n"
        "    a = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))\n"
        "    jax.jit(f).lower(a, a, jax.ShapeDtypeStruct(v.fshape, jnp.float32)).compile()\n"
    )
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, (shape, _, _) in enumerate(cases):
        kernels = list(tmp_path.glob(f"*jit_case{i}.*_kernel_module.ir-with-opt.ll"))
        blocked = [p for p in kernels if "reduce_fusion" in p.name]  # the variadic blocked reduce
        assert blocked, (shape, [p.name for p in kernels])
        for p in blocked:
            ir = p.read_text()
            assert "x float>" in ir, (shape, p.name, "no vector code")
            assert "udiv" not in ir and "urem" not in ir, (shape, p.name, "a division per element")


def _reads_full_size(hlo: str, kernel_file: str, size: int) -> bool:
    """The fusion compiled to ``kernel_file`` reads an operand of ``size`` elements (not the block totals)."""
    fusion = kernel_file.split(".", 2)[2].removesuffix("_kernel_module.ir-with-opt.ll")
    called = re.search(rf"%{re.escape(fusion)} = .*calls=%([\w.-]+)", hlo).group(1)
    params = re.search(rf"%{re.escape(called)} \(([^)]*)\)", hlo).group(1)
    return any(math.prod(map(int, d.split(",") if d else [])) >= size for d in re.findall(r"\[([\d,]*)\]", params))


def test_fwdbwd_reductions_compile_to_vector_code_on_both_branches(tmp_path):
    """Every blocked reduce of a compiled fwd+bwd is vector code, on both sides of the run-time checks.

    The centered sums (data with a large offset) of inputs seen through a View
    were scalar code: the per-feature mean, tiled to the view's columns inside
    the branch, was read modulo C per element (fwd+bwd of (64, 28, 28, 8) with an
    offset of 100 standard deviations took 1.59x the time without it, 1.15x now).
    """
    cases = [((64, 28, 28, 8), "float32"), ((64, 8, 8, 16), "float32"), ((64, 24, 24, 6), "float32"),
             ((16, 28, 28, 4), "float32"), ((64, 28, 28, 8), "bfloat16"), ((64, 24, 24, 6), "bfloat16"),
             ((8, 28, 28, 32), "bfloat16")]
    # Masked inputs (a full-size boolean mask): their sums and count are blocked at any
    # size, as the selects they sum would otherwise be materialized for YNNPACK, in
    # blocks no larger than jaxbn._stats.MASKED_BLOCKS allows (blocks of W = 31, 19
    # or 17 rows, all the tiling ones, were scalar code; (64, 31, 31, 64) and
    # (128, 19, 19, 128) are above 2M elements).
    masked = [((64, 28, 28, 8), "float32"), ((64, 8, 8, 16), "float32"), ((4096, 512), "float32"),
              ((128, 28, 28, 32), "float32"), ((64, 24, 24, 6), "bfloat16"), ((8, 28, 28, 32), "bfloat16"),
              ((64, 31, 31, 64), "float32"), ((128, 19, 19, 128), "bfloat16"), ((32, 17, 17, 64), "bfloat16")]
    cases = [c + (False,) for c in cases] + [c + (True,) for c in masked]
    code = (
        "import jax, jax.numpy as jnp, jaxbn\n"
        f"for i, (shape, dtype, masked) in enumerate({cases!r}):\n"
        "    def f(x, w, m):\n"
        "        return jnp.sum((jaxbn.batch_norm(x, mask=m if masked else None)[0] * w).astype(jnp.float32))\n"
        "    f.__name__ = f'case{i}'\n"
        "    a = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))\n"
        "    jax.jit(jax.grad(f)).lower(a, a, jax.ShapeDtypeStruct(shape, jnp.bool_)).compile()\n"
    )
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, (shape, dtype, _) in enumerate(cases):
        (hlo,) = tmp_path.glob(f"*jit_case{i}.*after_optimizations.txt")
        hlo = hlo.read_text()
        kernels = [p for p in tmp_path.glob(f"*jit_case{i}.*_kernel_module.ir-with-opt.ll") if "reduce_fusion" in p.name]
        kernels = [p for p in kernels if _reads_full_size(hlo, p.name, math.prod(shape))]
        # the statistics and the backward sums, each on both sides of its check
        assert len(kernels) == 4, (shape, dtype, [p.name for p in kernels])
        for p in kernels:
            ir = p.read_text()
            assert "x float>" in ir, (shape, dtype, p.name, "no vector code")
            assert "udiv" not in ir and "urem" not in ir, (shape, dtype, p.name, "a division per element")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_gives_float32_statistics(dtype):
    x32 = jax.random.normal(jax.random.key(1), (64, 16), jnp.float32) * 3 + 5
    x = x32.astype(dtype)
    mom = jaxbn.moments(x)
    assert mom.mean.dtype == jnp.float32 and mom.var.dtype == jnp.float32
    np.testing.assert_allclose(mom.var, np.asarray(x.astype(jnp.float32), np.float64).var(0), rtol=1e-5)
    y, mom = jaxbn.batch_norm(x)
    assert y.dtype == dtype and mom.var.dtype == jnp.float32
    g = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, jnp.ones(16))[0].astype(jnp.float32) ** 3))(x)
    assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
    mean, var, _ = jaxbn.update_running_stats(jnp.zeros(16), jnp.ones(16), mom)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(4096, 512), (128, 28, 28, 32)])  # below and above PAIRED_MAX_SIZE
def test_half_precision_fwdbwd_makes_no_float32_copy(dtype, shape):
    """The float32 sums of half-precision x and dy (a half-precision model: y in x's dtype)
    cast them on the fly: no float32 copy of either is written. A cast operand of the
    run-time accuracy check (a lax.cond) and, above PAIRED_MAX_SIZE, XLA's YNNPACK
    reductions each materialized one (bfloat16 (4096, 512): 16 MiB of temporaries)."""
    from jaxbn import _stats

    def loss(x, scale, w):
        y, _ = jaxbn.batch_norm(x, scale)
        return jnp.sum(y.astype(jnp.float32) * w.astype(jnp.float32))

    c = shape[-1]
    args = (jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct((c,), dtype), jax.ShapeDtypeStruct(shape, dtype))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    f32_copy = math.prod(shape) * 4
    assert compiled.memory_analysis().temp_size_in_bytes < f32_copy / 8
    assert (math.prod(shape) > _stats.PAIRED_MAX_SIZE) == (shape == (128, 28, 28, 32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_half_precision_statistics_and_gradients_at_any_offset(dtype, offset):
    """Both sides of the run-time accuracy check on half-precision data (cast inside the
    check's branches): float32 results equal float64 ones computed from the same values."""
    x, w, _ = _offset_problem(offset)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    mean, var, dx, dscale, dbias = _np_fwdbwd(np.asarray(x.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)))

    def loss(x, scale, bias):
        y, mom = jaxbn.batch_norm(x, scale, bias)
        return jnp.sum(y.astype(jnp.float32) * w.astype(jnp.float32)), mom

    (gx, gs, gb), mom = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, jnp.ones(8), jnp.zeros(8))
    assert _rel(mom.var, var) < 3e-6 and np.max(np.abs(np.asarray(mom.mean, np.float64) - mean)) < 1e-5 * (1 + offset)
    assert _rel(gs, dscale) < 1e-4 and _rel(gb, dbias) < 3e-6
    assert gx.dtype == dtype and _rel(gx.astype(jnp.float32), dx) < 1e-2  # dx rounded to dtype


def test_complex_parameters_over_a_real_input_are_refused():
    """Their imaginary parts were dropped (with only a NumPy ComplexWarning): say what to do instead."""
    x, c = jnp.ones((8, 3)), jnp.ones(3, jnp.complex64) * (1 + 2j)
    calls = {
        "scale": lambda: jaxbn.batch_norm(x, c),
        "bias": lambda: jaxbn.batch_norm(x, None, c),
        "mean": lambda: jaxbn.normalize(x, c, jnp.ones(3)),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"`{name}` is complex .* but `x` is real"):
            call()
    for xx in (x, x.astype(jnp.complex64)):  # a variance is real, whatever x
        with pytest.raises(TypeError, match="`var` must be real"):
            jaxbn.normalize(xx, jnp.zeros(3), c)
    bn = jaxbn.BatchNorm(param_dtype=jnp.complex64)
    with pytest.raises(TypeError, match="`scale` is complex"):
        bn.init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(TypeError, match="`scale` is complex"):
        bn.init(jax.random.key(0), x, use_running_average=True)
    # The advice works: complex input, complex affine transform.
    xc = x.astype(jnp.complex64) + jnp.asarray(1j * np.arange(8.0), jnp.complex64)[:, None]
    y, _ = jaxbn.batch_norm(xc, c)
    ref, _ = jaxbn.batch_norm(xc)
    np.testing.assert_allclose(y, ref * c, rtol=1e-6)


def test_complex_input_under_strict_dtype_promotion():
    """jaxbn's own arithmetic on complex input mixed complex and real arrays (the statistics'
    inverse, counts, the merge's weights), which strict dtype promotion (this suite's, and
    equinox users') refused: every training-mode call and normalize failed."""
    rng = np.random.default_rng(0)
    xn = rng.normal(size=(16, 3)) + 1j * rng.normal(size=(16, 3)) + 3
    x = jnp.asarray(xn, jnp.complex64)
    c = jnp.asarray(np.array([1 + 2j, 0.5 - 1j, 2 + 0j]), jnp.complex64)
    mask = rng.random((16, 1)) < 0.7
    mean, var = xn.mean(0), (np.abs(xn - xn.mean(0)) ** 2).mean(0)
    y, mom = jaxbn.batch_norm(x, c, c)
    np.testing.assert_allclose(y, (xn - mean) / np.sqrt(var + 1e-5) * np.asarray(c) + np.asarray(c), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mom.var, var, rtol=1e-5)
    np.testing.assert_allclose(jaxbn.normalize(x, mom.mean, mom.var, c, c), y, rtol=1e-5, atol=1e-5)
    xm = np.where(mask, xn, np.nan)
    np.testing.assert_allclose(jaxbn.moments(x, mask=mask).mean, np.nanmean(xm, 0), rtol=1e-5)
    g = jax.grad(lambda x, s: jnp.sum(jnp.abs(jaxbn.batch_norm(x, s, mask=mask)[0]) ** 2), argnums=(0, 1))(x, c)
    assert all(bool(jnp.all(jnp.isfinite(t))) for t in g)
    pooled = jax.vmap(lambda x: jaxbn.batch_norm(x, axis_name="d")[1].var, axis_name="d")(x.reshape(4, 4, 3))
    np.testing.assert_allclose(pooled[0], var, rtol=1e-5)
    bn = jaxbn.BatchNorm(use_running_average=False, param_dtype=jnp.complex64)
    y_mod, _ = bn.init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y_mod, (xn - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="`renorm=True` needs a real `x`"):
        jaxbn.BatchNorm(use_running_average=False, renorm=True).init(jax.random.key(0), x)


def test_all_masked_batch_is_finite():
    x = jax.random.normal(jax.random.key(2), (8, 3))
    mask = jnp.zeros((8, 1), bool)
    y, mom = jaxbn.batch_norm(x, jnp.ones(3), jnp.zeros(3), mask=mask)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_array_equal(mom.count, 0)
    # A loss that ignores the masked-out outputs: zero gradient.
    g = jax.grad(lambda x: jnp.sum(jnp.where(mask, jaxbn.batch_norm(x, mask=mask)[0], 0)))(x)
    np.testing.assert_array_equal(g, 0)
    # One that uses them: y = x / sqrt(eps) there (no statistics), and so is its gradient.
    g = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, mask=mask)[0]))(x)
    np.testing.assert_allclose(g, np.full(x.shape, 1 / np.sqrt(1e-5)), rtol=1e-6)
    mean, var, _ = jaxbn.update_running_stats(jnp.full(3, 0.5), jnp.full(3, 2.0), mom)
    np.testing.assert_array_equal(mean, 0.5)
    np.testing.assert_array_equal(var, 2.0)


def test_update_running_stats_modes():
    rng = np.random.default_rng(4)
    batches = [rng.normal(i, 1 + i, (10, 3)).astype(np.float32) for i in range(4)]
    mean, var, count = jnp.zeros(3), jnp.ones(3), None
    cmean, cvar, ccount = jnp.zeros(3), jnp.ones(3), None
    ref_mean, ref_var = np.zeros(3), np.ones(3)
    for b in batches:
        mom = jaxbn.moments(b)
        mean, var, count = jaxbn.update_running_stats(mean, var, mom, momentum=0.9)
        ref_mean = 0.9 * ref_mean + 0.1 * b.mean(0)
        ref_var = 0.9 * ref_var + 0.1 * b.var(0)
        cmean, cvar, ccount = jaxbn.update_running_stats(
            cmean, cvar, mom, mode="cumulative", unbiased=True, count=ccount
        )
    assert count is None
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5)
    np.testing.assert_allclose(cmean, np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    np.testing.assert_allclose(cvar, np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=1e-5)
    np.testing.assert_array_equal(ccount, 4)


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.999, 1.0])
def test_debiased_running_stats_are_the_zero_debiased_ema(momentum):
    """mode="debiased" is Haiku's zero-debiased ema: hidden = m * hidden + (1 - m) * batch from
    hidden = 0, divided by 1 - m**t (float64 reference); the first batch replaces the initial
    values exactly, m = 1 gives the cumulative average (the limit), and a feature hidden by the
    mask in one batch is averaged over the batches it was seen in only."""
    rng = np.random.default_rng(11)
    batches = [rng.normal(3 * i, 1 + i, (12, 3)).astype(np.float32) for i in range(6)]
    masks = [np.ones((12, 3), bool) for _ in batches]
    masks[1][:, 2] = False  # feature 2 not seen in the second batch
    mean, var, count = jnp.full(3, 7.0), jnp.full(3, 5.0), None
    hidden_m, hidden_v, t = np.zeros(3), np.zeros(3), np.zeros(3)
    seen_m, seen_v = [], []
    for i, (b, mk) in enumerate(zip(batches, masks)):
        mom = jaxbn.moments(b, mask=mk)
        mean, var, count = jaxbn.update_running_stats(mean, var, mom, momentum=momentum, mode="debiased", count=count)
        if i == 0:
            np.testing.assert_array_equal(mean, mom.mean)
            np.testing.assert_array_equal(var, mom.var)
        bm = np.asarray(mom.mean, np.float64)
        bv = np.asarray(mom.var, np.float64)
        seen = np.asarray(mom.count) > 0
        hidden_m = np.where(seen, momentum * hidden_m + (1 - momentum) * bm, hidden_m)
        hidden_v = np.where(seen, momentum * hidden_v + (1 - momentum) * bv, hidden_v)
        t = t + seen
        seen_m.append(np.where(seen, bm, np.nan))
        seen_v.append(np.where(seen, bv, np.nan))
    if momentum == 1.0:
        ref_m, ref_v = np.nanmean(seen_m, 0), np.nanmean(seen_v, 0)
    else:
        ref_m, ref_v = hidden_m / (1 - momentum**t), hidden_v / (1 - momentum**t)
    np.testing.assert_array_equal(count, [6, 6, 5])
    np.testing.assert_allclose(mean, ref_m, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(var, ref_v, rtol=2e-6)


def test_complex_input_matches_flax_semantics():
    with jax.numpy_dtype_promotion("standard"):
        x = jax.random.normal(jax.random.key(0), (16, 3)) + 1j * jax.random.normal(jax.random.key(1), (16, 3))
        mom = jaxbn.moments(x)
        xn = np.asarray(x)
        np.testing.assert_allclose(mom.mean, xn.mean(0), rtol=1e-5)
        np.testing.assert_allclose(mom.var, (np.abs(xn - xn.mean(0)) ** 2).mean(0), rtol=1e-5)
        assert not jnp.iscomplexobj(mom.var)
        y, _ = jaxbn.batch_norm(x)
        np.testing.assert_allclose(y, (xn - xn.mean(0)) / np.sqrt(mom.var + 1e-5), rtol=1e-5, atol=1e-6)


def test_errors_name_the_argument():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="`axis`.*out of range"):
        jaxbn.batch_norm(x, axis=2)
    with pytest.raises(ValueError, match="`axis`.*more than once"):
        jaxbn.moments(jnp.ones((4, 3, 2)), axis=(1, -2))
    with pytest.raises(ValueError, match="`scale`.*\\(3,\\)"):
        jaxbn.batch_norm(x, jnp.ones(4))
    with pytest.raises(ValueError, match="`bias`"):
        jaxbn.normalize(x, jnp.zeros(3), jnp.ones(3), bias=jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="single element"):
        jaxbn.batch_norm(jnp.ones((1, 3)))
    with pytest.raises(TypeError, match="`x`.*floating"):
        jaxbn.batch_norm(jnp.ones((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="`mask`.*broadcast"):
        jaxbn.batch_norm(x, mask=jnp.ones((5, 1), bool))
    with pytest.raises(ValueError, match="`momentum`"):
        jaxbn.update_running_stats(jnp.zeros(3), jnp.ones(3), jaxbn.moments(x), momentum=1.5)
    with pytest.raises(ValueError, match="`epsilon`"):
        jaxbn.batch_norm(x, epsilon=0.0)
    with pytest.raises(ValueError, match="`mode`"):
        jaxbn.update_running_stats(jnp.zeros(3), jnp.ones(3), jaxbn.moments(x), mode="avg")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x: jaxbn.batch_norm([[1.0, 2.0]] * 4), TypeError, "`x` must be a JAX or NumPy array"),
        (lambda x: jaxbn.batch_norm(None), TypeError, "`x` must be a JAX or NumPy array"),
        (lambda x: jaxbn.batch_norm(x, [1.0] * 3), TypeError, "`scale` must be a JAX or NumPy array"),
        (lambda x: jaxbn.normalize(x, None, None), TypeError, "`mean` is required"),
        (lambda x: jaxbn.batch_norm(x, axis=None), TypeError, "`axis` must be an int"),
        (lambda x: jaxbn.batch_norm(x, axis=1.0), TypeError, "`axis` must be an int"),
        (lambda x: jaxbn.batch_norm(x, epsilon=None), TypeError, "`epsilon` must be a real number"),
        (lambda x: jaxbn.batch_norm(x, epsilon="1e-5"), TypeError, "`epsilon` must be a real number"),
        (lambda x: jaxbn.batch_norm(x, epsilon=np.full(3, 1e-5)), TypeError, "`epsilon` of batch_norm must be a concrete scalar"),
        (lambda x: jaxbn.batch_norm(x, stats_dtype=jnp.int32), TypeError, "`stats_dtype`"),
        (lambda x: jaxbn.batch_norm(x, mask=[0.3] * 3), TypeError, "`mask` must be a boolean or integer"),
        (lambda x: jaxbn.update_running_stats(jnp.zeros(3), jnp.ones(3), jaxbn.moments(x), momentum=None),
         TypeError, "running_average='cumulative'"),
        (lambda x: jaxbn.update_running_stats(jnp.zeros((3, 1)), jnp.ones(3), jaxbn.moments(x)), ValueError, "`mean`.*\\(3,\\)"),
        (lambda x: jaxbn.update_running_stats(jnp.zeros(3), jnp.ones(1), jaxbn.moments(x)), ValueError, "`var`.*\\(3,\\)"),
        (lambda x: jaxbn.update_running_stats(jnp.zeros(3), jnp.ones(3), jaxbn.moments(x), count=jnp.zeros(2, int)),
         ValueError, "`count`"),
        (lambda x: jaxbn.update_running_stats(jnp.zeros(3), jnp.ones(3), jaxbn.moments(x), mode="debiased", count=-1),
         ValueError, "`count`.*>= 0"),
        (lambda x: jaxbn.update_running_stats(jnp.zeros(3), jnp.ones(3), (jnp.zeros(3), jnp.ones(3))),
         TypeError, "`batch` must be a jaxbn.Moments"),
    ],
)
def test_bad_arguments_get_errors_that_name_them(call, error, message):
    """Non-arrays, None, wrong types and shapes: an error naming the argument, never an
    internal jnp error or a silently broadcast result ((3, 1) running means became (3, 3))."""
    with pytest.raises(error, match=message):
        call(jnp.ones((4, 3)))


def test_valid_scalars_and_axes_of_other_types_are_accepted():
    """bfloat16 and 0-d JAX/NumPy scalars for epsilon and momentum, NumPy axes (as flax takes them)."""
    x = jax.random.normal(jax.random.key(0), (8, 3, 2))
    y, _ = jaxbn.batch_norm(x, epsilon=jnp.bfloat16(1e-3), axis=np.array([1, 2]))
    y_ref, _ = jaxbn.batch_norm(x, epsilon=float(jnp.bfloat16(1e-3)), axis=(1, 2))
    np.testing.assert_array_equal(y, y_ref)
    # Under the tests' strict dtype promotion too: an array-valued epsilon takes the statistics' dtype.
    y = jaxbn.normalize(x, jnp.zeros((3, 2)), jnp.ones((3, 2)), axis=(1, 2), epsilon=jnp.bfloat16(1e-3))
    np.testing.assert_allclose(y, x / np.sqrt(1 + float(jnp.bfloat16(1e-3))), rtol=1e-6)
    bn = jaxbn.BatchNorm(epsilon=jnp.bfloat16(1e-3), renorm=True, renorm_momentum=jnp.bfloat16(0.5))
    v = bn.init(jax.random.key(0), x, True)
    bn.apply(v, x, False, mutable=["batch_stats"])
    mom = jaxbn.moments(x, axis=(1, 2))
    for m in (jnp.bfloat16(0.5), np.float32(0.5), jnp.asarray(0.5)):
        mean, _, _ = jaxbn.update_running_stats(jnp.zeros((3, 2)), jnp.ones((3, 2)), mom, momentum=m)
        np.testing.assert_allclose(mean, 0.5 * mom.mean, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_statistics_of_large_batches(dtype):
    """stats_dtype float16/bfloat16 (force_float32_reductions=False): counts are float32 and the
    sums accumulate in float32. In float16 the count and the sums overflowed past 65504 (NaN
    statistics, -inf outputs, inf gradients); in bfloat16 counts are not exact past 256."""
    x32 = jax.random.normal(jax.random.key(0), (70001, 2)) + 1
    x = x32.astype(dtype)
    y, mom = jaxbn.batch_norm(x, stats_dtype=dtype)
    assert mom.count.dtype == jnp.float32 and mom.mean.dtype == dtype and mom.var.dtype == dtype
    np.testing.assert_array_equal(mom.count, 70001)
    xd = np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(mom.mean, np.float64), xd.mean(0), rtol=1e-2)
    np.testing.assert_allclose(np.asarray(mom.var, np.float64), xd.var(0), rtol=1e-2)
    g = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, stats_dtype=dtype)[0].astype(jnp.float32) ** 3))(x)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32)))) and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
    # The debiased running average keeps its weights in float32: in bfloat16 a momentum of
    # 0.999 rounds to 1 (the cumulative average).
    mean, _, _ = jaxbn.update_running_stats(jnp.zeros(2, dtype), jnp.ones(2, dtype), mom, momentum=0.999,
                                            mode="debiased", count=jnp.full(2, 1000))
    w = (1 - 0.999) / (1 - 0.999**1001)
    np.testing.assert_allclose(np.asarray(mean, np.float64), w * np.asarray(mom.mean, np.float64), rtol=2e-2)


def test_traced_negative_count_cannot_make_running_stats_nan():
    f = jax.jit(lambda c: jaxbn.update_running_stats(jnp.zeros(3), jnp.ones(3), jaxbn.moments(jnp.arange(12.0).reshape(4, 3)),
                                                   mode="cumulative", count=c))
    mean, var, _ = f(jnp.full(3, -1))
    assert bool(jnp.all(jnp.isfinite(mean))) and bool(jnp.all(jnp.isfinite(var)))


def test_errors_raised_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="`scale`"):
        jax.jit(lambda x, s: jaxbn.batch_norm(x, s))(jnp.ones((4, 3)), jnp.ones(2))


def _full_size_ops(compiled_text: str, size: int) -> int:
    """Instructions of a compiled XLA program (inside its fusions too) that compute a full-size array."""
    import math
    import re

    n = 0
    for m in re.finditer(r"= f32\[([\d,]+)\]\{[^}]*\} ([\w-]+)\(", compiled_text):
        dims = [int(d) for d in m.group(1).split(",")]
        if math.prod(dims) == size and m.group(2) not in ("parameter", "bitcast", "fusion", "tuple"):
            n += 1
    return n


@pytest.mark.parametrize("shape", [(16, 8, 8, 32), (64, 32)])
def test_layers_in_a_row_are_not_recomputed_more_than_flax(shape):
    # BN -> relu -> BN -> ...: nothing but elementwise ops between the layers, so
    # XLA fuses (and recomputes) a layer's output in the consumers of the next
    # layer, for flax.linen.BatchNorm too: the full-size values computed grow
    # with the square of the depth. A reshape of BN's input once let XLA do that
    # in every later layer (4 layers of (128, 28, 28, 32) ran 3x slower than
    # flax's). The compiled fwd+bwd must compute about as many full-size values
    # as flax's (measured: 256 against 240 and 287 at depth 4; the blocked sums
    # of jaxbn._stats.paired_sums fuse the relu of the layer before, which costs
    # arithmetic, not memory traffic), and the count must grow no faster with
    # the depth than flax's. (Inputs with at most 16 features are reduced
    # through a reshape on purpose and are not covered: see jaxbn._stats.View.)
    import flax.linen as nn

    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)

    def program_size(module, depth):
        bn = module(use_running_average=False)
        v = bn.init(jax.random.key(0), x)

        def loss(x, v):
            for _ in range(depth):
                x = jax.nn.relu(bn.apply(v, x, mutable=["batch_stats"])[0])
            return jnp.sum(x)

        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, v).compile().as_text()
        return _full_size_ops(text, x.size)

    ratio = {d: program_size(jaxbn.BatchNorm, d) / program_size(nn.BatchNorm, d) for d in (2, 4, 6)}
    assert ratio[4] <= 1.1, ratio
    assert ratio[6] <= ratio[2] + 0.05, ratio


def test_backward_sums_exact_when_every_feature_is_offset():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8192, 8)) + 1e3).astype(np.float32)
    w = rng.standard_normal((8192, 8)).astype(np.float32)

    def loss(s):
        y, mom = jaxbn.batch_norm(x, s)
        return jnp.sum(y * w), mom

    gs, mom = jax.jit(jax.grad(loss, has_aux=True))(jnp.ones(8))
    # Reference centered on the float32 mean the kernel returned: no error of the data's own.
    xd, wd = x.astype(np.float64), w.astype(np.float64)
    inv = 1 / np.sqrt(np.asarray(mom.var, np.float64) + 1e-5)
    ref = (wd * (xd - np.asarray(mom.mean, np.float64))).sum(0) * inv
    assert np.max(np.abs(np.asarray(gs, np.float64) - ref)) / np.max(np.abs(ref)) < 1e-5


def test_fast_variance_is_never_negative():
    rng = np.random.default_rng(3)
    x = (1e3 + 1e-3 * rng.standard_normal((4096, 8))).astype(np.float32)
    for mask in (None, jnp.asarray(rng.random((4096, 1)) < 0.5)):
        mom = jaxbn.moments(x, fast_variance=True, mask=mask)
        assert bool(jnp.all(mom.var >= 0))
    y, mom = jaxbn.batch_norm(x, fast_variance=True)
    assert bool(jnp.all(mom.var >= 0)) and bool(jnp.all(jnp.isfinite(y)))


def test_integer_masks_are_read_as_nonzero_and_float_masks_refused():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    keep = rng.random((64, 1)) < 0.6
    ref = jaxbn.moments(x, mask=keep)
    got = jaxbn.moments(x, mask=keep.astype(np.int32) * 3)
    np.testing.assert_array_equal(got.mean, ref.mean)
    np.testing.assert_array_equal(got.count, ref.count)
    with pytest.raises(TypeError, match="`mask` must be a boolean or integer array"):
        jaxbn.moments(x, mask=keep.astype(np.float32))
