"""jaxbn.nnx.BatchNorm: a drop-in for flax.nnx.BatchNorm with the options of jaxbn.BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

import jaxbn
from jaxbn import nnx as jbn

STATS = ("mean", "var", "count", "renorm_mean", "renorm_std")


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _batches(shape, n=3, seed=0):
    """Batches with drifting means and scales, so running statistics move."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=shape) * (1.5 + i) + 0.7 * i - 0.3, jnp.float32) for i in range(n)]


def _normal(shape, seed, loc=0.0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, size=shape), jnp.float32)


def _state_shapes(m):
    return jax.tree.map(lambda v: (v.shape, v.dtype), nnx.to_pure_dict(nnx.state(m)))


def _stats(m):
    return {k: np.asarray(getattr(m, k)[...]) for k in STATS if getattr(m, k, None) is not None}


# --- drop-in for flax.nnx.BatchNorm ------------------------------------------------------


@pytest.mark.parametrize(
    "axis, shape, fast",
    [(-1, (8, 5, 5, 6), False), (1, (8, 6, 5, 5), False), (-1, (8, 5, 5, 6), None)],
)
def test_matches_nnx_batchnorm_over_training_steps_and_in_eval(axis, shape, fast):
    kw = {"axis": axis, "momentum": 0.9, "epsilon": 1e-3, "rngs": nnx.Rngs(0)}
    ref = nnx.BatchNorm(6, use_fast_variance=True if fast is None else fast, **kw)
    ours = jbn.BatchNorm(6, **kw)  # fast=None: nnx's default (fast) vs ours (stable)
    assert _state_shapes(ours) == _state_shapes(ref)
    assert set(nnx.to_pure_dict(nnx.state(ours))) == {"scale", "bias", "mean", "var"}
    tol = {"rtol": 2e-5, "atol": 2e-5} if fast is None else {"rtol": 1e-5, "atol": 1e-5}
    call = nnx.jit(lambda m, x: m(x))
    for x in _batches(shape):
        _close(call(ours, x), call(ref, x), **tol)
        _close(ours.mean[...], ref.mean[...], **tol)
        _close(ours.var[...], ref.var[...], **tol)
    ref.eval()
    ours.eval()
    assert ours.use_running_average is True
    x = _batches(shape, 1, seed=5)[0]
    before = _stats(ours)
    _close(call(ours, x), call(ref, x), **tol)
    jax.tree.map(np.testing.assert_array_equal, _stats(ours), before)  # eval changes nothing


def test_state_moves_between_nnx_and_jaxbn():
    x = _batches((16, 4))[0]
    ref = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    ref(x)
    ours = jbn.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(ref))
    _close(ours(x), ref(x, use_running_average=True))


