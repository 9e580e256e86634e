"""Population statistics: recompute every BN layer's running statistics over many batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from jaxbn.linen import MOMENTS_COLLECTION, recording_moments

_METHODS = ("pooled", "average")


class _Pooled:
    """Exact pooled (count, mean, M2) over batches, merged in float64 (Chan et al.)."""

    def __init__(self):
        self.n = self.mean = self.m2 = None
        self.k = 0  # non-empty batches per feature

    def add(self, n, mean, var):
        m2 = var * n
        self.k = self.k + (n > 0)
        if self.n is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        tot = self.n + n
        safe = np.where(tot > 0, tot, 1)
        delta = mean - self.mean
        self.mean = np.where(tot > 0, self.mean + delta * n / safe, self.mean)
        self.m2 = self.m2 + m2 + np.abs(delta) ** 2 * self.n * n / safe
        self.n = tot

    def result(self):
        """(mean, biased var, non-empty batches) per feature."""
        return self.mean, np.where(self.n > 0, self.m2 / np.where(self.n > 0, self.n, 1), 0.0), self.k


class _Average:
    """The classic paper's estimate: E[mean_B] and m/(m-1) * E[var_B] over non-empty batches."""

    def __init__(self):
        self.k = self.mean = self.var = None

    def add(self, n, mean, var):
        seen = (n > 0).astype(np.float64)
        unbiased = var * n / np.maximum(n - 1, 1)
        if self.k is None:
            self.k, self.mean, self.var = seen, mean * seen, unbiased * seen
        else:
            self.k, self.mean, self.var = self.k + seen, self.mean + mean * seen, self.var + unbiased * seen

    def result(self):
        """(mean, unbiased var, non-empty batches) per feature."""
        k = np.where(self.k > 0, self.k, 1)
        return self.mean / k, self.var / k, self.k


def recompute_batch_stats(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    method: str = "pooled",
    jit: bool = True,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Recomputes the running mean and variance of every BN layer over many batches.

    This is the classic paper's inference procedure and "precise BN": with all
    weights frozen, the network is run in training mode on each batch, each
    ``jaxbn.BatchNorm`` layer records its batch statistics, and the running
    statistics are replaced by

    * ``method="pooled"``: the exact mean and (biased) variance of all examples
      seen by the layer, pooled over the batches (float64 accumulation);
    * ``method="average"``: ``E[mean_B]`` and ``m / (m - 1) * E[var_B]`` over the
      batches, as in Ioffe & Szegedy (2015), section 3.1.

    A layer called several times per batch contributes every call. A layer with
    ``virtual_batch_size`` records, per call, what its running averages
    receive: the mean and the within-ghost variance averaged over its ghost
    batches (what it normalizes with in training, as Keras's moving averages);
    the spread between ghost means is not part of it, and ``"average"``'s
    ``m / (m - 1)`` then uses the whole batch's m. Layers that did not run in
    training mode (e.g. ``frozen=True``) keep their statistics. Parameters are
    never changed. Layers with a ``count`` (``running_average="cumulative"`` or
    ``"debiased"``) also get it set to the number of batches (calls) recorded,
    so that training on continues the average as if those batches had been its
    first ones (in the debiased mode: as if they had gathered the weight
    ``1 - momentum**count``). A feature that no batch showed (all its elements
    masked, or only empty batches) keeps its statistics and count.

    Args:
      apply_fn: ``model.apply`` or any function called as
        ``apply_fn(variables, batch, mutable=[...], **apply_kwargs)`` that runs the
        model in training mode (e.g. pass ``train=True`` in ``apply_kwargs``).
      variables: the model variables, with ``params`` and ``batch_stats``.
      batches: an iterable of model inputs (each passed as the second argument).
      method: ``"pooled"`` or ``"average"``.
      jit: compile the statistics pass.
      **apply_kwargs: extra keyword arguments for ``apply_fn``.

    Returns:
      A copy of ``variables`` with the recomputed ``batch_stats``.
    """
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
    if "batch_stats" not in variables:
        raise ValueError("`variables` has no 'batch_stats' collection: the model has no BatchNorm layer.")

    def collect(variables, batch):
        _, state = apply_fn(variables, batch, mutable=["batch_stats", MOMENTS_COLLECTION], **apply_kwargs)
        return state.get(MOMENTS_COLLECTION, {})

    collect = jax.jit(collect) if jit else collect
    acc: dict[tuple[str, ...], Any] = {}
    n_batches = 0
    for batch in batches:
        n_batches += 1
        with recording_moments():  # traced (and, without jit, run) with the recording on
            moments = collect(variables, batch)
        flat = traverse_util.flatten_dict(unfreeze(moments))
        for path, calls in flat.items():
            layer = path[:-1]  # drop the "moments" key
            stats = acc.setdefault(layer, _Pooled() if method == "pooled" else _Average())
            for mom in calls:  # a module called several times records each call
                stats.add(*(np.asarray(v, np.float64) for v in (mom.count, mom.mean, mom.var)))
    if n_batches == 0:
        raise ValueError("`batches` is empty: at least one batch is needed.")
    if not acc:
        raise ValueError(
            "No jaxbn.BatchNorm layer recorded batch statistics: run the model in training "
            "mode (e.g. pass train=True) and use jaxbn.BatchNorm layers."
        )
    out = unfreeze(jax.tree.map(lambda a: a, dict(variables)))
    stats_tree = traverse_util.flatten_dict(unfreeze(out["batch_stats"]))
    for layer, stats in acc.items():
        mean, var, k = stats.result()
        new = {"mean": mean, "var": var}
        if layer + ("count",) in stats_tree:  # the cumulative and debiased modes' number of batches
            new["count"] = k
        for name, value in new.items():
            old = stats_tree[layer + (name,)]
            # A feature that no batch showed (every element masked, or empty batches)
            # keeps its statistics, as a training step would leave them.
            value = np.where(np.asarray(k) > 0, value, np.asarray(old))
            value = np.broadcast_to(value, np.shape(old))
            stats_tree[layer + (name,)] = jax.numpy.asarray(value, dtype=old.dtype)
    out["batch_stats"] = traverse_util.unflatten_dict(stats_tree)
    return out

