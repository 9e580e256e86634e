"""flax.nnx BatchNorm: a drop-in replacement for flax.nnx.BatchNorm."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.module import first_from
from jax.nn import initializers

from jaxbn import _checks, _layer
from jaxbn._running import COUNTED_MODES, MODES

_STATS_DTYPE = jnp.float32  # as flax.nnx.BatchNorm: running statistics are float32

_NO_MODE_MSG = (
    "No `use_running_average` argument was provided to BatchNorm. Pass it to the "
    "constructor (`jaxbn.nnx.BatchNorm(..., use_running_average=True/False)`), to the call "
    "(`bn(x, use_running_average=True/False)`), or set it with `model.train()` / "
    "`model.eval()` or `nnx.view(model, use_running_average=True/False)`."
)


def _int_tuple(value: Any) -> tuple[Any, ...]:
    """An int, a tuple/list or a NumPy vector as a tuple of its entries (empty for anything else)."""
    if isinstance(value, numbers.Integral):
        return (value,)
    if isinstance(value, np.ndarray) and value.ndim <= 1:
        return tuple(value.reshape(-1).tolist())
    return tuple(value) if isinstance(value, (tuple, list)) else ()


def _feature_shape(num_features: Any) -> tuple[int, ...]:
    raw = _int_tuple(num_features)
    if not raw or not all(isinstance(n, numbers.Integral) and n > 0 for n in raw):
        raise ValueError(
            f"`num_features` must be a positive int, or a tuple of them (one per feature "
            f"axis), got {num_features!r}."
        )
    return tuple(int(n) for n in raw)


def _check_axis(axis: Any, fshape: tuple[int, ...]) -> tuple[int, ...]:
    """Construction-time axis checks (the range is checked against the input rank at call time)."""
    raw = _int_tuple(axis)
    if not raw or not all(isinstance(a, numbers.Integral) for a in raw):
        raise ValueError(f"`axis` must be an int or a non-empty tuple of ints, got {axis!r}.")
    if len(set(raw)) != len(raw):
        raise ValueError(f"`axis`={axis!r} names the same axis more than once.")
    if len(raw) != len(fshape):
        raise ValueError(
            f"`axis`={axis!r} names {len(raw)} feature axes but `num_features` gives "
            f"{len(fshape)} sizes {fshape}; pass one size per feature axis."
        )
    return tuple(int(a) for a in raw)


def _sorted_feature_shape(axis: tuple[int, ...], fshape: tuple[int, ...]) -> tuple[int, ...]:
    """``fshape`` (one size per entry of ``axis``) in the order of the input's axes.

    The statistics and parameters of a tuple axis follow the input's axis order,
    as the kernels (and flax.linen) lay them out, whatever order ``axis`` lists.
    """
    if len(axis) == 1:
        return fshape
    # The input's order of the listed axes, at every rank where they are distinct
    # and in range (beyond the largest offset between them it no longer changes).
    lowest = max(max(a + 1, -a) for a in axis)
    span = max(abs(a) for a in axis) + 1
    orders = set()
    for rank in range(lowest, lowest + 2 * span + 1):
        pos = [a % rank for a in axis]
        if len(set(pos)) == len(pos):
            orders.add(tuple(sorted(range(len(axis)), key=pos.__getitem__)))
    if len(orders) > 1:
        raise ValueError(
            f"`axis`={axis!r}: the order of these axes in the input depends on its rank, "
            "and so would the layout of `num_features`; give them all non-negative or all "
            "negative."
        )
    (order,) = orders or {tuple(range(len(axis)))}
    return tuple(fshape[i] for i in order)


class BatchNorm(nnx.Module):
    """Batch normalization, a drop-in for ``flax.nnx.BatchNorm``.

    Takes the arguments of ``flax.nnx.BatchNorm`` with the same meaning and creates
    the same attributes: ``scale`` and ``bias`` (:class:`nnx.Param`, or None when
    disabled) and ``mean`` and ``var`` (:class:`nnx.BatchStat`, float32, feature
    shape), so state moves freely between the two. In training mode
    (``use_running_average=False``, e.g. after ``model.train()``) the input is
    normalized with the batch statistics through :func:`jaxbn.batch_norm`
    (hand-derived backward) and the running statistics are updated in place::

        mean <- momentum * mean + (1 - momentum) * mean_B
        var  <- momentum * var  + (1 - momentum) * var_B

    In evaluation mode (``use_running_average=True``, e.g. after
    ``model.eval()``) it computes ``(x - mean) / sqrt(var + epsilon) * scale +
    bias`` with the running statistics and changes nothing. The call argument
    ``use_running_average`` takes precedence over the attribute, as in nnx.

    Differences from flax.nnx.BatchNorm (bug fixes):

    * ``use_fast_variance`` defaults to ``False``: the variance is computed from
      data shifted close to the mean, accurate when ``|mean| >> std``. nnx's
      default one-pass ``E[x^2] - E[x]^2`` loses all precision there (mean 1e4,
      std 1 in float32 gives a variance off by orders of magnitude).
    * With ``axis_name``, statistics are pooled weighted by each device's element
      count (one collective), so masks and unequal per-device batches give the
      statistics of the global batch; nnx averages per-device means.
    * A batch (or feature) whose elements are all masked out leaves the running
      statistics unchanged instead of filling them with NaN.
    * ``promote_dtype`` defaults to None: statistics are accumulated in at least
      float32 from the unconverted input and the result has ``dtype`` (default:
      the promotion of the input, scale and bias), as in ``flax.linen``. nnx
      casts the input to ``dtype`` before computing statistics and, by default,
      promotes half-precision outputs to float32 through the float32 running
      statistics. Pass ``promote_dtype=flax.nnx.nn.dtypes.promote_dtype`` for
      nnx's behaviour.

    Other differences: a training-mode call that reduces a single element per
    feature (say ``nnx.tabulate`` or ``nnx.eval_shape`` on a batch of one)
    raises a ValueError, as PyTorch does, where nnx returns the bias (use a
    batch of two, or evaluation mode); integer input raises a TypeError unless
    ``promote_dtype`` converts it; and in training mode only reverse-mode
    differentiation is available (:func:`jaxbn.batch_norm` is a
    ``jax.custom_vjp``): ``jax.jvp`` and ``jax.jacfwd`` raise, ``jax.hessian``
    and gradients of gradients work.

    Also: ``num_features`` may be a tuple, one size per axis of a tuple
    ``axis`` in the order ``axis`` lists them (a mix of negative and
    non-negative axes whose order in the input depends on its rank is
    refused); the statistics and parameters are laid out
    in the input's axis order, as ``jaxbn.BatchNorm`` lays them out. The
    running statistics are always written under ``stop_gradient``; the call
    raises a ValueError naming ``num_features`` when the input's feature shape
    does not match.

    Extra options (the same as :class:`jaxbn.BatchNorm`) are off by default and
    add attributes only when enabled.

    Example::

        >>> from flax import nnx
        >>> import jax, jaxbn.nnx
        >>> bn = jaxbn.nnx.BatchNorm(6, momentum=0.9, rngs=nnx.Rngs(0))
        >>> y = bn(jax.random.normal(jax.random.key(0), (5, 6)))  # trains, updates mean/var
        >>> bn.eval()  # now normalizes with bn.mean and bn.var
        >>> y = bn(jax.random.normal(jax.random.key(1), (5, 6)))

    Args:
      num_features: the number of features (an int), or a tuple of sizes, one per
        axis of a tuple ``axis``.
      use_running_average: if True, normalize with the stored running statistics.
      axis: the feature axis or axes; statistics reduce over all other axes.
      momentum: ema decay of the running statistics, in [0, 1].
      epsilon: added to the variance, > 0.
      dtype: dtype of the result (default: promotion of input and params).
      param_dtype: dtype of scale and bias.
      use_bias: learn beta (``bias``).
      use_scale: learn gamma (``scale``).
      bias_init: initializer of beta.
      scale_init: initializer of gamma.
      axis_name: mapped axis name(s) (``nnx.vmap``, ``shard_map``, ``pmap``) over
        which batch statistics are pooled.
      axis_index_groups: groups of device indices pooled separately.
      use_fast_variance: one-pass variance (faster on some backends, unstable).
      promote_dtype: optional ``fn((x, mean, var, scale, bias), dtype=dtype)``
        applied to the input and variables before use, as in nnx.
      running_average: ``"ema"`` (default), ``"debiased"`` (the zero-debiased
        ema, Haiku's: the first batch replaces the initial values, later ones
        are averaged with weights ``momentum**age``) or ``"cumulative"`` (exact
        average of all batches so far, PyTorch's ``momentum=None``); the last
        two add the ``count`` BatchStat, int32. See
        :func:`jaxbn.update_running_stats`.
      unbiased_running_var: store ``n / (n - 1)`` times the batch variance in the
        running variance (PyTorch's convention; with ``virtual_batch_size``,
        each ghost batch's variance with its own n).
      renorm: batch renormalization (Ioffe 2017): in training, normalized values
        become ``xhat * r + d`` with ``r = clip(std_B / std_mov, rmin, rmax)``,
        ``d = clip((mean_B - mean_mov) / std_mov, -dmax, dmax)`` under
        ``stop_gradient``; ``mean_mov``/``std_mov`` are the ``renorm_mean`` and
        ``renorm_std`` BatchStats (added). Inference is unchanged.
      renorm_clipping: dict with optional keys ``rmax``, ``rmin``, ``dmax``
        (missing keys mean inf, 0, inf), as in Keras.
      renorm_momentum: ema decay of the renorm moving mean and std.
      virtual_batch_size: ghost batch norm: split the leading axis into
        sub-batches of this size, each normalized with its own statistics
        (scale, bias and running statistics shared; the running statistics get
        the average over sub-batches). Inference never splits the batch.
      adjustment: tf.keras 2's adjustment: ``adjustment(shape[, rng]) -> (a, b)``,
        applied as ``v * a + b`` to the normalized values before scale and bias,
        in training only. ``rng`` is drawn from the ``'adjustment'`` stream of
        ``rngs`` when it has one (forked into the ``rngs`` attribute), else None.
      frozen: always normalize with the running statistics and never update
        them, whatever ``use_running_average`` says (Keras's ``trainable=False``
        for fine-tuning); gradients still flow to the input, scale and bias.
      rngs: rng streams; ``params`` initializes scale and bias.
      bias_metadata: metadata of the ``bias`` Param.
      scale_metadata: metadata of the ``scale`` Param.

    Raises:
      ValueError: on an invalid argument, naming it (momentum, epsilon, axis,
        num_features, virtual_batch_size, running_average, renorm_momentum,
        renorm_clipping); ``axis`` out of range for the input and a batch size
        not divisible by ``virtual_batch_size`` are reported at call time.
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable = initializers.zeros,
        scale_init: Callable = initializers.ones,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: Callable | None = None,
        running_average: str = "ema",
        unbiased_running_var: bool = False,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
        adjustment: Callable | None = None,
        frozen: bool = False,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        fshape = _feature_shape(num_features)
        checked_axis = _check_axis(axis, fshape)
        fshape = _sorted_feature_shape(checked_axis, fshape)
        if not isinstance(axis, numbers.Integral):
            axis = checked_axis
        _checks.check_momentum(momentum)
        _checks.check_epsilon(epsilon)
        if running_average not in MODES:
            raise ValueError(f"`running_average` must be one of {MODES}, got {running_average!r}.")
        if renorm:
            _checks.check_momentum(renorm_momentum, name="renorm_momentum")
        if renorm_clipping is not None:
            # Stored as the validated Python floats: array scalars would be data in a
            # static attribute, which nnx refuses.
            renorm_clipping = dict(zip(("rmax", "rmin", "dmax"), _layer.renorm_clip(renorm_clipping)))
        _layer.check_virtual_batch_size(virtual_batch_size)

        def stat(fill, dtype=_STATS_DTYPE):
            return nnx.BatchStat(jnp.full(fshape, fill, dtype))

        self.mean = stat(0)
        self.var = stat(1)
        self.count = stat(0, jnp.int32) if running_average in COUNTED_MODES else nnx.data(None)
        self.renorm_mean = stat(0) if renorm else nnx.data(None)
        self.renorm_std = stat(1) if renorm else nnx.data(None)

        self.scale: nnx.Param[jax.Array] | None
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), fshape, param_dtype), **scale_metadata)
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param[jax.Array] | None
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), fshape, param_dtype), **bias_metadata)
        else:
            self.bias = nnx.data(None)
        if adjustment is not None and "adjustment" in rngs:
            self.rngs = rngs["adjustment"].fork()
        else:
            self.rngs = nnx.data(None)

        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.running_average = running_average
        self.unbiased_running_var = unbiased_running_var
        self.renorm = renorm
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = renorm_momentum
        self.virtual_batch_size = virtual_batch_size
        self.adjustment = adjustment
        self.frozen = frozen

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; in training mode also updates the running statistics.

        Args:
          x: the input.
          use_running_average: overrides the attribute of the same name.
          mask: boolean (or integer) array broadcastable to ``x``; True (nonzero) marks the elements that
            enter the batch statistics (training mode only).

        Returns:
          The normalized input, of the same shape.
        """
        use_running_average = first_from(use_running_average, self.use_running_average, error_msg=_NO_MODE_MSG)
        mean, var = self.mean[...], self.var[...]
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        if self.promote_dtype is not None:
            x, mean, var, scale, bias = self.promote_dtype((x, mean, var, scale, bias), dtype=self.dtype)
        lay = _layer.layout(
            x,
            axis=self.axis,
            epsilon=self.epsilon,
            momentum=self.momentum,
            mask=mask,
            dtype=self.dtype,
            force_float32=True,
        )
        if lay.fshape != tuple(self.mean.shape):
            axes = (self.axis,) if isinstance(self.axis, numbers.Integral) else self.axis
            sizes = tuple(x.shape[a] for a in axes)
            raise ValueError(
                f"BatchNorm was built for `num_features`={self.num_features!r} along "
                f"`axis`={self.axis!r}, but the input of shape {tuple(x.shape)} has sizes "
                f"{sizes[0] if len(sizes) == 1 else sizes} there."
            )
        _layer.check_stats_shapes(
            lay.fshape,
            var=var,
            count=None if self.count is None else self.count[...],
            renorm_mean=self.renorm_mean[...] if self.renorm else None,
            renorm_std=self.renorm_std[...] if self.renorm else None,
        )
        out_dtype = self.dtype if self.dtype is not None else _checks.result_dtype(x, scale, bias)

        if use_running_average or self.frozen:
            return _layer.infer(x, mean, var, scale, bias, lay, self.epsilon, out_dtype)

        adjustment = None
        if self.adjustment is not None:
            rng = self.rngs() if self.rngs is not None else None
            adjustment = _layer.call_adjustment(self.adjustment, x.shape, rng)
        out = _layer.train(
            x,
            scale,
            bias,
            mask,
            lay,
            epsilon=self.epsilon,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            fast_variance=self.use_fast_variance,
            out_dtype=out_dtype,
            virtual_batch_size=self.virtual_batch_size,
            renorm=(self.renorm_mean[...], self.renorm_std[...]) if self.renorm else None,
            renorm_clipping=self.renorm_clipping,
            adjustment=adjustment,
        )
        new = _layer.update_running(
            _layer.RunningState(
                self.mean[...],
                self.var[...],
                None if self.count is None else self.count[...],
                self.renorm_mean[...] if self.renorm else None,
                self.renorm_std[...] if self.renorm else None,
            ),
            out,
            momentum=self.momentum,
            mode=self.running_average,
            unbiased=self.unbiased_running_var,
            renorm_momentum=self.renorm_momentum,
        )
        if new.mean.dtype != self.mean.dtype:
            # A complex batch mean makes the running mean complex (as in linen and
            # flax.linen); writing it in place would drop its imaginary part.
            self.mean.set_value(new.mean)
        else:
            self.mean[...] = new.mean
        self.var[...] = new.var
        if self.count is not None:
            self.count[...] = new.count
        if self.renorm:
            self.renorm_mean[...], self.renorm_std[...] = new.renorm_mean, new.renorm_std
        return out.y

    def set_view(self, use_running_average: bool | None = None):
        """Class method used by ``nnx.view``.

        Args:
          use_running_average: if True, normalize with the stored running statistics.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average