def test_mode_toggles_view_and_call_precedence():
    x = _batches((16, 4))[0]
    bn = jbn.BatchNorm(4, rngs=nnx.Rngs(0))
    bn.mean[...] = jnp.full(4, 0.5)
    bn.var[...] = jnp.full(4, 4.0)
    expect = (x - 0.5) / jnp.sqrt(4.0 + 1e-5)
    bn.eval()
    _close(bn(x), expect)
    np.testing.assert_array_equal(bn.mean[...], 0.5)
    view = nnx.view(bn, use_running_average=False)
    assert view.use_running_average is False and bn.use_running_average is True
    bn.train()
    assert bn.use_running_average is False
    _close(bn(x, use_running_average=True), expect)  # the call argument wins, as in nnx
    np.testing.assert_array_equal(bn.mean[...], 0.5)
    bn(x)
    assert not np.allclose(bn.mean[...], 0.5)
    none = jbn.BatchNorm(4, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average"):
        none(x)
    _close(none(x, True), x / jnp.sqrt(1 + 1e-5))


def test_stable_variance_where_nnx_default_fails():
    x = _normal((256, 4), 3, loc=1e4)
    ours = jbn.BatchNorm(4, momentum=0.0, rngs=nnx.Rngs(0))
    ref = nnx.BatchNorm(4, momentum=0.0, rngs=nnx.Rngs(0))
    ours(x), ref(x)
    true = np.asarray(x, np.float64).var(0)
    assert np.max(np.abs(ours.var[...] / true - 1)) < 1e-3
    assert np.max(np.abs(ref.var[...] / true - 1)) > 1e-2  # nnx's one-pass default


def test_dtypes_and_nnx_promotion_on_request():
    x = _batches((16, 4))[0].astype(jnp.bfloat16)
    bn = jbn.BatchNorm(4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert bn(x).dtype == jnp.bfloat16
    assert bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32
    assert jbn.BatchNorm(4, rngs=nnx.Rngs(0))(x).dtype == jnp.float32  # bf16 x, f32 params
    half = {"param_dtype": jnp.bfloat16, "rngs": nnx.Rngs(0)}
    assert jbn.BatchNorm(4, **half)(x).dtype == jnp.bfloat16
    with jax.numpy_dtype_promotion("standard"):
        ref = nnx.BatchNorm(4, use_fast_variance=False, **half)
        ours = jbn.BatchNorm(4, promote_dtype=nnx_dtypes.promote_dtype, **half)
        y_ref, y_ours = ref(x), ours(x)
    assert y_ours.dtype == y_ref.dtype == jnp.float32
    _close(y_ours, y_ref, rtol=1e-2, atol=1e-2)
    # Integer input: rejected by default, promoted (as by nnx) when asked.
    xi = jnp.arange(32, dtype=jnp.int32).reshape(8, 4) % 5
    with pytest.raises(TypeError):
        jbn.BatchNorm(4, rngs=nnx.Rngs(0))(xi)
    with jax.numpy_dtype_promotion("standard"):
        y_ref = nnx.BatchNorm(4, use_fast_variance=False, rngs=nnx.Rngs(0))(xi)
        y_ours = jbn.BatchNorm(4, promote_dtype=nnx_dtypes.promote_dtype, rngs=nnx.Rngs(0))(xi)
    assert y_ours.dtype == y_ref.dtype == jnp.float32
    _close(y_ours, y_ref)


# --- same computation as jaxbn.linen.BatchNorm -----------------------------------------

MASK = (jnp.arange(8) < 6)[:, None, None, None]
OPTIONS = {
    "ema": {},
    "cumulative_unbiased": {"running_average": "cumulative", "unbiased_running_var": True},
    "debiased": {"running_average": "debiased", "momentum": 0.8},
    "renorm": {"renorm": True, "renorm_clipping": {"rmax": 1.3, "rmin": 0.8, "dmax": 0.4}, "renorm_momentum": 0.8},
    "ghost": {"virtual_batch_size": 4},
    "mask": {},
    "frozen": {"frozen": True},
    "adjustment": {"adjustment": lambda s: (jnp.full(s, 1.2), jnp.full(s, -0.1))},
    "tuple_axis": {"axis": (1, 3), "momentum": 0.5},
    "tuple_axis_reversed": {"axis": (3, 1), "momentum": 0.5},  # num_features in axis order: (4, 3)
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_linen_outputs_stats_and_gradients(name):
    opts = OPTIONS[name]
    shape = (8, 3, 2, 4)
    mask = MASK if name == "mask" else None
    axis = opts.get("axis", -1)
    nf = {"tuple_axis": (3, 4), "tuple_axis_reversed": (4, 3)}.get(name, 4)
    lin = jaxbn.BatchNorm(**opts)
    v = jax.eval_shape(lambda x: lin.init(jax.random.key(0), x, False), jnp.zeros(shape))
    fs = v["params"]["scale"].shape
    params = {"scale": _normal(fs, 1, 1.0, 0.3), "bias": _normal(fs, 2, 0.0, 0.2)}
    stats = {k: jnp.zeros(s.shape, s.dtype) for k, s in v["batch_stats"].items()}
    stats.update(mean=_normal(fs, 3, 0.0, 0.1), var=1 + jnp.abs(_normal(fs, 4)))
    if "renorm_std" in stats:
        stats.update(renorm_mean=_normal(fs, 5, 0.0, 0.1), renorm_std=1 + jnp.abs(_normal(fs, 6)))
    ours = jbn.BatchNorm(nf, **{"momentum": 0.9, **opts}, rngs=nnx.Rngs(0))
    assert ours.mean[...].shape == ours.scale[...].shape == fs  # the linen layout, whatever the order of axis
    lin = jaxbn.BatchNorm(**{"momentum": 0.9, **opts})
    nnx.update(ours, {"scale": params["scale"], "bias": params["bias"], **stats})
    assert set(_stats(ours)) == set(stats)
    w = _normal(shape, 7)

    def lin_loss(p, x, stats):
        y, upd = lin.apply({"params": p, "batch_stats": stats}, x, False, mask=mask, mutable=["batch_stats"])
        return jnp.sum(w * y), (y, upd["batch_stats"])

    def nnx_loss(m, x):
        y = m(x, mask=mask)
        return jnp.sum(w * y), y

    lin_step = jax.jit(jax.value_and_grad(lin_loss, (0, 1), has_aux=True))
    nnx_step = nnx.jit(nnx.value_and_grad(nnx_loss, argnums=(0, 1), has_aux=True))
    for x in _batches(shape):
        (_, (y_l, stats)), (gp_l, gx_l) = lin_step(params, x, stats)
        (_, y_o), (gp_o, gx_o) = nnx_step(ours, x)
        _close(y_o, y_l)
        _close(gx_o, gx_l, rtol=1e-4, atol=1e-5)
        _close(gp_o["scale"][...], gp_l["scale"], rtol=1e-4, atol=1e-4)
        _close(gp_o["bias"][...], gp_l["bias"], rtol=1e-4, atol=1e-4)
        got = _stats(ours)
        assert set(got) == set(stats)
        for k in stats:
            _close(got[k], stats[k])
    # Evaluation mode agrees too.
    x = _batches(shape, 1, seed=3)[0]
    y_l = jax.jit(lambda v, x: lin.apply(v, x, True))({"params": params, "batch_stats": stats}, x)
    _close(nnx.jit(lambda m, x: m(x, use_running_average=True))(ours, x), y_l)
    if axis != -1:
        assert ours.mean[...].shape == (3, 4)


def test_adjustment_rng_comes_from_the_adjustment_stream():
    seen = []

    def adjust(shape, rng):
        seen.append(rng)
        return jnp.ones(shape), jnp.zeros(shape)

    x = _batches((8, 4))[0]
    jbn.BatchNorm(4, adjustment=adjust, rngs=nnx.Rngs(0))(x)
    bn = jbn.BatchNorm(4, adjustment=adjust, rngs=nnx.Rngs(0, adjustment=1))
    bn(x), bn(x)
    assert seen[0] is None
    assert not np.array_equal(jax.random.key_data(seen[1]), jax.random.key_data(seen[2]))
    bn.eval()
    bn(x)
    assert len(seen) == 3  # inference never adjusts


# --- transforms ----------------------------------------------------------------------


def test_jit_train_step_matches_linen():
    xs = _batches((16, 6))
    t = _normal((16, 6), 1)
    opts = {"momentum": 0.8, "running_average": "cumulative"}

    @nnx.jit
    def step(m, x):
        val, g = nnx.value_and_grad(lambda m: jnp.mean((t - m(x)) ** 2))(m)
        nnx.update(m, jax.tree.map(lambda p, d: p - 0.1 * d, nnx.state(m, nnx.Param), g))
        return val

    lin = jaxbn.BatchNorm(**opts)

    @jax.jit
    def lin_step(v, x):
        def loss(p):
            y, upd = lin.apply({"params": p, "batch_stats": v["batch_stats"]}, x, False, mutable=["batch_stats"])
            return jnp.mean((t - y) ** 2), upd
        (val, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        return val, {"params": jax.tree.map(lambda p, d: p - 0.1 * d, v["params"], g), **upd}

    bn = jbn.BatchNorm(6, **opts, rngs=nnx.Rngs(0))
    v = jax.jit(lambda x: lin.init(jax.random.key(0), x, False))(xs[0])
    for x in xs:
        val_l, v = lin_step(v, x)
        _close(step(bn, x), val_l)
    for k in ("scale", "bias"):
        _close(getattr(bn, k)[...], v["params"][k])
    for k in ("mean", "var", "count"):
        _close(getattr(bn, k)[...], v["batch_stats"][k])
    np.testing.assert_array_equal(bn.count[...], 3)


def test_vmap_with_axis_name_equals_global_batch():
    x = _batches((16, 5), 1)[0]
    mask = jnp.arange(16)[:, None] % 7 != 3  # unequal valid counts per device
    w = _normal((16, 5), 2)
    glob = jbn.BatchNorm(5, momentum=0.8, rngs=nnx.Rngs(0))
    mapped = jbn.BatchNorm(5, momentum=0.8, axis_name="batch", rngs=nnx.Rngs(0))
    vcall = nnx.vmap(lambda m, x, k: m(x, mask=k), in_axes=(None, 0, 0), axis_name="batch")

    def g_loss(m, x):
        return jnp.sum(w * m(x, mask=mask))

    def v_loss(m, x):
        return jnp.sum(w.reshape(4, 4, 5) * vcall(m, x, mask.reshape(4, 4, 1)))

    gx_g = nnx.jit(nnx.grad(g_loss, argnums=1))(glob, x)
    gx_v = nnx.jit(nnx.grad(v_loss, argnums=1))(mapped, x.reshape(4, 4, 5))
    _close(gx_v.reshape(16, 5), gx_g, rtol=1e-4, atol=1e-5)
    _close(mapped.mean[...], glob.mean[...])
    _close(mapped.var[...], glob.var[...])
    y_v = nnx.jit(vcall)(mapped, x.reshape(4, 4, 5), mask.reshape(4, 4, 1))
    _close(y_v.reshape(16, 5), glob(x, mask=mask))
    _close(mapped.mean[...], glob.mean[...])
    # The StateAxes spelling of the nnx docs (everything broadcast) gives the same.
    axes = nnx.StateAxes({(nnx.Param, nnx.BatchStat): None})
    y_s = nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(axes, 0), axis_name="batch"))(mapped, x.reshape(4, 4, 5))
    _close(y_s.reshape(16, 5), nnx.jit(lambda m, x: m(x))(glob, x))
    _close(mapped.var[...], glob.var[...])


def test_eval_shape():
    abstract = nnx.eval_shape(lambda: jbn.BatchNorm(6, renorm=True, rngs=nnx.Rngs(0)))
    shapes = jax.tree.map(lambda v: v.shape, nnx.to_pure_dict(nnx.state(abstract)))
    assert shapes == {k: (6,) for k in ("scale", "bias", "mean", "var", "renorm_mean", "renorm_std")}
    bn = jbn.BatchNorm(6, rngs=nnx.Rngs(0))
    out = nnx.eval_shape(lambda m, x: m(x), bn, jax.ShapeDtypeStruct((4, 3, 6), jnp.bfloat16))
    assert out.shape == (4, 3, 6) and out.dtype == jnp.float32
    np.testing.assert_array_equal(bn.mean[...], 0)


# --- frozen, masks, errors -------------------------------------------------------------


def test_frozen_never_updates_but_gradients_flow():
    bn = jbn.BatchNorm(6, frozen=True, rngs=nnx.Rngs(0))
    bn.mean[...] = jnp.linspace(-1, 1, 6)
    bn.var[...] = jnp.linspace(0.5, 2, 6)
    before = nnx.to_pure_dict(nnx.clone(nnx.state(bn, nnx.BatchStat)))

    @nnx.jit
    def step(m, x):
        gm, gx = nnx.grad(lambda m, x: jnp.sum(m(x) ** 3), argnums=(0, 1))(m, x)
        nnx.update(m, jax.tree.map(lambda p, d: p - 0.01 * d, nnx.state(m, nnx.Param), gm))
        return gx, gm

    for x in _batches((16, 6)):
        gx, gm = step(bn, x)
        assert bool(jnp.all(gx != 0)) and bool(jnp.all(gm["scale"][...] != 0))
    after = nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    # The input gradient is that of the affine inference map.
    expect = 3 * bn(x) ** 2 * bn.scale[...] / jnp.sqrt(bn.var[...] + 1e-5)
    _close(nnx.grad(lambda m, x: jnp.sum(m(x) ** 3), argnums=1)(bn, x), expect, rtol=1e-4)


def test_all_masked_batch_leaves_running_stats_unchanged():
    x = _batches((16, 3, 3))[0]
    for opts in ({}, {"running_average": "cumulative"}, {"renorm": True}):
        bn = jbn.BatchNorm(3, **opts, rngs=nnx.Rngs(0))
        before = nnx.to_pure_dict(nnx.clone(nnx.state(bn, nnx.BatchStat)))
        y = nnx.jit(lambda m, x, k: m(x, mask=k))(bn, x, jnp.zeros((16, 1, 1), bool))
        assert bool(jnp.all(jnp.isfinite(y)))
        jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat)), before)


