"""jaxbn.BatchNorm is a drop-in for flax.linen.BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn


class ConvNet(nn.Module):
    norm: type = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = self.norm(use_running_average=not train, momentum=0.9, epsilon=1e-3)(x)
        x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(16)(x)
        x = self.norm(use_running_average=not train)(x)  # auto-named BatchNorm_1
        return nn.Dense(4)(x)


def _data(n=16):
    return jax.random.normal(jax.random.key(0), (n, 6, 6, 3)) * 2 + 0.5


def test_same_variables_outputs_and_updates_as_flax():
    x = _data()
    flax_model, ours_model = ConvNet(nn.BatchNorm), ConvNet(jaxbn.BatchNorm)
    v_flax = flax_model.init(jax.random.key(1), x, train=True)
    v_ours = ours_model.init(jax.random.key(1), x, train=True)
    assert jax.tree.structure(v_flax) == jax.tree.structure(v_ours)
    jax.tree.map(np.testing.assert_array_equal, v_flax, v_ours)
    assert set(v_ours["params"]) == {"Conv_0", "BatchNorm_0", "Dense_0", "BatchNorm_1", "Dense_1"}

    y_f, upd_f = flax_model.apply(v_flax, x, train=True, mutable=["batch_stats"])
    y_o, upd_o = ours_model.apply(v_flax, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y_o, y_f, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), upd_o, upd_f)
    # The variables of each apply to the other, in evaluation mode too.
    v2 = {"params": v_ours["params"], **upd_o}
    np.testing.assert_allclose(
        flax_model.apply(v2, x, train=False), ours_model.apply(v2, x, train=False), rtol=1e-6, atol=1e-6
    )
    # Gradients agree as well.
    def loss(model, params):
        variables = {"params": params, "batch_stats": v_flax["batch_stats"]}
        y, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y**2)

    g_f = jax.grad(lambda p: loss(flax_model, p))(v_flax["params"])
    g_o = jax.grad(lambda p: loss(ours_model, p))(v_flax["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_o, g_f)


def test_init_does_not_update_and_works_unmapped_with_axis_name():
    x = _data()
    bn = jaxbn.BatchNorm(use_running_average=False, axis_name="batch")
    v = bn.init(jax.random.key(0), x)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], 0)
    np.testing.assert_array_equal(v["batch_stats"]["var"], 1)


def test_use_running_average_on_construction_or_call_positional():
    x = _data()
    v = jaxbn.BatchNorm().init(jax.random.key(0), x, False)
    stats = {"mean": jnp.full(3, 0.5), "var": jnp.full(3, 4.0)}
    v = {"params": v["params"], "batch_stats": stats}
    expect = (x - 0.5) / jnp.sqrt(4.0 + 1e-5)
    np.testing.assert_allclose(jaxbn.BatchNorm().apply(v, x, True), expect, rtol=1e-6)
    np.testing.assert_allclose(jaxbn.BatchNorm(use_running_average=True).apply(v, x), expect, rtol=1e-6)
    with pytest.raises(ValueError):  # flax's merge_param: given twice
        jaxbn.BatchNorm(use_running_average=True).apply(v, x, True)


def test_mask_matches_flax_and_nan_at_masked_positions():
    x = _data()
    mask = (jnp.arange(16) < 11)[:, None, None, None]
    x_nan = jnp.where(mask, x, jnp.nan)
    v = nn.BatchNorm().init(jax.random.key(0), x, False)
    y_f, u_f = nn.BatchNorm(use_fast_variance=False).apply(v, x_nan, False, mask=mask, mutable=["batch_stats"])
    y_o, u_o = jaxbn.BatchNorm().apply(v, x_nan, False, mask=mask, mutable=["batch_stats"])
    np.testing.assert_allclose(y_o[:11], y_f[:11], rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u_o, u_f)
    assert bool(jnp.all(jnp.isfinite(u_o["batch_stats"]["mean"])))
    # Finite padding and a loss that reads every output: the same gradients as flax's autodiff.
    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

    def grads(module):
        def loss(p, x):
            y, _ = module.apply({**v, "params": p}, x, False, mask=mask, mutable=["batch_stats"])
            return jnp.sum(y * w)
        return jax.grad(loss, (0, 1))(v["params"], x)

    (gp_o, gx_o), (gp_f, gx_f) = grads(jaxbn.BatchNorm()), grads(nn.BatchNorm(use_fast_variance=False))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), gp_o, gp_f)
    np.testing.assert_allclose(gx_o, gx_f, rtol=1e-4, atol=1e-5)


def test_all_masked_batch_leaves_running_stats_unchanged():
    x = _data()
    v = jaxbn.BatchNorm().init(jax.random.key(0), x, False)
    y, upd = jaxbn.BatchNorm().apply(v, x, False, mask=jnp.zeros((16, 1, 1, 1), bool), mutable=["batch_stats"])
    assert bool(jnp.all(jnp.isfinite(y)))
    jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], v["batch_stats"])


def test_stable_variance_where_flax_default_fails():
    x = 1e4 + jax.random.normal(jax.random.key(3), (256, 4))
    v = nn.BatchNorm().init(jax.random.key(0), x, False)
    _, u_o = jaxbn.BatchNorm(momentum=0.0).apply(v, x, False, mutable=["batch_stats"])
    _, u_f = nn.BatchNorm(momentum=0.0).apply(v, x, False, mutable=["batch_stats"])
    true = np.asarray(x, np.float64).var(0)
    assert np.max(np.abs(u_o["batch_stats"]["var"] / true - 1)) < 1e-3
    assert np.max(np.abs(u_f["batch_stats"]["var"] / true - 1)) > 1e-2  # flax's one-pass default


def test_extra_options_add_variables_only_when_enabled():
    x = _data()
    v = jaxbn.BatchNorm(running_average="cumulative").init(jax.random.key(0), x, False)
    assert set(v["batch_stats"]) == {"mean", "var", "count"}
    bn = jaxbn.BatchNorm(running_average="cumulative", unbiased_running_var=True)
    batches = [x, x * 2 + 1, x - 3]
    for b in batches:
        _, upd = bn.apply(v, b, False, mutable=["batch_stats"])
        v = {"params": v["params"], **upd}
    flat = [np.asarray(b).reshape(-1, 3) for b in batches]
    np.testing.assert_allclose(v["batch_stats"]["mean"], np.mean([f.mean(0) for f in flat], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v["batch_stats"]["var"], np.mean([f.var(0, ddof=1) for f in flat], 0), rtol=1e-5)
    np.testing.assert_array_equal(v["batch_stats"]["count"], 3)


def test_debiased_running_average_evaluates_well_from_the_first_steps():
    """running_average="debiased" adds a count and keeps the zero-debiased ema: after one
    training step the running statistics are that batch's (flax's ema would still hold 99%
    of the initial 0 and 1), so evaluating early normalizes like training did."""
    x = _data() * 4 + 10
    bn = jaxbn.BatchNorm(running_average="debiased")
    v = bn.init(jax.random.key(0), x, False)
    assert set(v["batch_stats"]) == {"mean", "var", "count"}
    y_train, upd = bn.apply(v, x, False, mutable=["batch_stats"])
    v = {"params": v["params"], **upd}
    np.testing.assert_array_equal(v["batch_stats"]["count"], 1)
    mom = jaxbn.moments(x, axis=-1)
    np.testing.assert_allclose(v["batch_stats"]["mean"], mom.mean, rtol=1e-6)
    np.testing.assert_allclose(v["batch_stats"]["var"], mom.var, rtol=1e-6)
    np.testing.assert_allclose(bn.apply(v, x, True), y_train, rtol=1e-5, atol=1e-5)
    # A second batch: weights 0.99 and 1 (momentum 0.99) over their sum.
    x2 = x * 0.5 - 3
    _, upd = bn.apply(v, x2, False, mutable=["batch_stats"])
    m2 = jaxbn.moments(x2, axis=-1)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], (0.99 * mom.mean + m2.mean) / 1.99, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], (0.99 * mom.var + m2.var) / 1.99, rtol=1e-5)


def test_pytorch_batchnorm2d_settings_reproduce_its_running_stats_and_outputs():
    """README "Coming from other libraries": torch's BatchNorm2d(C, momentum=0.1) on NCHW data
    is jaxbn.BatchNorm(axis=1, momentum=0.9, unbiased_running_var=True). The reference is
    torch's documented update: running = (1 - m) * running + m * batch, with the batch
    variance unbiased (n / (n - 1)) in the running average and biased in the normalization."""
    m, eps = 0.1, 1e-5
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, (8, 3, 5, 5)).astype(np.float32) for _ in range(3)]
    bn = jaxbn.BatchNorm(axis=1, momentum=1 - m, epsilon=eps, unbiased_running_var=True)
    v = bn.init(jax.random.key(0), batches[0], False)
    mean, var = np.zeros(3), np.ones(3)
    for b in batches:
        y, upd = bn.apply(v, b, False, mutable=["batch_stats"])
        v = {"params": v["params"], **upd}
        b64 = np.asarray(b, np.float64)
        bm, bv = b64.mean((0, 2, 3)), b64.var((0, 2, 3))
        n = b64.size // 3
        expected_y = (b64 - bm[None, :, None, None]) / np.sqrt(bv[None, :, None, None] + eps)
        np.testing.assert_allclose(y, expected_y, atol=2e-5)
        mean = (1 - m) * mean + m * bm
        var = (1 - m) * var + m * bv * n / (n - 1)
    np.testing.assert_allclose(v["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v["batch_stats"]["var"], var, rtol=1e-5)
    x = batches[0]
    y_eval = bn.apply(v, x, True)
    expected = (np.asarray(x, np.float64) - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps)
    np.testing.assert_allclose(y_eval, expected, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_keeps_float32_state(dtype):
    x = _data().astype(dtype)
    bn = jaxbn.BatchNorm(dtype=dtype)
    v = bn.init(jax.random.key(0), x, False)
    y, upd = bn.apply(v, x, False, mutable=["batch_stats"])
    assert y.dtype == dtype
    assert upd["batch_stats"]["mean"].dtype == jnp.float32 and upd["batch_stats"]["var"].dtype == jnp.float32
    # Default dtype promotes like flax: half input with float32 params gives float32.
    assert jaxbn.BatchNorm().apply(v, x, True).dtype == jnp.float32


def test_complex_inputs_like_flax():
    with jax.numpy_dtype_promotion("standard"):
        x = _data() + 1j * _data(16)[::-1]
        v = nn.BatchNorm().init(jax.random.key(0), x, False)
        y_f, _ = nn.BatchNorm(use_fast_variance=False).apply(v, x, False, mutable=["batch_stats"])
        y_o, _ = jaxbn.BatchNorm().apply(v, x, False, mutable=["batch_stats"])
        np.testing.assert_allclose(y_o, y_f, rtol=1e-5, atol=1e-5)


def test_mutable_true_returns_the_collections_flax_returns():
    """apply(..., mutable=True) used to add a 'batch_moments' collection that grew by
    an entry per step (and retraced a jitted step every time)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
    for module in (jaxbn.BatchNorm, nn.BatchNorm):
        bn = module(use_running_average=False)
        v = bn.init(jax.random.key(0), x)

        @jax.jit
        def step(v, x, bn=bn):
            return bn.apply(v, x, mutable=True)[1]

        for _ in range(3):
            v = step(v, x)
        assert sorted(v) == ["batch_stats", "params"], module
        assert step._cache_size() == 1


