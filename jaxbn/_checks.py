"""Argument validation and dtype helpers shared by the pure functions and modules.

Every check runs at trace time on static Python values and shapes, so a bad
argument fails before any computation, with a message that names the argument.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Axes = int | Sequence[int]


def feature_axes(ndim: int, axis: Axes, *, name: str = "axis") -> tuple[int, ...]:
    """Returns the sorted, non-negative feature axes; rejects out-of-range or repeated axes."""
    if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
        raw = (axis,)
    elif isinstance(axis, np.ndarray) and axis.ndim <= 1:  # as flax accepts
        raw = tuple(axis.reshape(-1).tolist())
    elif isinstance(axis, Sequence) and not isinstance(axis, str):
        raw = tuple(axis)
    else:
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
    if not raw:
        raise ValueError(f"`{name}` must name at least one feature axis, got {axis!r}.")
    out = []
    for a in raw:
        if not isinstance(a, numbers.Integral) or isinstance(a, bool):
            raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{name}`={axis!r} is out of range for an input of rank {ndim} "
                f"(valid axes are {-ndim}..{ndim - 1})."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={axis!r} names the same axis more than once.")
    return tuple(sorted(out))


def reduction_axes(ndim: int, features: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i not in features)


def feature_shape(shape: tuple[int, ...], features: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in features)


def check_input(x: Any, *, name: str = "x") -> None:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"`{name}` must be a JAX or NumPy array, got {type(x).__name__}.")
    dtype = x.dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)):
        raise TypeError(
            f"`{name}` must be a floating-point (or complex) array, got dtype {dtype}; "
            f"cast it first, e.g. {name}.astype(jnp.float32)."
        )


def check_param(p: Any, expected: tuple[int, ...], *, name: str, required: bool = False) -> None:
    """``p`` (optional unless ``required``) is an array of the feature shape ``expected``."""
    if p is None:
        if required:
            raise TypeError(f"`{name}` is required: an array of the feature shape {expected}.")
        return
    if not hasattr(p, "shape"):
        if isinstance(p, numbers.Number):
            p = np.asarray(p)  # a scalar: only fits a feature shape of ()
        else:
            raise TypeError(f"`{name}` must be a JAX or NumPy array of shape {expected}, got {type(p).__name__}.")
    if tuple(np.shape(p)) != expected:
        raise ValueError(
            f"`{name}` must have the feature shape {expected} (one value per feature), "
            f"got shape {tuple(np.shape(p))}."
        )


def check_real_params(x: Any, **params: Any) -> None:
    """Complex per-feature arrays need a complex ``x``: over a real one their imaginary parts were dropped.

    (A complex ``var`` is refused even with a complex ``x``: a variance is real.)
    """
    def complex_dtype(p):
        dtype = None if p is None else p.dtype if hasattr(p, "dtype") else np.result_type(p)
        return dtype if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating) else None

    if complex_dtype(params.pop("var", None)) is not None:
        raise TypeError("`var` must be real (a variance), got a complex array; pass its real part, e.g. jnp.real(var).")
    if complex_dtype(x) is not None:
        return
    for name, p in params.items():
        dtype = complex_dtype(p)
        if dtype is not None:
            raise TypeError(
                f"`{name}` is complex ({dtype}) but `x` is real ({x.dtype}): jaxbn normalizes "
                "in x's (real) dtype; for a complex affine transform pass a complex x, e.g. "
                "x.astype(jnp.complex64)."
            )


def check_mask(mask: Any, shape: tuple[int, ...]) -> None:
    if mask is None:
        return
    mshape = tuple(np.shape(mask))
    try:
        out = jnp.broadcast_shapes(mshape, tuple(shape))  # symbolic dimensions too (jax.export)
    except (ValueError, TypeError):
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"`mask` of shape {mshape} does not broadcast to the input shape {tuple(shape)}."
        )
    mdtype = getattr(mask, "dtype", None)
    if mdtype is None:
        mdtype = np.asarray(mask).dtype  # Python bools, ints, floats (lists or scalars)
    if not (mdtype == jnp.bool_ or jnp.issubdtype(mdtype, jnp.integer)):
        raise TypeError(f"`mask` must be a boolean or integer array (True or nonzero = use), got dtype {mdtype}.")


def real_numbers(value: Any, name: str, expected: str, hint: str = "") -> np.ndarray:
    """``value`` as a NumPy array of real numbers, or a TypeError naming the argument."""
    try:
        a = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything that is not array-like
        a = None
    if a is None or a.dtype == bool or not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)):
        raise TypeError(f"`{name}` must be {expected}, got {value!r}.{hint}")
    return a


def check_epsilon(epsilon: Any) -> None:
    if isinstance(epsilon, jax.core.Tracer):
        return
    if not np.all(real_numbers(epsilon, "epsilon", "a real number > 0") > 0):
        raise ValueError(f"`epsilon` must be > 0, got {epsilon!r}.")


def check_momentum(momentum: Any, *, name: str = "momentum") -> None:
    if isinstance(momentum, jax.core.Tracer):
        return
    hint = (" (PyTorch's momentum=None, a cumulative average, is running_average='cumulative'.)"
            if momentum is None else "")
    m = real_numbers(momentum, name, "a real number in [0, 1]", hint)
    if not np.all((m >= 0) & (m <= 1)):
        raise ValueError(f"`{name}` must lie in [0, 1], got {momentum!r}.")


def stats_dtype(dtype: Any, *, force_float32: bool = True, name: str = "dtype") -> np.dtype:
    """The dtype statistics are accumulated in: at least float32 (complex64 for complex)."""
    dtype = np.dtype(dtype)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)):
        raise TypeError(f"`{name}` must be a floating-point (or complex) dtype, got {dtype}.")
    if not force_float32:
        return dtype
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return dtype if dtype.itemsize >= 8 else np.dtype(jnp.complex64)
    return dtype if dtype.itemsize >= 4 else np.dtype(jnp.float32)


def result_dtype(*arrays: Any) -> np.dtype:
    """jnp's standard promotion of the given arrays, independent of the strict-promotion flag."""
    with jax.numpy_dtype_promotion("standard"):
        return np.dtype(jnp.result_type(*[a for a in arrays if a is not None]))


