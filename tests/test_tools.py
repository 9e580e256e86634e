"""Population statistics, folding, stale-statistics checks and the weight-decay mask."""

import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn


class InputNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = jaxbn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dense(5)(x)
        x = jaxbn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(nn.relu(x))


def _batches(k=4, n=16, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(i, 1 + i, (n, d)), jnp.float32) for i in range(k)]


@pytest.mark.parametrize("method", ["pooled", "average"])
def test_recompute_batch_stats_equals_numpy_over_all_data(method):
    model = InputNormMLP()
    batches = _batches()
    v = model.init(jax.random.key(0), batches[0], train=False)
    out = jaxbn.recompute_batch_stats(model.apply, v, batches, method=method, train=True)
    allx = np.concatenate([np.asarray(b, np.float64) for b in batches])
    stats = out["batch_stats"]["BatchNorm_0"]
    if method == "pooled":
        np.testing.assert_allclose(stats["mean"], allx.mean(0), rtol=1e-5)
        np.testing.assert_allclose(stats["var"], allx.var(0), rtol=1e-5)
    else:
        np.testing.assert_allclose(stats["mean"], np.mean([np.mean(b, 0) for b in batches], 0), rtol=1e-5)
        np.testing.assert_allclose(stats["var"], np.mean([np.var(b, 0, ddof=1) for b in batches], 0), rtol=1e-5)
    # The second layer sees the first layer's batch-normalized output, through the frozen Dense.
    dense = v["params"]["Dense_0"]
    z = [np.asarray(jaxbn.batch_norm(b)[0], np.float64) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]) for b in batches]
    if method == "pooled":
        np.testing.assert_allclose(out["batch_stats"]["BatchNorm_1"]["mean"], np.concatenate(z).mean(0), rtol=1e-4, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, out["params"], v["params"])


def test_recompute_batch_stats_pools_every_call_of_a_shared_layer():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            bn = jaxbn.BatchNorm(use_running_average=not train)
            return bn(x) + bn(x * 10 + 5)

    model, batches = Shared(), _batches(2)
    v = model.init(jax.random.key(0), batches[0], train=False)
    out = jaxbn.recompute_batch_stats(model.apply, v, batches, train=True)
    seen = np.concatenate([np.asarray(b, np.float64) * k + c for b in batches for k, c in ((1, 0), (10, 5))])
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], seen.mean(0), rtol=1e-5)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], seen.var(0), rtol=1e-5)