def test_training_without_mutable_batch_stats_says_what_to_do():
    x = _data()
    v = jaxbn.BatchNorm().init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match="mutable=\\['batch_stats'\\]"):
        jaxbn.BatchNorm().apply(v, x, False)


def test_module_argument_errors():
    x = _data()
    with pytest.raises(ValueError, match="`momentum`"):
        jaxbn.BatchNorm(momentum=-0.1).init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match="`epsilon`"):
        jaxbn.BatchNorm(epsilon=0).init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match="`axis`"):
        jaxbn.BatchNorm(axis=4).init(jax.random.key(0), x, False)
    with pytest.raises(TypeError, match="`x`"):
        jaxbn.BatchNorm().init(jax.random.key(0), jnp.ones((4, 3), jnp.int32), False)
    with pytest.raises(TypeError, match="`dtype`"):
        jaxbn.BatchNorm(dtype=jnp.int32).init(jax.random.key(0), x, False)
    for vbs in (2.0, "2", True):
        with pytest.raises(ValueError, match="`virtual_batch_size`"):
            jaxbn.BatchNorm(virtual_batch_size=vbs).init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match="`virtual_batch_size`=1 leaves a single element"):
        bn = jaxbn.BatchNorm(virtual_batch_size=1)
        bn.apply(bn.init(jax.random.key(0), x[:, 0, 0], False), x[:, 0, 0], False, mutable=["batch_stats"])


