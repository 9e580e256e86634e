"""Batch renormalization, ghost batches, adjustment and frozen layers (jaxbn.BatchNorm options)."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn


@contextlib.contextmanager
def x64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def _batches(k=5, shape=(16, 3)):
    rng = np.random.default_rng(0)
    # Drifting distributions so that r and d hit their clipping bounds.
    return [rng.normal(0.8 * i, 1 + 0.7 * i, shape).astype(np.float32) for i in range(k)]


def test_renorm_matches_numpy_algorithm_step_by_step():
    clip = {"rmax": 1.5, "rmin": 0.6, "dmax": 0.5}
    eps, mom, rmom = 1e-3, 0.9, 0.8
    bn = jaxbn.BatchNorm(renorm=True, renorm_clipping=clip, renorm_momentum=rmom, momentum=mom, epsilon=eps)
    batches = _batches()
    v = bn.init(jax.random.key(0), batches[0], False)
    assert set(v["batch_stats"]) == {"mean", "var", "renorm_mean", "renorm_std"}
    gamma, beta = np.array([1.5, 0.5, 1.0]), np.array([0.1, -0.2, 0.3])
    v = {"params": {"scale": jnp.asarray(gamma, jnp.float32), "bias": jnp.asarray(beta, jnp.float32)},
         "batch_stats": v["batch_stats"]}
    mu_mov, sd_mov, run_mean, run_var = np.zeros(3), np.ones(3), np.zeros(3), np.ones(3)
    clipped = False
    for x in batches:
        xd = x.astype(np.float64)
        mu_b, var_b = xd.mean(0), xd.var(0)
        sd_b = np.sqrt(var_b + eps)
        r_raw, d_raw = sd_b / sd_mov, (mu_b - mu_mov) / sd_mov
        r, d = np.clip(r_raw, clip["rmin"], clip["rmax"]), np.clip(d_raw, -clip["dmax"], clip["dmax"])
        clipped |= bool(np.any(r != r_raw) or np.any(d != d_raw))
        expect = ((xd - mu_b) / sd_b * r + d) * gamma + beta
        mu_mov += (1 - rmom) * (mu_b - mu_mov)
        sd_mov += (1 - rmom) * (sd_b - sd_mov)
        run_mean = mom * run_mean + (1 - mom) * mu_b
        run_var = mom * run_var + (1 - mom) * var_b

        y, upd = bn.apply(v, x, False, mutable=["batch_stats"])
        v = {"params": v["params"], **upd}
        np.testing.assert_allclose(y, expect, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(upd["batch_stats"]["renorm_mean"], mu_mov, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(upd["batch_stats"]["renorm_std"], sd_mov, rtol=1e-5)
        np.testing.assert_allclose(upd["batch_stats"]["mean"], run_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(upd["batch_stats"]["var"], run_var, rtol=1e-5)
    assert clipped
    # Inference is unchanged by renorm: running statistics only.
    y_inf = bn.apply(v, batches[0], True)
    np.testing.assert_allclose(y_inf, (batches[0] - run_mean) / np.sqrt(run_var + eps) * gamma + beta, rtol=1e-4, atol=1e-5)


def test_renorm_gradients_hold_r_and_d_constant():
    with x64():
        clip = {"rmax": 1.2, "dmax": 0.3}
        x = jnp.asarray(_batches(2)[1], jnp.float64)
        bn = jaxbn.BatchNorm(renorm=True, renorm_clipping=clip, param_dtype=jnp.float64, dtype=jnp.float64)
        v = bn.init(jax.random.key(0), x, False)
        stats = {**v["batch_stats"], "renorm_mean": jnp.full(3, 0.4), "renorm_std": jnp.full(3, 0.9)}
        params = {"scale": jnp.array([1.5, 0.5, 1.0]), "bias": jnp.array([0.1, -0.2, 0.3])}
        w = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))

        def ours(x, p):
            y, _ = bn.apply({"params": p, "batch_stats": stats}, x, False, mutable=["batch_stats"])
            return jnp.sum(jnp.tanh(y) * w)

        mu, sd = jnp.mean(x, 0), jnp.sqrt(jnp.var(x, 0) + 1e-5)
        r = jnp.clip(sd / 0.9, 0, 1.2)
        d = jnp.clip((mu - 0.4) / 0.9, -0.3, 0.3)

        def ref(x, p):
            m, s = jnp.mean(x, 0), jnp.sqrt(jnp.var(x, 0) + 1e-5)
            y = ((x - m) / s * r + d) * p["scale"] + p["bias"]
            return jnp.sum(jnp.tanh(y) * w)

        g1 = jax.grad(ours, argnums=(0, 1))(x, params)
        g2 = jax.grad(ref, argnums=(0, 1))(x, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10), g1, g2)


def test_ghost_batches_normalize_sub_batches_separately():
    x = jnp.asarray(np.random.default_rng(2).normal(2, 3, (12, 4, 3)), jnp.float32)
    bn = jaxbn.BatchNorm(virtual_batch_size=4, momentum=0.0)
    v = bn.init(jax.random.key(0), x, False)
    y, upd = bn.apply(v, x, False, mutable=["batch_stats"])
    parts = [jaxbn.batch_norm(x[i : i + 4])[0] for i in range(0, 12, 4)]
    np.testing.assert_allclose(y, jnp.concatenate(parts), rtol=1e-5, atol=1e-5)
    sub = [np.asarray(x[i : i + 4], np.float64).reshape(-1, 3) for i in range(0, 12, 4)]
    np.testing.assert_allclose(upd["batch_stats"]["mean"], np.mean([s.mean(0) for s in sub], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], np.mean([s.var(0) for s in sub], 0), rtol=1e-5)
    # Inference never splits the batch, whatever its size.
    v2 = {"params": v["params"], **upd}
    xi = x[:7]
    np.testing.assert_allclose(
        bn.apply(v2, xi, True), jaxbn.BatchNorm().apply(v2, xi, True), rtol=0, atol=0
    )
    # Gradients equal those of normalizing the sub-batches separately.
    g = jax.grad(lambda x: jnp.sum(jnp.sin(bn.apply(v, x, False, mutable=["batch_stats"])[0])))(x)
    g_ref = jax.grad(lambda x: sum(jnp.sum(jnp.sin(jaxbn.batch_norm(x[i : i + 4])[0])) for i in range(0, 12, 4)))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_ghost_batch_size_must_divide_the_batch():
    bn = jaxbn.BatchNorm(virtual_batch_size=5)
    x = jnp.ones((12, 3))
    # init takes whatever example it is given (here one row), as flax's does ...
    v = bn.init(jax.random.key(0), x[:1], False)
    # ... but a training call checks the batch.
    with pytest.raises(ValueError, match="`virtual_batch_size`=5"):
        bn.apply(v, x, False, mutable=["batch_stats"])


def test_ghost_batches_with_a_mask_weight_each_ghost_by_its_count():
    """Running statistics average the ghosts weighted by their unmasked counts, not equally."""
    x = jnp.asarray(np.random.default_rng(6).normal(3, 2, (8, 3)), jnp.float32)
    keep = np.array([1, 0, 0, 0, 1, 1, 1, 1], bool)[:, None]  # ghost 0 keeps 1 row, ghost 1 all 4
    bn = jaxbn.BatchNorm(virtual_batch_size=4, momentum=0.0)
    v = bn.init(jax.random.key(0), x, False)
    _, upd = bn.apply(v, x, False, mask=jnp.asarray(keep), mutable=["batch_stats"])
    xd = np.asarray(x, np.float64)
    g0, g1 = xd[:1], xd[4:]
    want_mean = (1 * g0.mean(0) + 4 * g1.mean(0)) / 5
    want_var = (1 * g0.var(0) + 4 * g1.var(0)) / 5
    np.testing.assert_allclose(upd["batch_stats"]["mean"], want_mean, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], want_var, rtol=1e-5)


def test_ghost_batches_unbiased_running_var_unbiases_each_ghost():
    """n/(n-1) applies to each ghost's own n, not to the whole batch's."""
    x = jnp.asarray(np.random.default_rng(5).normal(0, 2, (12, 3, 2)), jnp.float32)
    bn = jaxbn.BatchNorm(virtual_batch_size=4, momentum=0.0, unbiased_running_var=True)
    v = bn.init(jax.random.key(0), x, False)
    _, upd = bn.apply(v, x, False, mutable=["batch_stats"])
    ghosts = [np.asarray(x[i : i + 4], np.float64).reshape(-1, 2) for i in range(0, 12, 4)]
    want = np.mean([g.var(0, ddof=1) for g in ghosts], 0)
    np.testing.assert_allclose(upd["batch_stats"]["var"], want, rtol=1e-5)


def test_ghost_batches_with_a_feature_shaped_adjustment_on_axis_1():
    """(C,)-shaped adjustment values follow the feature axis, wherever it is."""
    x = jnp.asarray(np.random.default_rng(4).normal(1, 2, (8, 3, 5, 5)), jnp.float32)
    a, b = jnp.array([1.1, 0.9, 1.0]), jnp.array([0.2, -0.1, 0.0])
    bn = jaxbn.BatchNorm(axis=1, virtual_batch_size=4, adjustment=lambda shape: (a, b))
    v = bn.init(jax.random.key(0), x, False)
    y, _ = bn.apply(v, x, False, mutable=["batch_stats"])
    parts = [jaxbn.batch_norm(x[i : i + 4], axis=1)[0] for i in (0, 4)]
    want = jnp.concatenate(parts) * a[:, None, None] + b[:, None, None]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_renorm_running_averages_keep_their_dtype():
    """float64 input under x64: the float32 renorm averages stay float32 (a scan carry needs it)."""
    with x64():
        x = jnp.asarray(_batches(1)[0], jnp.float64)
        bn = jaxbn.BatchNorm(renorm=True)
        v = bn.init(jax.random.key(0), x, False)

        def step(_, stats):
            _, upd = bn.apply({"params": v["params"], "batch_stats": stats}, x, False, mutable=["batch_stats"])
            return upd["batch_stats"]

        stats = jax.lax.fori_loop(0, 2, step, v["batch_stats"])
        assert stats["renorm_mean"].dtype == stats["renorm_std"].dtype == jnp.float32


def test_adjustment_applies_in_training_only():
    a, b = jnp.array([1.05, 0.95, 1.0]), jnp.array([0.1, -0.1, 0.0])
    seen = []

    def adjustment(shape):
        seen.append(shape)
        return a, b

    bn = jaxbn.BatchNorm(adjustment=adjustment)
    x = jnp.asarray(_batches(1)[0])
    v = bn.init(jax.random.key(0), x, False)
    params = {"scale": jnp.full(3, 2.0), "bias": jnp.full(3, 0.5)}
    v = {"params": params, "batch_stats": v["batch_stats"]}
    y, _ = bn.apply(v, x, False, mutable=["batch_stats"])
    xhat, _ = jaxbn.batch_norm(x)
    np.testing.assert_allclose(y, (xhat * a + b) * 2.0 + 0.5, rtol=1e-5, atol=1e-5)
    assert seen[-1] == x.shape
    np.testing.assert_allclose(bn.apply(v, x, True), jaxbn.BatchNorm().apply(v, x, True))


def test_adjustment_receives_an_rng_stream():
    def adjustment(shape, rng):
        return 1 + 0.05 * jax.random.uniform(rng, shape[-1:]), jnp.zeros(shape[-1:])

    bn = jaxbn.BatchNorm(adjustment=adjustment)
    x = jnp.asarray(_batches(1)[0])
    v = bn.init({"params": jax.random.key(0), "adjustment": jax.random.key(1)}, x, False)
    y1, _ = bn.apply(v, x, False, mutable=["batch_stats"], rngs={"adjustment": jax.random.key(2)})
    y2, _ = bn.apply(v, x, False, mutable=["batch_stats"], rngs={"adjustment": jax.random.key(3)})
    assert not np.allclose(y1, y2)


def test_adjustment_errors_reach_the_user():
    """A TypeError inside a two-argument adjustment is the user's, not a cue to retry with one argument."""

    def adjustment(shape, rng):
        raise TypeError("my adjustment failed")

    bn = jaxbn.BatchNorm(adjustment=adjustment)
    x = jnp.asarray(_batches(1)[0])
    with pytest.raises(TypeError, match="my adjustment failed"):
        bn.init(jax.random.key(0), x, False)
    one_arg = jaxbn.BatchNorm(adjustment=lambda shape: (jnp.ones(shape[-1:]), jnp.zeros(shape[-1:])))
    v = one_arg.init(jax.random.key(0), x, False)
    y, _ = one_arg.apply(v, x, False, mutable=["batch_stats"])
    assert np.all(np.isfinite(y))


