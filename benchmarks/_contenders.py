"""The contenders: jaxbn, flax.linen.BatchNorm and (when installed) PyTorch.

Each builder returns ``{name: Contender}``; a :class:`Contender` has ``run``
(a zero-argument callable that computes and waits for the result) and
``result`` (the run's outputs as NumPy arrays, in the JAX layout, for the
agreement check). Everything is float32; conv activations are channels-last
``(N, H, W, C)`` with per-channel statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _harness import block

import jaxbn

EPS = 1e-5  # flax.linen.BatchNorm's and torch's default epsilon; jaxbn's too

try:  # torch is an optional contender, never a dependency
    import torch
    import torch.nn.functional as torch_F
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
    torch_F = None


def torch_available() -> bool:
    return torch is not None


@dataclasses.dataclass
class Contender:
    """``run`` computes and waits, dropping the result at once (as a training loop
    recycles its buffers; keeping it alive would make every call fault in fresh
    pages); ``result`` computes once more and returns the outputs for the check."""

    run: Callable[[], Any]
    result: Callable[[], dict[str, np.ndarray]]
    compiled: Any = None  # jax Compiled of the timed program, when there is one
    # Dispatches one call and returns its outputs without waiting (JAX's
    # asynchronous dispatch); None for contenders that compute synchronously.
    launch: Callable[[], Any] | None = None


def _jax_contender(compiled, args, to_result) -> Contender:
    def run():
        block(compiled(*args))

    def result():
        return to_result(block(compiled(*args)))

    return Contender(run, result, compiled, launch=lambda: compiled(*args))


def copy_contender(x: np.ndarray) -> Contender:
    """``x + 1`` into a fresh buffer: the copy that measures the bandwidth of the floor."""
    xj = jnp.asarray(x)
    compiled = jax.jit(lambda v: v + 1).lower(xj).compile()
    return _jax_contender(compiled, (xj,), lambda out: {"y": np.asarray(out)})


# ------------------------------------------------------------------------- data


def problem(shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """x (mean 0.5, std 2), the cotangent w of y, and per-channel scale, bias, running stats."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    f32 = np.float32
    return {
        "x": (rng.standard_normal(shape) * 2 + 0.5).astype(f32),
        "w": rng.standard_normal(shape).astype(f32),
        "scale": (1 + 0.1 * rng.standard_normal(c)).astype(f32),
        "bias": (0.1 * rng.standard_normal(c)).astype(f32),
        "mean": (0.5 + 0.1 * rng.standard_normal(c)).astype(f32),
        "var": (4 * (1 + 0.1 * rng.random(c))).astype(f32),
    }