@pytest.mark.parametrize("train", [False, True])
def test_running_statistics_of_the_wrong_shape_are_rejected(train):
    """Stored statistics that do not fit the input (another layer's, a bad checkpoint) were
    silently broadcast in evaluation and silently replaced in training."""
    x = _data()  # 3 features
    bn = jaxbn.BatchNorm(use_scale=False, use_bias=False)  # no params whose shape flax would check
    v = bn.init(jax.random.key(0), x[..., :1], False)
    with pytest.raises(ValueError, match="`batch_stats/mean` has shape \\(1,\\).*\\(3,\\)"):
        bn.apply(v, x, not train, mutable=["batch_stats"])
    good = bn.init(jax.random.key(0), x, False)
    bad = {"batch_stats": {"mean": good["batch_stats"]["mean"], "var": jnp.ones((3, 1))}}
    with pytest.raises(ValueError, match="`batch_stats/var`"):
        bn.apply(bad, x, not train, mutable=["batch_stats"])


def test_single_example_init_is_allowed_but_training_on_it_is_not():
    bn = jaxbn.BatchNorm()
    v = bn.init(jax.random.key(0), jnp.ones((1, 5)), False)  # common: init with one example
    with pytest.raises(ValueError, match="single element"):
        bn.apply(v, jnp.ones((1, 5)), False, mutable=["batch_stats"])


def test_half_precision_params_keep_float32_running_statistics():
    x = jax.random.normal(jax.random.key(0), (16, 3))
    v = jaxbn.BatchNorm(param_dtype=jnp.bfloat16).init(jax.random.key(0), x, False)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v["batch_stats"]))  # as flax
    _, upd = jaxbn.BatchNorm(param_dtype=jnp.bfloat16).apply(v, x, False, mutable=["batch_stats"])
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(upd["batch_stats"]))