def test_frozen_layer_never_updates_and_passes_gradients():
    x = jnp.asarray(_batches(1)[0])
    bn = jaxbn.BatchNorm(frozen=True)
    v = bn.init(jax.random.key(0), x, False)
    stats = {"mean": jnp.array([0.1, 0.2, 0.3]), "var": jnp.array([2.0, 3.0, 4.0])}
    v = {"params": v["params"], "batch_stats": stats}
    for _ in range(3):
        _, upd = bn.apply(v, x, False, mutable=["batch_stats"])
        v = {"params": v["params"], **upd}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), v["batch_stats"], stats)
    g = jax.grad(lambda x: jnp.sum(bn.apply(v, x, False, mutable=["batch_stats"])[0] ** 2))(x)
    g_inf = jax.grad(lambda x: jnp.sum(jaxbn.normalize(x, stats["mean"], stats["var"]) ** 2))(x)
    assert bool(jnp.all(g != 0))
    np.testing.assert_allclose(g, g_inf, rtol=1e-6)


def test_renorm_clipping_errors():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="`renorm_clipping`"):
        jaxbn.BatchNorm(renorm=True, renorm_clipping={"rmax": 0.5}).init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match="`renorm_clipping`"):
        jaxbn.BatchNorm(renorm=True, renorm_clipping={"r_max": 2.0}).init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match="`renorm_momentum`"):
        jaxbn.BatchNorm(renorm=True, renorm_momentum=2.0).init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match="`renorm_clipping`"):  # NaN made every output NaN
        jaxbn.BatchNorm(renorm=True, renorm_clipping={"dmax": float("nan")}).init(jax.random.key(0), x, False)
    with pytest.raises(TypeError, match="`renorm_clipping`"):
        jaxbn.BatchNorm(renorm=True, renorm_clipping={"rmax": "3"}).init(jax.random.key(0), x, False)