def test_complex_input_keeps_a_complex_running_mean():
    """As in linen (and flax.linen): writing the complex batch mean in place dropped its imaginary part."""
    x = jax.random.normal(jax.random.key(0), (16, 4)).astype(jnp.complex64) + jnp.complex64(3j)
    with jax.numpy_dtype_promotion("standard"):  # complex input with real parameters
        bn = jbn.BatchNorm(4, momentum=0.0, use_running_average=False, rngs=nnx.Rngs(0))
        bn(x)
        lin = jaxbn.BatchNorm(momentum=0.0, use_running_average=False)
        _, upd = lin.apply(lin.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    np.testing.assert_allclose(bn.mean[...], np.asarray(x).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.mean[...], upd["batch_stats"]["mean"], rtol=1e-6)


def test_renorm_clipping_takes_array_scalars():
    """Array scalars in renorm_clipping (as linen takes them) were refused as data in a static attribute."""
    x = jax.random.normal(jax.random.key(0), (8, 4))
    clip = {"rmax": jnp.asarray(2.0), "dmax": np.array(3.0)}
    bn = jbn.BatchNorm(4, renorm=True, renorm_clipping=clip, use_running_average=False, rngs=nnx.Rngs(0))
    lin = jaxbn.BatchNorm(renorm=True, renorm_clipping=clip, use_running_average=False)
    y_lin, _ = lin.apply(lin.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    np.testing.assert_allclose(bn(x), y_lin, rtol=1e-6)


def test_running_variance_of_the_wrong_shape_is_rejected():
    bn = jbn.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0))
    bn.var = nnx.BatchStat(jnp.ones((1,)))
    with pytest.raises(ValueError, match="`batch_stats/var` has shape \\(1,\\)"):
        bn(jnp.ones((8, 4)))