def reference_fwdbwd(p: dict[str, np.ndarray], eps: float = EPS, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Training-mode batch norm and its gradients in float64 NumPy (loss = sum(y * w)).

    With a ``mask`` (broadcastable to x, True = kept), the statistics are those
    of the kept elements and every output is normalized with them, as in
    flax.linen.BatchNorm; dx then has the statistics' terms at kept positions only.
    """
    x, w = p["x"].astype(np.float64), p["w"].astype(np.float64)
    g, b = p["scale"].astype(np.float64), p["bias"].astype(np.float64)
    red = tuple(range(x.ndim - 1))
    k = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    m = k.sum(red)
    mean = (k * x).sum(red) / m
    var = (k * (x - mean) ** 2).sum(red) / m
    s = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * s
    y = xhat * g + b
    dbias = w.sum(red)
    dscale = (w * xhat).sum(red)
    dx = g * s * (w - k * (dbias / m + xhat * dscale / m))
    return {"y": y, "dx": dx, "dscale": dscale, "dbias": dbias}


def reference_inference(p: dict[str, np.ndarray], eps: float = EPS) -> dict[str, np.ndarray]:
    x = p["x"].astype(np.float64)
    y = (x - p["mean"]) / np.sqrt(p["var"].astype(np.float64) + eps) * p["scale"] + p["bias"]
    return {"y": y}


def _np(tree):
    return jax.tree.map(np.asarray, tree)


# ------------------------------------------------------------ training fwd+bwd


def _jax_fwdbwd(loss, args) -> Contender:
    """jit(grad(loss, argnums=(0, 1, 2), has_aux=True)): returns the gradients and y."""
    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    compiled = f.lower(*args).compile()

    def to_result(out):
        (dx, dscale, dbias), aux = out
        return _np({"y": aux[0], "dx": dx, "dscale": dscale, "dbias": dbias})

    return _jax_contender(compiled, args, to_result)


def fwdbwd_contenders(p: dict[str, np.ndarray], *, with_torch: bool) -> dict[str, Contender]:
    """Training-mode forward + backward: the gradient of ``sum(y * w)`` w.r.t. x, scale, bias.

    Every contender also returns y (the forward's output, which in a network
    feeds the next layer), so that the forward is really computed: a fwd+bwd
    reads x for the statistics, reads x and writes y, reads dy and x for the
    two reductions, and reads them again to write dx.
    """
    x, w = jnp.asarray(p["x"]), jnp.asarray(p["w"])
    scale, bias = jnp.asarray(p["scale"]), jnp.asarray(p["bias"])
    out: dict[str, Contender] = {}

    def fn_loss(x, scale, bias, w):
        y, mom = jaxbn.batch_norm(x, scale, bias, epsilon=EPS)
        return jnp.sum(y * w), (y, mom)

    out["jaxbn.batch_norm"] = _jax_fwdbwd(fn_loss, (x, scale, bias, w))

    for name, module in (("jaxbn.BatchNorm", jaxbn.BatchNorm), ("flax.linen.BatchNorm", nn.BatchNorm)):
        bn = module(use_running_average=False, epsilon=EPS)
        stats = bn.init(jax.random.key(0), x)["batch_stats"]

        def module_loss(x, scale, bias, w, stats, bn=bn):
            y, upd = bn.apply(
                {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x, mutable=["batch_stats"]
            )
            return jnp.sum(y * w), (y, upd["batch_stats"])

        out[name] = _jax_fwdbwd(module_loss, (x, scale, bias, w, stats))

    if with_torch and torch is not None:
        out["torch"] = _torch_fwdbwd(p)
    return out


def _to_torch_channels_last(a: np.ndarray):
    """(N, ..., C) NumPy array -> torch tensor of logical shape (N, C, ...) in channels-last memory."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if a.ndim > 2:
        t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
    return t


def _from_torch(t) -> np.ndarray:
    a = t.detach().numpy()
    if a.ndim > 2:
        a = np.moveaxis(a, 1, -1)
    return a


def _torch_fwdbwd(p: dict[str, np.ndarray]) -> Contender:
    x = _to_torch_channels_last(p["x"]).requires_grad_(True)
    w = _to_torch_channels_last(p["w"])
    scale = torch.from_numpy(p["scale"].copy()).requires_grad_(True)
    bias = torch.from_numpy(p["bias"].copy()).requires_grad_(True)
    rmean = torch.zeros(p["scale"].shape, dtype=torch.float32)
    rvar = torch.ones(p["scale"].shape, dtype=torch.float32)
    def step():
        x.grad = scale.grad = bias.grad = None
        y = torch_F.batch_norm(x, rmean, rvar, scale, bias, training=True, momentum=0.01, eps=EPS)
        # dy = w, as in the JAX contenders, where XLA passes w to the backward
        # directly (the value of sum(y * w) is not an output).
        y.backward(w)
        return y

    def run():
        step()

    def result():
        y = step()
        return {
            "y": _from_torch(y),
            "dx": _from_torch(x.grad),
            "dscale": scale.grad.numpy().copy(),
            "dbias": bias.grad.numpy().copy(),
        }

    return Contender(run, result)


# -------------------------------------------------------------------- inference


def inference_contenders(p: dict[str, np.ndarray], *, with_torch: bool) -> dict[str, Contender]:
    """Inference mode: normalize with the running statistics."""
    x = jnp.asarray(p["x"])
    params = {"scale": jnp.asarray(p["scale"]), "bias": jnp.asarray(p["bias"])}
    stats = {"mean": jnp.asarray(p["mean"]), "var": jnp.asarray(p["var"])}
    out: dict[str, Contender] = {}

    def jax_contender(f, *args):
        compiled = jax.jit(f).lower(*args).compile()
        return _jax_contender(compiled, args, lambda y: {"y": np.asarray(y)})

    out["jaxbn.normalize"] = jax_contender(
        lambda x, s, m: jaxbn.normalize(x, m["mean"], m["var"], s["scale"], s["bias"], epsilon=EPS),
        x, params, stats,
    )
    for name, module in (("jaxbn.BatchNorm", jaxbn.BatchNorm), ("flax.linen.BatchNorm", nn.BatchNorm)):
        bn = module(use_running_average=True, epsilon=EPS)
        out[name] = jax_contender(
            lambda x, s, m, bn=bn: bn.apply({"params": s, "batch_stats": m}, x), x, params, stats
        )
    if with_torch and torch is not None:
        xt = _to_torch_channels_last(p["x"])
        tm, tv = torch.from_numpy(p["mean"].copy()), torch.from_numpy(p["var"].copy())
        ts, tb = torch.from_numpy(p["scale"].copy()), torch.from_numpy(p["bias"].copy())
        def infer():
            with torch.inference_mode():
                return torch_F.batch_norm(xt, tm, tv, ts, tb, training=False, eps=EPS)

        out["torch"] = Contender(lambda: infer(), lambda: {"y": _from_torch(infer())})
    return out


# ------------------------------------------------------------------ Conv + BN


class ConvBN(nn.Module):
    """Conv followed by an inference-mode BatchNorm of the given kind (or none).

    The conv has no bias, except with ``norm="bias"`` (no BN: a plain biased conv).
    """

    features: int
    norm: str = "jaxbn"  # "jaxbn", "flax", "none" or "bias"

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=self.norm == "bias", name="conv")(x)
        if self.norm == "jaxbn":
            x = jaxbn.BatchNorm(use_running_average=True, epsilon=EPS, name="bn")(x)
        elif self.norm == "flax":
            x = nn.BatchNorm(use_running_average=True, epsilon=EPS, name="bn")(x)
        return x


