"""The LeNet + BN training step (lenet_bn config, batch 64) with jaxbn, flax or no BN.

The model is ``train.models.LeNet`` (``norm="jaxbn" | "flax" | "none"``) when
the ``train`` package is importable, otherwise the same network defined here:
Conv(6, 5x5) -> BN -> sigmoid -> maxpool 2 -> Conv(16, 5x5) -> BN -> sigmoid ->
maxpool 2 -> Dense 120 -> BN -> sigmoid -> Dense 84 -> BN -> sigmoid -> Dense 10,
BN momentum 0.99 and epsilon 1e-3, layers before a BN without bias. The step is
one jitted call with the state donated, RMSprop 1e-3, softmax cross-entropy.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn

BATCH = 64
TRAIN_EXAMPLES = 48_000  # MNIST's 60k training images less the 20% validation split
STEPS_PER_EPOCH = TRAIN_EXAMPLES // BATCH


class _LeNet(nn.Module):
    """Fallback LeNet (used only when train.models is not importable)."""

    norm: str = "jaxbn"

    @nn.compact
    def __call__(self, x, train: bool):
        def post(x, name):
            if self.norm == "jaxbn":
                x = jaxbn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name=name)(x)
            elif self.norm == "flax":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name=name)(x)
            return nn.sigmoid(x)

        bias = self.norm == "none"
        init = nn.initializers.glorot_uniform()
        for i, c in enumerate((6, 16)):
            x = nn.Conv(c, (5, 5), padding="VALID", use_bias=bias, kernel_init=init, name=f"conv{i}")(x)
            x = post(x, f"bn_conv{i}")  # 2x2 max-pool as train.models.max_pool_2x2 does it
            n, h, w, ch = x.shape
            x = x.reshape((n, h // 2, 2, w // 2, 2, ch)).max(axis=(2, 4))
        x = x.reshape((x.shape[0], -1))
        for i, f in enumerate((120, 84)):
            x = post(nn.Dense(f, use_bias=bias, kernel_init=init, name=f"dense{i}")(x), f"bn_dense{i}")
        return nn.Dense(10, kernel_init=init, name="logits")(x)


def make_model(norm: str) -> tuple[nn.Module, str]:
    """The LeNet of the lenet_bn config with the given norm, and where it came from."""
    try:
        from train import models

        return (
            models.LeNet(
                norm=norm,
                activation="sigmoid",
                conv_features=(6, 16),
                conv_kernel=5,
                conv_padding="VALID",
                dense_features=(120, 84),
                bn_momentum=0.99,
                bn_epsilon=1e-3,
            ),
            "train.models.LeNet",
        )
    except Exception:  # noqa: BLE001 - train/ missing or different: use the local copy
        return _LeNet(norm=norm), "benchmarks/_lenet.py (train.models unavailable)"


def trainer_compiler_options() -> dict[str, str]:
    """The XLA options the trainer compiles the lenet_bn config with ({} without train/)."""
    try:
        from train import config_base, loop
    except ImportError:
        return {}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "lenet_bn.py")
    return loop.compiler_options(config_base.load_config_file(path))


def make_trainer(norm: str, seed: int = 0, n_batches: int = 8,
                 compiler_options: dict[str, str] | None = None) -> dict[str, Any]:
    """A jitted, state-donating training step and device-resident synthetic batches.

    `compiler_options`: XLA options for compiling the step (default: XLA's defaults).
    """
    model, source = make_model(norm)
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.random((n_batches, BATCH, 28, 28, 1), dtype=np.float32))
    ys = jnp.asarray(rng.integers(0, 10, (n_batches, BATCH)), dtype=jnp.int32)
    variables = model.init(jax.random.key(seed), xs[0], train=False)
    tx = optax.rmsprop(1e-3)
    state = (variables["params"], variables.get("batch_stats", {}), tx.init(variables["params"]))

    def loss_fn(params, batch_stats, x, y):
        logits, upd = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, upd.get("batch_stats", {})

    @partial(jax.jit, donate_argnums=(0,))
    def step(state, x, y):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    compiled = step.lower(state, xs[0], ys[0]).compile(compiler_options=compiler_options or None)
    holder = {"state": state}
    # Sliced once: indexing a device array per step would dispatch two slicing ops per step.
    batches = [(xs[i], ys[i]) for i in range(n_batches)]

    def run_steps(n: int) -> float:
        """Runs n steps (cycling over the batches) and returns the last loss."""
        st = holder["state"]
        loss = None
        for i in range(n):
            st, loss = compiled(st, *batches[i % n_batches])
        holder["state"] = st
        return float(loss)

    return {"run_steps": run_steps, "compiled": compiled, "source": source}
