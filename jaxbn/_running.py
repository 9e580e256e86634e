"""Running-statistic updates: exponential moving average and cumulative average."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbn import _checks
from jaxbn._stats import Moments

_MODES = ("ema", "cumulative")


def update_running_stats(
    mean: jax.Array,
    var: jax.Array,
    batch: Moments,
    *,
    momentum: float = 0.99,
    mode: str = "ema",
    unbiased: bool = False,
    count: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Folds one batch's statistics into running statistics.

    ``mode="ema"`` (Flax/Keras convention)::

        new = momentum * old + (1 - momentum) * batch

    ``mode="cumulative"`` is the exact average over all batches so far
    (PyTorch's ``momentum=None``)::

        k = count + 1;  new = old + (batch - old) / k

    ``count`` is the number of batches already folded in (``None`` counts as 0
    in cumulative mode; in ema mode it is incremented too but does not enter the result). With
    ``unbiased=True`` the batch variance enters as ``n / (n - 1) * var``
    (PyTorch's ``running_var``; also the classic paper's population estimate
    ``E[var_B] * m / (m - 1)`` once averaged). A feature whose batch count is 0
    (everything masked) leaves its running statistics and count unchanged.

    Args:
      mean, var: running statistics (feature shape).
      batch: this batch's :class:`jaxbn.Moments`.
      momentum: ema decay in [0, 1].
      mode: ``"ema"`` or ``"cumulative"``.
      unbiased: store the unbiased batch variance.
      count: batches seen so far (scalar or feature shape), or None.

    Returns:
      ``(mean, var, count)``; count is ``None`` when it was ``None`` in ema mode.
    """
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")
    _checks.check_momentum(momentum)
    n = batch.count
    bvar = batch.var
    if unbiased:
        bvar = bvar * (n / jnp.maximum(n - 1, 1)).astype(bvar.dtype)
    seen = n > 0
    # Running statistics keep their dtype; a complex batch mean turns a real
    # running mean complex, as in flax.
    mean = jnp.asarray(mean)
    if jnp.iscomplexobj(batch.mean) and not jnp.iscomplexobj(mean):
        mean = mean.astype(_checks.result_dtype(mean, batch.mean))
    bmean = batch.mean.astype(mean.dtype)
    bvar = bvar.astype(jnp.result_type(var))
    if mode == "ema":
        # Flax's exact arithmetic, so that results match flax.linen.BatchNorm bit for bit.
        new_mean = momentum * mean + (1 - momentum) * bmean
        new_var = momentum * var + (1 - momentum) * bvar
    else:
        prev = jnp.zeros((), n.dtype) if count is None else jnp.asarray(count).astype(n.dtype)
        w = 1 / (prev + 1)
        new_mean = mean + w.astype(bmean.dtype) * (bmean - mean)
        new_var = var + w.astype(bvar.dtype) * (bvar - var)
    new_mean = jnp.where(seen, new_mean, mean)
    new_var = jnp.where(seen, new_var, var)
    new_count = count
    if count is not None or mode == "cumulative":
        base = jnp.zeros((), jnp.int32) if count is None else jnp.asarray(count)
        new_count = jnp.where(seen, base + 1, base).astype(base.dtype)
    return new_mean, new_var, new_count

