"""Folding inference-mode batch norm into the preceding Dense or Conv layer."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from jaxbn.linen import BatchNorm as JaxbnBatchNorm

_LINEAR = (nn.Dense, nn.Conv)
_NORMS = (JaxbnBatchNorm, nn.BatchNorm)


class FoldedModel(NamedTuple):
    """Result of :func:`fold_batch_norm`.

    Attributes:
      variables: the folded variables: no BatchNorm entries and no
        ``batch_stats`` for the folded layers; the linear layers' kernels and
        biases absorb the normalization.
      apply: ``apply(variables, *args, **kwargs)``, the model with every folded
        BatchNorm removed from the computation.
      pairs: ``(linear_path, batchnorm_path)`` of each folded pair.
    """

    variables: dict[str, Any]
    apply: Callable[..., Any]
    pairs: tuple[tuple[str, str], ...]


def _path(module: nn.Module) -> tuple[str, ...]:
    return tuple(module.scope.path)


def _require_inference_mode(bn: nn.Module, call_args, call_kwargs) -> None:
    """Folding freezes the running statistics into the weights: the sample call must use them."""
    call_mode = call_kwargs.get("use_running_average", call_args[1] if len(call_args) > 1 else None)
    use_running = call_mode if call_mode is not None else bn.use_running_average
    if not use_running and not getattr(bn, "frozen", False):
        raise ValueError(
            f"fold_batch_norm needs a sample call in inference mode, but BatchNorm "
            f"{'/'.join(_path(bn)) or '<top level>'} runs in training mode in it: pass the model's "
            "inference arguments (e.g. train=False)."
        )


def _find_pairs(model: nn.Module, variables, args, kwargs):
    """Runs the model once and records each BN whose input is exactly a Dense/Conv output.

    Returns the pairs and the model's output on the sample call.
    """
    outputs: dict[int, tuple[nn.Module, Any]] = {}
    pairs: list[tuple[tuple[str, ...], tuple[str, ...], nn.Module, nn.Module, int, Any]] = []

    def interceptor(next_fun, call_args, call_kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, _NORMS):
            _require_inference_mode(mod, call_args, call_kwargs)
        out = next_fun(*call_args, **call_kwargs)
        if context.method_name != "__call__":
            return out
        if isinstance(mod, _LINEAR):
            outputs[id(out)] = (mod, out)
        elif isinstance(mod, _NORMS) and call_args:
            hit = outputs.get(id(call_args[0]))
            if hit is not None and hit[1] is call_args[0]:
                pairs.append((_path(hit[0]), _path(mod), hit[0], mod, call_args[0].ndim, out.dtype))
        return out

    with nn.intercept_methods(interceptor):
        result = model.apply(variables, *args, **kwargs)
    return pairs, result


def _check_same_output(reference, folded, names) -> None:
    """Raises if the folded model's output on the sample call is not the original's (up to rounding)."""
    ref_leaves, fold_leaves = jax.tree.leaves(reference), jax.tree.leaves(folded)
    worst = 0.0
    for r, f in zip(ref_leaves, fold_leaves):
        r, f = np.asarray(r), np.asarray(f)
        if not np.issubdtype(r.dtype, np.inexact) or r.size == 0:
            continue
        eps = float(np.finfo(r.dtype).eps) if np.issubdtype(r.dtype, np.floating) else 1e-7
        tol = max(1e-3, 64 * eps) * (1 + float(np.max(np.abs(r.astype(np.float64)))))
        diff = float(np.max(np.abs(r.astype(np.float64) - f.astype(np.float64))))
        if not diff <= tol:
            worst = max(worst, diff) if np.isfinite(diff) else float("inf")
    if worst:
        raise ValueError(
            f"fold_batch_norm: the folded model's output differs from the original's by up to {worst:.3g} "
            f"on the sample call. A folded Dense/Conv output must feed only its BatchNorm; here one of "
            f"{', '.join(f'{lin} -> {bn}' for lin, bn in names)} also feeds something else "
            f"(a residual branch, a second head). Fold such a model by hand or not at all."
        )


def fold_batch_norm(model: nn.Module, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> FoldedModel:
    """Folds every inference-mode BatchNorm that directly follows a Dense or Conv.

    For a linear layer ``z = x @ W + b`` followed by ``y = (z - mean) * s + beta``
    with ``s = gamma / sqrt(var + eps)``, the folded layer is
    ``W' = W * s`` (per output feature) and ``b' = (b - mean) * s + beta``, so the
    BN costs nothing at deployment and the kernel can be quantized as is.

    Pairs are found by running the model once on ``args``/``kwargs`` (which
    must select inference mode, e.g. ``train=False``): a BN (jaxbn's or
    flax's) is folded when its input is exactly the output of a ``nn.Dense`` or
    ``nn.Conv`` (feature axis last). The linear output must feed only that BN,
    as in Conv → BN → activation stacks; the folded model is run once on the
    sample call and must give the original's output (to rounding: at most
    ``max(1e-3, 64 eps) * (1 + max|output|)``), otherwise nothing is returned.

    Args:
      model: the flax.linen model.
      variables: its variables (``params`` and ``batch_stats``).
      *args, **kwargs: a sample call of the model in inference mode.

    Returns:
      A :class:`FoldedModel`; ``folded.apply(folded.variables, *args, **kwargs)``
      equals ``model.apply(variables, *args, **kwargs)``.

    Raises:
      ValueError: if no foldable pair is found, a BN does not normalize the
        last axis, or the folded model's output differs from the original's on
        the sample call (a folded linear output that also feeds something else).
    """
    pairs, reference = _find_pairs(model, variables, args, kwargs)
    if not pairs:
        raise ValueError("fold_batch_norm found no Dense/Conv directly followed by a BatchNorm.")
    params = traverse_util.flatten_dict(unfreeze(variables["params"]))
    stats = traverse_util.flatten_dict(unfreeze(variables.get("batch_stats", {})))
    folded_bn: dict[tuple[str, ...], Any] = {}  # BN path -> its output dtype
    biased = set()
    for lin_path, bn_path, lin, bn, ndim, out_dtype in pairs:
        axes = (bn.axis,) if isinstance(bn.axis, numbers.Integral) else tuple(bn.axis)
        if tuple(a % ndim for a in axes) != (ndim - 1,):
            raise ValueError(
                f"BatchNorm {'/'.join(bn_path)} normalizes axis {bn.axis} of its {ndim}-D input; "
                f"only the last axis (the Dense/Conv features) folds."
            )
        kernel = params[lin_path + ("kernel",)]
        mean = np.asarray(stats[bn_path + ("mean",)], np.float64)
        var = np.asarray(stats[bn_path + ("var",)], np.float64)
        gamma = np.asarray(params.get(bn_path + ("scale",), 1.0), np.float64)
        beta = np.asarray(params.get(bn_path + ("bias",), 0.0), np.float64)
        s = gamma / np.sqrt(var + bn.epsilon)
        b = np.asarray(params.get(lin_path + ("bias",), 0.0), np.float64)
        params[lin_path + ("kernel",)] = jnp.asarray(np.asarray(kernel, np.float64) * s, kernel.dtype)
        params[lin_path + ("bias",)] = jnp.asarray((b - mean) * s + beta, kernel.dtype)
        if not lin.use_bias:
            biased.add(lin_path)
        folded_bn[bn_path] = out_dtype
        for key in [k for k in list(params) if k[: len(bn_path)] == bn_path]:
            del params[key]
        for key in [k for k in list(stats) if k[: len(bn_path)] == bn_path]:
            del stats[key]

    out = {k: v for k, v in unfreeze(variables).items() if k not in ("params", "batch_stats")}
    out["params"] = traverse_util.unflatten_dict(params)
    if stats:
        out["batch_stats"] = traverse_util.unflatten_dict(stats)

    def interceptor(next_fun, call_args, call_kwargs, context):
        path = _path(context.module)
        if context.method_name == "__call__" and path in folded_bn:
            return call_args[0].astype(folded_bn[path])  # the dtype the BN gave
        result = next_fun(*call_args, **call_kwargs)
        if context.method_name == "__call__" and path in biased:
            result = result + context.module.get_variable("params", "bias").astype(result.dtype)
        return result

    def apply(folded_variables, *a, **kw):
        with nn.intercept_methods(interceptor):
            return model.apply(folded_variables, *a, **kw)

    names = tuple(("/".join(lp), "/".join(bp)) for lp, bp, *_ in pairs)
    # Whether the linear output also feeds anything else is not visible to the
    # interceptor; the sample call shows it (the folded output would differ).
    _check_same_output(reference, apply(out, *args, **kwargs), names)
    return FoldedModel(out, apply, names)


__all__ = ["FoldedModel", "fold_batch_norm"]