def test_recompute_batch_stats_sets_the_cumulative_count():
    """After the recompute, cumulative training goes on as if its batches had come first."""

    class Cumulative(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return jaxbn.BatchNorm(use_running_average=not train, running_average="cumulative",
                                   unbiased_running_var=True)(x)

    model, batches = Cumulative(), _batches(4)
    v = model.init(jax.random.key(0), batches[0], train=False)
    three = jaxbn.recompute_batch_stats(model.apply, v, batches[:3], method="average", train=True)
    assert int(np.max(three["batch_stats"]["BatchNorm_0"]["count"])) == 3
    _, upd = model.apply(three, batches[3], train=True, mutable=["batch_stats"])
    four = jaxbn.recompute_batch_stats(model.apply, v, batches, method="average", train=True)
    for name in ("mean", "var", "count"):
        np.testing.assert_allclose(upd["batch_stats"]["BatchNorm_0"][name], four["batch_stats"]["BatchNorm_0"][name],
                                   rtol=1e-5)


class MaskedCumulative(nn.Module):
    """A cumulative-average BN whose input is (x, mask)."""

    @nn.compact
    def __call__(self, xm, train: bool):
        x, mask = xm
        return jaxbn.BatchNorm(use_running_average=not train, running_average="cumulative")(x, mask=mask)


@pytest.mark.parametrize("method", ["pooled", "average"])
def test_recompute_batch_stats_counts_only_batches_a_feature_was_seen_in(method):
    """A batch whose mask hides a feature entirely adds nothing to that feature, its count included."""

    batches = _batches(3)
    hide0 = np.ones((16, 3), bool)
    hide0[:, 0] = False
    masks = [np.ones((16, 3), bool), hide0, np.ones((16, 3), bool)]
    model = MaskedCumulative()
    v = model.init(jax.random.key(0), (batches[0], masks[0]), train=False)
    out = jaxbn.recompute_batch_stats(model.apply, v, list(zip(batches, masks)), method=method, train=True)
    stats = out["batch_stats"]["BatchNorm_0"]
    np.testing.assert_array_equal(stats["count"], [2, 3, 3])
    seen0 = np.concatenate([np.asarray(batches[i], np.float64)[:, 0] for i in (0, 2)])
    want0 = seen0.mean() if method == "pooled" else np.mean([np.asarray(batches[i])[:, 0].mean() for i in (0, 2)])
    np.testing.assert_allclose(stats["mean"][0], want0, rtol=1e-5)


def test_recompute_batch_stats_keeps_what_no_batch_showed():
    """A feature masked out in every batch keeps its statistics (it got mean 0 and var 0)."""

    batches = _batches(2)
    hide0 = np.ones((16, 3), bool)
    hide0[:, 0] = False
    model = MaskedCumulative()
    v = model.init(jax.random.key(0), (batches[0], hide0), train=False)
    stats = {"mean": jnp.asarray([5.0, 6.0, 7.0]), "var": jnp.asarray([2.0, 3.0, 4.0]), "count": jnp.full(3, 9, jnp.int32)}
    v = {"params": v["params"], "batch_stats": {"BatchNorm_0": stats}}
    for method in ("pooled", "average"):
        out = jaxbn.recompute_batch_stats(model.apply, v, [(b, hide0) for b in batches], method=method, train=True)
        got = out["batch_stats"]["BatchNorm_0"]
        assert float(got["mean"][0]) == 5.0 and float(got["var"][0]) == 2.0 and int(got["count"][0]) == 9
        np.testing.assert_array_equal(got["count"][1:], 2)
        assert float(got["var"][1]) != 3.0


def test_recompute_batch_stats_errors():
    model = InputNormMLP()
    b = _batches(1)
    v = model.init(jax.random.key(0), b[0], train=False)
    with pytest.raises(ValueError, match="`method`"):
        jaxbn.recompute_batch_stats(model.apply, v, b, method="median", train=True)
    with pytest.raises(ValueError, match="training mode"):
        jaxbn.recompute_batch_stats(model.apply, v, b, train=False)
    with pytest.raises(ValueError, match="empty"):
        jaxbn.recompute_batch_stats(model.apply, v, [], train=True)


class ConvBN(nn.Module):
    norm: type = jaxbn.BatchNorm
    conv_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(6, (3, 3), use_bias=self.conv_bias)(x)
        x = nn.relu(self.norm(use_running_average=not train, epsilon=1e-3)(x))
        x = nn.max_pool(x, (2, 2), (2, 2)).reshape((x.shape[0], -1))
        x = nn.Dense(12)(x)
        x = nn.sigmoid(self.norm(use_running_average=not train)(x))
        return nn.Dense(3)(x)


@pytest.mark.parametrize("norm", [jaxbn.BatchNorm, nn.BatchNorm])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_fold_batch_norm_matches_unfolded(norm, conv_bias):
    model = ConvBN(norm, conv_bias)
    x = jax.random.normal(jax.random.key(0), (8, 10, 10, 2))
    v = model.init(jax.random.key(1), x, train=False)
    for i in range(3):  # give the running statistics non-trivial values
        _, upd = model.apply(v, x * (1 + i) + i, train=True, mutable=["batch_stats"])
        v = {"params": v["params"], **upd}
    folded = jaxbn.fold_batch_norm(model, v, x, train=False)
    assert folded.pairs == (("Conv_0", "BatchNorm_0"), ("Dense_0", "BatchNorm_1"))
    assert not any("BatchNorm" in k for k in folded.variables["params"])
    assert "batch_stats" not in folded.variables
    want = model.apply(v, x, train=False)
    got = folded.apply(folded.variables, x, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    jaxpr = str(jax.make_jaxpr(lambda p: folded.apply(p, x, train=False))(folded.variables))
    assert "rsqrt" not in jaxpr and "sqrt" not in jaxpr


class MixedDenseBN(nn.Module):
    """A half-precision layer before or in the BN: its output dtype is the BN's to keep."""

    dense_dtype: Any = None
    bn_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        z = nn.Dense(4, dtype=self.dense_dtype)(x)
        return jaxbn.BatchNorm(use_running_average=True, dtype=self.bn_dtype)(z)


@pytest.mark.parametrize("dense_dtype, bn_dtype", [(jnp.bfloat16, None), (None, jnp.bfloat16),
                                                   (jnp.float16, None)])
def test_fold_batch_norm_keeps_the_output_dtype(dense_dtype, bn_dtype):
    model = MixedDenseBN(dense_dtype, bn_dtype)
    x = jax.random.normal(jax.random.key(0), (8, 3))
    v = model.init(jax.random.key(1), x)
    want = model.apply(v, x)
    folded = jaxbn.fold_batch_norm(model, v, x)
    got = folded.apply(folded.variables, x)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=0.02, atol=0.02)


class SeqDenseBN(nn.Module):
    """Dense over the features of (N, T, D) activations, then BN on ``axis``."""

    axis: Any = -1

    @nn.compact
    def __call__(self, x, train: bool):
        return jaxbn.BatchNorm(use_running_average=not train, axis=self.axis)(nn.Dense(5)(x))


@pytest.mark.parametrize("axis", [-1, 2, (2,), (-1,)])
def test_fold_batch_norm_feature_axis_of_the_activation(axis):
    """The BN axis is checked against the activation's rank, not the kernel's."""
    x = jax.random.normal(jax.random.key(0), (4, 5, 3))  # T == Dense features: axis 1 must not pass
    model = SeqDenseBN(axis)
    v = model.init(jax.random.key(1), x, train=False)
    _, upd = model.apply(v, x * 3 + 1, train=True, mutable=["batch_stats"])
    v = {"params": v["params"], **upd}
    folded = jaxbn.fold_batch_norm(model, v, x, train=False)
    want = model.apply(v, x, train=False)
    np.testing.assert_allclose(folded.apply(folded.variables, x, train=False), want, rtol=1e-5, atol=1e-5)
    wrong = SeqDenseBN(1)
    with pytest.raises(ValueError, match="normalizes axis 1 of its 3-D input"):
        jaxbn.fold_batch_norm(wrong, wrong.init(jax.random.key(1), x, train=False), x, train=False)


def test_fold_batch_norm_asks_for_an_inference_sample_call():
    """A training-mode sample call used to give the module's "pass mutable" advice, and then,
    with mutable, an error blaming the model's structure."""
    model, x = SeqDenseBN(-1), jax.random.normal(jax.random.key(0), (4, 5, 3))
    v = model.init(jax.random.key(1), x, train=False)
    with pytest.raises(ValueError, match="needs a sample call in inference mode.*train=False"):
        jaxbn.fold_batch_norm(model, v, x, train=True)
    with pytest.raises(ValueError, match="needs a sample call in inference mode"):
        jaxbn.fold_batch_norm(model, v, x, train=True, mutable=["batch_stats"])
    numpy_axis = SeqDenseBN(np.int64(-1))  # the module accepts NumPy ints; fold did not
    folded = jaxbn.fold_batch_norm(numpy_axis, v, x, train=False)
    np.testing.assert_allclose(folded.apply(folded.variables, x, train=False), model.apply(v, x, train=False),
                               rtol=1e-5, atol=1e-5)


def test_fold_batch_norm_needs_a_pair():
    class NoPair(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jaxbn.BatchNorm(use_running_average=True)(nn.relu(nn.Dense(3)(x)))

    x = jnp.ones((2, 4))
    v = NoPair().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="no Dense/Conv"):
        jaxbn.fold_batch_norm(NoPair(), v, x)


def test_fold_batch_norm_refuses_a_linear_output_that_also_feeds_something_else():
    class Residual(nn.Module):
        @nn.compact
        def __call__(self, x):
            z = nn.Dense(3)(x)
            return jaxbn.BatchNorm(use_running_average=True)(z) + z  # z also feeds the sum

    x = jax.random.normal(jax.random.key(0), (8, 4))
    model = Residual()
    v = model.init(jax.random.key(1), x)
    v = {"params": v["params"], "batch_stats": {"BatchNorm_0": {"mean": jnp.full(3, 2.0), "var": jnp.full(3, 4.0)}}}
    with pytest.raises(ValueError, match="Dense_0 -> BatchNorm_0 also feeds something else"):
        jaxbn.fold_batch_norm(model, v, x)


def test_stale_statistics_check():
    model = InputNormMLP()
    batches = _batches()
    v = model.init(jax.random.key(0), batches[0], train=False)
    good = bad = v
    for b in batches:
        _, upd = model.apply(good, b, train=True, mutable=["batch_stats"])
        good = {"params": v["params"], **upd}
        # The classic bug: "training" with the training flag off never touches the statistics.
        _, upd = model.apply(bad, b, train=False, mutable=["batch_stats"])
        bad = {"params": v["params"], **upd}
    assert jaxbn.find_stale_batch_stats(bad) == ["BatchNorm_0", "BatchNorm_1"]
    assert jaxbn.find_stale_batch_stats(good) == []
    with pytest.warns(jaxbn.StaleBatchStatsWarning, match="BatchNorm_0, BatchNorm_1"):
        jaxbn.warn_if_stale(bad, when="export")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jaxbn.warn_if_stale(good) == []


def test_stale_statistics_check_on_nnx_state():
    from flax import nnx

    from jaxbn import nnx as jbn

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.bn = jbn.BatchNorm(3, rngs=rngs)
            self.blocks = nnx.List([jbn.BatchNorm(3, rngs=rngs), jbn.BatchNorm(3, rngs=rngs)])

    net = Net(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
    net.bn(x, use_running_average=False)
    net.blocks[1](x, use_running_average=False)
    assert jaxbn.find_stale_batch_stats(nnx.state(net, nnx.BatchStat)) == ["blocks/0"]
    assert jaxbn.find_stale_batch_stats(nnx.state(net)) == ["blocks/0"]
    assert jaxbn.find_stale_batch_stats(nnx.to_pure_dict(nnx.state(net))) == ["blocks/0"]


def test_weight_decay_mask_spares_bn_and_biases():
    model = ConvBN()
    x = jnp.ones((2, 10, 10, 2))
    params = model.init(jax.random.key(0), x, train=False)["params"]
    mask = jaxbn.weight_decay_mask(params)
    assert mask["Conv_0"] == {"kernel": True, "bias": False}
    assert mask["BatchNorm_0"] == {"scale": False, "bias": False}
    assert mask["Dense_1"] == {"kernel": True, "bias": False}
    # With optax: zero gradients, so only weight decay moves parameters.
    tx = optax.adamw(0.1, weight_decay=0.5, mask=jaxbn.weight_decay_mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes int and float
        updates, _ = tx.update(zeros, tx.init(params), params)
    assert bool(jnp.all(updates["BatchNorm_0"]["scale"] == 0))
    assert bool(jnp.any(updates["Conv_0"]["kernel"] != 0))


def test_stale_top_level_batch_norm_is_named():
    x = jnp.ones((4, 3))
    v = jaxbn.BatchNorm().init(jax.random.key(0), x, False)
    assert jaxbn.find_stale_batch_stats(v) == ["<top level>"]
    _, upd = jaxbn.BatchNorm().apply(v, x * jnp.arange(4.0)[:, None], False, mutable=["batch_stats"])
    assert jaxbn.find_stale_batch_stats(upd) == []