def test_adjustment_of_the_wrong_shape_and_ghosts_without_a_batch_axis_are_named():
    x = jnp.ones((8, 16))
    def returning(shape):
        return lambda s: (jnp.ones(shape), jnp.zeros(shape))

    for shape in [(3,), (16, 1)]:
        bn = jaxbn.BatchNorm(adjustment=returning(shape))
        v = bn.init(jax.random.key(0), x, True)
        with pytest.raises(ValueError, match="`adjustment` returned `a` of shape"):
            bn.apply(v, x, False, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="`virtual_batch_size` needs axis 0"):
        jaxbn.BatchNorm(axis=(0, 1), virtual_batch_size=2).init(jax.random.key(0), x, False)


@pytest.mark.parametrize("option", ["renorm", "adjustment"])
def test_nan_padding_gives_zero_outputs_with_renorm_and_adjustment(option):
    """As in batch_norm: outputs over NaN padding are 0 and pass no gradient (the
    renorm/adjustment correction used to put beta there, and dbias counted it)."""
    x = jnp.asarray(np.random.default_rng(9).normal(size=(8, 3)), jnp.float32)
    mask = (jnp.arange(8) < 6)[:, None]
    opts = {"renorm": {"renorm": True, "renorm_clipping": {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}},
            "adjustment": {"adjustment": lambda s: (jnp.ones(s), jnp.zeros(s))}}[option]
    bn = jaxbn.BatchNorm(use_running_average=False, bias_init=nn.initializers.constant(0.5), **opts)
    v = bn.init(jax.random.key(0), x)

    def loss(params, x):
        y, _ = bn.apply({**v, "params": params}, x, mask=mask, mutable=["batch_stats"])
        return jnp.sum(y), y

    (_, y), g = jax.value_and_grad(loss, has_aux=True)(v["params"], jnp.where(mask, x, jnp.nan))
    np.testing.assert_array_equal(y[6:], 0)
    np.testing.assert_allclose(g["bias"], 6.0)  # the six unmasked rows only
