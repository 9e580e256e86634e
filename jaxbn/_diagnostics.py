"""Checks: stale running statistics, and the weight-decay mask that spares BN parameters."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


class StaleBatchStatsWarning(UserWarning):
    """Running statistics still hold their initial values."""


def find_stale_batch_stats(variables: Mapping[str, Any]) -> list[str]:
    """Lists the BN layers whose running statistics were never updated.

    A layer is stale when its running mean is still exactly 0 and its running
    variance exactly 1 (the initial values of flax.linen.BatchNorm and
    jaxbn.BatchNorm): the classic bug of training with the training flag off,
    or of dropping the updated ``batch_stats`` returned by ``apply``.

    Args:
      variables: a variables dict with a ``batch_stats`` collection, the
        ``batch_stats`` collection itself, or an ``nnx.State`` (for example
        ``nnx.state(model, nnx.BatchStat)``).

    Returns:
      The '/'-joined paths of the stale layers (empty when all were updated;
      ``"<top level>"`` for a BatchNorm applied as the model itself).
    """
    stats = variables.get("batch_stats", variables) if isinstance(variables, Mapping) else variables
    layers: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(stats)[0]:
        names = [_key_name(k) for k in path]
        if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey):
            names.pop()  # an nnx Variable's value
        if names:
            layers.setdefault(tuple(names[:-1]), {})[names[-1]] = value
    stale = []
    for layer, entries in sorted(layers.items()):
        has_stats = "mean" in entries and "var" in entries
        if has_stats and np.all(np.asarray(entries["mean"]) == 0) and np.all(np.asarray(entries["var"]) == 1):
            stale.append("/".join(layer) or "<top level>")
    return stale


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def warn_if_stale(variables: Mapping[str, Any], *, when: str = "evaluation") -> list[str]:
    """Warns (StaleBatchStatsWarning) about stale BN layers before ``when``; returns them."""
    stale = find_stale_batch_stats(variables)
    if stale:
        warnings.warn(
            f"Before {when}: the running statistics of {len(stale)} BatchNorm layer(s) were "
            f"never updated ({', '.join(stale)}); they still hold mean=0, var=1. Train with "
            "use_running_average=False and keep the batch_stats returned by "
            "apply(..., mutable=['batch_stats']), or run jaxbn.recompute_batch_stats.",
            StaleBatchStatsWarning,
            stacklevel=2,
        )
    return stale


def weight_decay_mask(params: Any, *, exclude: tuple[str, ...] = ("bias", "scale")) -> Any:
    """A mask for ``optax.add_decayed_weights``/``optax.adamw`` that spares BN and biases.

    A leaf is decayed (True) unless its name is in ``exclude`` (BN/LayerNorm
    ``scale`` and every ``bias`` by default) or it is a vector or scalar (``ndim
    <= 1``), so kernels and embeddings are decayed and normalization parameters
    and biases are not.

    Example::

        tx = optax.adamw(1e-3, weight_decay=1e-4, mask=jaxbn.weight_decay_mask)

    Args:
      params: a parameter pytree (nested dicts, as flax produces).
      exclude: leaf names never decayed.

    Returns:
      A pytree of bools with the structure of ``params``.
    """

    def decide(path, leaf):
        name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
        return bool(name not in exclude and np.ndim(leaf) > 1)

    return jax.tree_util.tree_map_with_path(decide, params)
