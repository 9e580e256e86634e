"""flax.linen BatchNorm: a drop-in replacement for flax.linen.BatchNorm."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import module as flax_module
from jax.nn import initializers

from jaxbn import _checks, _layer
from jaxbn._running import COUNTED_MODES, MODES

#: Collection into which training-mode calls record their batch Moments while
#: :func:`recording_moments` is active (as :func:`jaxbn.recompute_batch_stats`
#: runs the model) and the collection is mutable.
MOMENTS_COLLECTION = "batch_moments"

_recording = threading.local()


@contextlib.contextmanager
def recording_moments():
    """Within this context (at trace time), training-mode calls sow their batch Moments.

    Only then: ``apply(..., mutable=True)`` elsewhere must return the collections
    flax's BatchNorm returns, not one that grows by an entry per step.
    """
    previous = getattr(_recording, "on", False)
    _recording.on = True
    try:
        yield
    finally:
        _recording.on = previous


def _immutable_error(path: str) -> ValueError:
    return ValueError(
        f"BatchNorm {path} runs in training mode (use_running_average=False) and must "
        "update its running statistics, but the 'batch_stats' collection is immutable. "
        "Pass mutable=['batch_stats'] to apply() and keep the returned batch_stats, e.g. "
        "`y, updates = model.apply(variables, x, mutable=['batch_stats'])`; "
        "or call with use_running_average=True to evaluate with the running statistics."
    )


class BatchNorm(nn.Module):
    """Batch normalization, a drop-in for ``flax.linen.BatchNorm``.

    Every argument of ``flax.linen.BatchNorm`` is accepted with the same meaning,
    and the same variables are created: ``params/{scale, bias}`` and
    ``batch_stats/{mean, var}``, so variables move freely between the two.
    Training mode (``use_running_average=False``) normalizes with the batch
    statistics through :func:`jaxbn.batch_norm` (hand-derived backward) and
    updates the running statistics (``new = momentum * old + (1 - momentum) *
    batch``); nothing is updated during ``init``, where ``axis_name`` is ignored
    so that ``init`` works outside a mapped context.

    Differences from flax.linen.BatchNorm (bug fixes):

    * ``use_fast_variance`` defaults to ``False``: the variance is computed from
      data shifted close to the mean, accurate when ``|mean| >> std``. Flax's
      default one-pass ``E[x^2] - E[x]^2`` loses all precision there (mean 1e4,
      std 1 in float32 gives a variance off by orders of magnitude).
    * With ``axis_name``, statistics are pooled weighted by each device's element
      count (one collective), so masks and unequal per-device batches give the
      statistics of the global batch; flax averages per-device means.
    * A batch (or feature) whose elements are all masked out leaves the running
      statistics unchanged instead of filling them with NaN.
    * Applying in training mode without ``mutable=['batch_stats']`` raises an
      error that says how to fix the call.

    Other differences: a training-mode call that reduces a single element per
    feature (a batch of one without spatial axes) raises a ValueError, as
    PyTorch does, where flax returns the bias (``init`` is exempt); and in
    training mode only reverse-mode differentiation is available
    (:func:`jaxbn.batch_norm` is a ``jax.custom_vjp``), so ``jax.jvp`` and
    ``jax.jacfwd`` raise where flax's autodiff supports them (``jax.hessian``
    and gradients of gradients work). Validation is stricter: integer input,
    ``epsilon <= 0``, ``momentum`` outside [0, 1], an axis named twice and a
    floating-point ``mask`` raise errors naming the argument where flax casts or
    accepts them. Running statistics keep the dtype they were created with,
    where flax's first update may promote them (to float64 under x64, say).

    Extra options are off by default and add variables only when enabled.

    Attributes:
      use_running_average: if True, use the stored running statistics.
      axis: the feature axis or axes.
      momentum: ema decay of the running statistics, in [0, 1].
      epsilon: added to the variance, > 0.
      dtype: dtype of the result (default: promotion of input and params).
      param_dtype: dtype of scale and bias.
      use_bias, use_scale: learn beta / gamma.
      bias_init, scale_init: initializers of beta / gamma.
      axis_name: mapped axis name(s) over which batch statistics are pooled.
      axis_index_groups: groups of device indices pooled separately.
      use_fast_variance: one-pass variance (faster on some backends, unstable).
      force_float32_reductions: keep the statistics and running statistics in at least
        float32 (default). With False, as in flax, the statistics take ``dtype`` (else
        the input's) and the running statistics ``param_dtype``; the sums over the
        batch still accumulate in float32, as ``jnp.sum`` does for half precision.
      running_average: ``"ema"`` (default), ``"debiased"`` (the zero-debiased
        ema, Haiku's: the first batch replaces the initial values, later ones
        are averaged with weights ``momentum**age``; adds ``batch_stats/count``)
        or ``"cumulative"`` (exact average of all batches so far, PyTorch's
        ``momentum=None``; adds ``batch_stats/count``). See
        :func:`jaxbn.update_running_stats`.
      unbiased_running_var: store ``n / (n - 1)`` times the batch variance in the
        running variance (PyTorch's convention; with ``virtual_batch_size``,
        each ghost batch's variance with its own n).
      renorm: batch renormalization (Ioffe 2017): in training, normalized values
        become ``xhat * r + d`` with ``r = clip(std_B / std_mov, rmin, rmax)``,
        ``d = clip((mean_B - mean_mov) / std_mov, -dmax, dmax)`` under
        ``stop_gradient``; ``mean_mov``/``std_mov`` are ``batch_stats/renorm_mean``
        and ``batch_stats/renorm_std``. Inference is unchanged.
      renorm_clipping: dict with optional keys ``rmax``, ``rmin``, ``dmax``
        (missing keys mean inf, 0, inf), as in Keras.
      renorm_momentum: ema decay of the renorm moving mean and std.
      virtual_batch_size: ghost batch norm: split the leading axis into
        sub-batches of this size, each normalized with its own statistics
        (scale, bias and running statistics shared; the running statistics get
        the average over sub-batches). Inference never splits the batch.
      adjustment: tf.keras 2's adjustment: ``adjustment(shape[, rng]) -> (a, b)``,
        applied as ``v * a + b`` to the normalized values before scale and bias,
        in training only. ``rng`` comes from the ``'adjustment'`` rng stream when
        one is given to ``apply``, else None.
      frozen: always normalize with the running statistics and never update
        them, whatever ``use_running_average`` says (Keras's ``trainable=False``
        for fine-tuning); gradients still flow to the input, scale and bias.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    # jaxbn options
    running_average: str = "ema"
    unbiased_running_var: bool = False
    renorm: bool = False
    renorm_clipping: Any = None
    renorm_momentum: float = 0.99
    virtual_batch_size: int | None = None
    adjustment: Callable | None = None
    frozen: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``.

        Args:
          x: the input.
          use_running_average: overrides the attribute of the same name.
          mask: boolean (or integer) array broadcastable to ``x``; True (nonzero) marks the elements that
            enter the batch statistics (training mode only).

        Returns:
          The normalized input, of the same shape.
        """
        use_running_average = flax_module.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        if self.running_average not in MODES:
            raise ValueError(f"`running_average` must be one of {MODES}, got {self.running_average!r}.")
        _layer.check_virtual_batch_size(self.virtual_batch_size)
        if self.renorm:
            _checks.check_momentum(self.renorm_momentum, name="renorm_momentum")
            _layer.renorm_clip(self.renorm_clipping)
        lay = _layer.layout(
            x,
            axis=self.axis,
            epsilon=self.epsilon,
            momentum=self.momentum,
            mask=mask,
            dtype=self.dtype,
            force_float32=self.force_float32_reductions,
        )
        var_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype

        def stat(name, fill, dtype=var_dtype):
            return self.variable("batch_stats", name, lambda s: jnp.full(s, fill, dtype), lay.fshape)

        ra_mean, ra_var = stat("mean", 0), stat("var", 1)
        ra_count = stat("count", 0, jnp.int32) if self.running_average in COUNTED_MODES else None
        rn_mean, rn_std = (stat("renorm_mean", 0), stat("renorm_std", 1)) if self.renorm else (None, None)
        _layer.check_stats_shapes(
            lay.fshape,
            mean=ra_mean.value,
            var=ra_var.value,
            count=None if ra_count is None else ra_count.value,
            renorm_mean=None if rn_mean is None else rn_mean.value,
            renorm_std=None if rn_std is None else rn_std.value,
        )

        scale = bias = None
        if self.use_scale:
            scale = self.param("scale", self.scale_init, lay.fshape, self.param_dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, lay.fshape, self.param_dtype)
        if not self.force_float32_reductions:
            scale = None if scale is None else jnp.asarray(scale, self.param_dtype)
            bias = None if bias is None else jnp.asarray(bias, self.param_dtype)
        out_dtype = self.dtype if self.dtype is not None else _checks.result_dtype(x, scale, bias)

        if use_running_average or self.frozen:
            return _layer.infer(x, ra_mean.value, ra_var.value, scale, bias, lay, self.epsilon, out_dtype)

        initializing = self.is_initializing()
        adjustment = None
        if self.adjustment is not None:
            rng = self.make_rng("adjustment") if self.has_rng("adjustment") else None
            adjustment = _layer.call_adjustment(self.adjustment, x.shape, rng)
        out = _layer.train(
            x,
            scale,
            bias,
            mask,
            lay,
            epsilon=self.epsilon,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            fast_variance=self.use_fast_variance,
            out_dtype=out_dtype,
            virtual_batch_size=self.virtual_batch_size,
            renorm=(rn_mean.value, rn_std.value) if self.renorm else None,
            renorm_clipping=self.renorm_clipping,
            adjustment=adjustment,
            initializing=initializing,
        )
        if initializing:
            return out.y
        if getattr(_recording, "on", False) and self.is_mutable_collection(MOMENTS_COLLECTION):
            self.sow(MOMENTS_COLLECTION, "moments", out.batch)  # one entry per call
        if not self.is_mutable_collection("batch_stats"):
            raise _immutable_error("/" + "/".join(self.scope.path))
        new = _layer.update_running(
            _layer.RunningState(
                ra_mean.value,
                ra_var.value,
                None if ra_count is None else ra_count.value,
                rn_mean.value if self.renorm else None,
                rn_std.value if self.renorm else None,
            ),
            out,
            momentum=self.momentum,
            mode=self.running_average,
            unbiased=self.unbiased_running_var,
            renorm_momentum=self.renorm_momentum,
        )
        ra_mean.value, ra_var.value = new.mean, new.var
        if ra_count is not None:
            ra_count.value = new.count
        if self.renorm:
            rn_mean.value, rn_std.value = new.renorm_mean, new.renorm_std
        return out.y