def test_argument_errors_name_the_argument():
    r = nnx.Rngs(0)
    x = jnp.ones((8, 4))
    bad = [
        ({"momentum": -0.1}, "`momentum`"),
        ({"momentum": 1.5}, "`momentum`"),
        ({"epsilon": 0.0}, "`epsilon`"),
        ({"axis": (0, 0)}, "`axis`"),
        ({"axis": (0, 1)}, "`axis`"),  # two axes, one size
        ({"axis": "x"}, "`axis`"),
        ({"virtual_batch_size": 0}, "`virtual_batch_size`"),
        ({"virtual_batch_size": 2.5}, "`virtual_batch_size`"),
        ({"running_average": "mean"}, "`running_average`"),
        ({"renorm": True, "renorm_momentum": 2.0}, "`renorm_momentum`"),
        ({"renorm": True, "renorm_clipping": {"rmax": 0.5}}, "`renorm_clipping`"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            jbn.BatchNorm(4, **kw, rngs=r)
    with pytest.raises(ValueError, match="`num_features`"):
        jbn.BatchNorm(0, rngs=r)
    # Checks that need the input run at call time.
    with pytest.raises(ValueError, match="`axis`"):
        jbn.BatchNorm(4, axis=2, rngs=r)(x)
    with pytest.raises(ValueError, match="`virtual_batch_size`"):
        jbn.BatchNorm(4, virtual_batch_size=3, rngs=r)(x)
    with pytest.raises(ValueError, match="`num_features`"):
        jbn.BatchNorm(5, rngs=r)(x)
    with pytest.raises(ValueError, match=r"`num_features`=\(3, 4\) along `axis`=\(3, 1\).*sizes \(4, 2\)"):
        jbn.BatchNorm((3, 4), axis=(3, 1), rngs=r)(jnp.ones((8, 2, 5, 4)))
    with pytest.raises(ValueError, match="depends on its rank"):  # rank 2: (1, 0); rank 4: (1, 2)
        jbn.BatchNorm((3, 4), axis=(1, -2), rngs=r)
    assert jbn.BatchNorm((3, 4), axis=(-1, 1), rngs=r).mean[...].shape == (4, 3)  # 1 < rank - 1 always
    with pytest.raises(ValueError, match="single element"):
        jbn.BatchNorm(4, rngs=r)(jnp.ones((1, 4)))
