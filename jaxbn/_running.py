"""Running-statistic updates: exponential moving average (plain or zero-debiased) and cumulative average."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
from jaxbn._stats import Moments

#: Modes of :func:`update_running_stats`; the layers' ``running_average`` takes the same values.
MODES = ("ema", "debiased", "cumulative")

#: The modes that keep a per-feature count of the batches folded in.
COUNTED_MODES = ("debiased", "cumulative")


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

    ``mode="debiased"`` is the zero-debiased ema (Haiku's and TensorFlow's
    ``zero_debias``): the ema of the batches as if started from zero, divided
    by the weight ``1 - momentum**k`` it has gathered after ``k`` batches.
    It is the weighted average of the batches so far, weights
    ``momentum**(k - i)``, so the first batch replaces the initial values and
    early running statistics carry no pull towards mean 0 and variance 1::

        k = count + 1;  w = (1 - momentum) / (1 - momentum**k);  new = (1 - w) * old + w * batch

    (with ``momentum=1``, the limit ``1 / k``: the cumulative average).

    ``mode="cumulative"`` is the exact average over all batches so far
    (PyTorch's ``momentum=None``)::

        k = count + 1;  new = (1 - 1/k) * old + batch / k

    ``count`` is the number of batches already folded in (``None`` counts as 0
    in the debiased and cumulative modes; in ema mode it is incremented too but does not enter the result). With
    ``unbiased=True`` the batch variance enters as ``n / (n - 1) * var``
    (PyTorch's ``running_var``; also the classic paper's population estimate
    ``E[var_B] * m / (m - 1)`` once averaged). A feature whose batch count is 0
    (everything masked) leaves its running statistics and count unchanged.

    Args:
      mean, var: running statistics (feature shape).
      batch: this batch's :class:`jaxbn.Moments`.
      momentum: ema decay in [0, 1].
      mode: ``"ema"``, ``"debiased"`` or ``"cumulative"``.
      unbiased: store the unbiased batch variance.
      count: batches seen so far (scalar or feature shape), or None.

    Returns:
      ``(mean, var, count)``; count is ``None`` when it was ``None`` in ema mode.
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    _checks.check_momentum(momentum)
    if not all(hasattr(batch, f) for f in ("mean", "var", "count")):
        raise TypeError(f"`batch` must be a jaxbn.Moments (mean, var, count), got {type(batch).__name__}.")
    fshape = tuple(jnp.shape(batch.mean))
    _checks.check_param(mean, fshape, name="mean", required=True)
    _checks.check_param(var, fshape, name="var", required=True)
    if count is not None:
        if tuple(jnp.shape(count)) not in ((), fshape):
            raise ValueError(
                f"`count` must be a scalar or of the feature shape {fshape}, got shape {tuple(jnp.shape(count))}."
            )
        if not isinstance(count, jax.core.Tracer) and np.any(np.asarray(count) < 0):
            raise ValueError(f"`count` (batches folded in so far) must be >= 0, got {count!r}.")
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
        # (A momentum given as an array takes the statistics' dtypes.)
        mm, mv = _checks.like(momentum, mean), _checks.like(momentum, var)
        new_mean = mm * mean + (1 - mm) * bmean
        new_var = mv * var + (1 - mv) * bvar
    else:
        # In at least float32 (in bfloat16 a momentum of 0.999 rounds to 1), and
        # k >= 1 even for a (traced) negative count, so that w stays finite.
        wdt = _checks.result_dtype(n, jnp.zeros((), jnp.float32))
        k = (jnp.zeros((), wdt) if count is None else jnp.maximum(jnp.asarray(count), 0).astype(wdt)) + 1
        w = 1 / k
        if mode == "debiased":
            # (1 - m) / (1 - m**k) as expm1(log m) / expm1(k log m): accurate for m
            # near 1, and exactly 1 for the first batch; m = 0 gives 1 (log 0 = -inf);
            # m = 1 takes the limit 1 / k. (momentum may be traced: no Python branch.)
            m = jnp.asarray(momentum, wdt)
            log_m = jnp.log(m)
            w = jnp.where(m == 1, w, jnp.expm1(log_m) / jnp.expm1(k * log_m))
        # (1 - w) * old + w * batch: the first batch (w = 1) replaces the initial values exactly.
        wm, wv = w.astype(bmean.dtype), w.astype(bvar.dtype)
        new_mean = (1 - wm) * mean + wm * bmean
        new_var = (1 - wv) * var + wv * bvar
    new_mean = jnp.where(seen, new_mean, mean)
    new_var = jnp.where(seen, new_var, var)
    new_count = count
    if count is not None or mode in COUNTED_MODES:
        base = jnp.zeros((), jnp.int32) if count is None else jnp.asarray(count)
        new_count = jnp.where(seen, base + 1, base).astype(base.dtype)
    return new_mean, new_var, new_count