def widens(src: Any, dst: Any) -> bool:
    """True when every value of dtype ``src`` is exactly a value of dtype ``dst`` (real floats)."""
    src, dst = np.dtype(src), np.dtype(dst)
    if src == dst:
        return True
    if not (jnp.issubdtype(src, jnp.floating) and jnp.issubdtype(dst, jnp.floating)):
        return False
    a, b = jnp.finfo(src), jnp.finfo(dst)
    return a.nmant <= b.nmant and a.maxexp <= b.maxexp and a.minexp >= b.minexp


def real_dtype(dtype: Any) -> np.dtype:
    return np.dtype(jnp.finfo(dtype).dtype)


def check_groups(groups: Any, size: int) -> None:
    """``axis_index_groups`` must split the ``size`` devices of the axis into groups (every index once)."""
    if groups is None:
        return
    flat = sorted(int(i) for g in groups for i in g)
    if flat != list(range(size)):
        raise ValueError(
            f"`axis_index_groups` must split the {size} device indices of the axis into groups "
            f"(every index in 0..{size - 1} exactly once), got {groups!r}."
        )


def like(value: Any, ref: Any) -> Any:
    """A Python number as it is (weakly typed); an array-valued ``value`` (a bfloat16 scalar, a
    per-feature epsilon) cast to ``ref``'s dtype, so that strict dtype promotion accepts the sum."""
    if isinstance(value, numbers.Real):
        return value
    return jnp.asarray(value).astype(jnp.result_type(ref))