def fold_contenders(in_shape: tuple[int, ...], features: int, seed: int = 0) -> dict[str, Contender]:
    """Conv + BN (jaxbn, flax), the same with the BN folded into the conv, and the conv alone.

    The folded model is a conv with a bias, so it is compared with a plain conv
    layer with bias (the layer a model without BN would have) as well as with a
    bias-free conv: XLA:CPU does not fuse a bias add into its convolution
    kernel, so any bias costs one elementwise pass over the conv's output.
    """
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(in_shape).astype(np.float32))
    base = ConvBN(features, "jaxbn")
    variables = base.init(jax.random.key(seed), x)
    c = features
    variables = {
        "params": {
            "conv": variables["params"]["conv"],
            "bn": {
                "scale": jnp.asarray((1 + 0.1 * rng.standard_normal(c)).astype(np.float32)),
                "bias": jnp.asarray((0.1 * rng.standard_normal(c)).astype(np.float32)),
            },
        },
        "batch_stats": {
            "bn": {
                "mean": jnp.asarray((0.1 * rng.standard_normal(c)).astype(np.float32)),
                "var": jnp.asarray((1 + rng.random(c)).astype(np.float32)),
            }
        },
    }
    folded = jaxbn.fold_batch_norm(base, variables, x)
    out: dict[str, Contender] = {}

    def contender(f, *args):
        compiled = jax.jit(f).lower(*args).compile()
        return _jax_contender(compiled, args, lambda y: {"y": np.asarray(y)})

    out["Conv+jaxbn.BatchNorm"] = contender(lambda v, x: base.apply(v, x), variables, x)
    flax_model = ConvBN(features, "flax")
    out["Conv+flax.linen.BatchNorm"] = contender(lambda v, x: flax_model.apply(v, x), variables, x)
    out["folded Conv (jaxbn.fold_batch_norm)"] = contender(folded.apply, folded.variables, x)
    conv_bias = ConvBN(features, "bias")
    out["Conv alone (with bias)"] = contender(
        lambda v, x: conv_bias.apply(v, x), {"params": {"conv": folded.variables["params"]["conv"]}}, x
    )
    conv_only = ConvBN(features, "none")
    out["Conv alone (no bias)"] = contender(
        lambda v, x: conv_only.apply(v, x), {"params": {"conv": variables["params"]["conv"]}}, x
    )
    return out
