"""Processes and devices: jax.distributed initialization, the batch mesh, replica checks.

One process or many, the data-parallel trainer sees one 1-D mesh with axis
``"batch"`` over all global devices. Replicated values (parameters, optimizer
state, running statistics) live on every device; :func:`sync_replicas` checks
that the copies agree and makes the running statistics bitwise identical
before evaluation and checkpointing.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train.config_base import ConfigError

BATCH_AXIS = "batch"

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text in (None, ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r}: expected an integer.") from None


def distributed_settings(config: Any) -> tuple[str, int, int] | None:
    """Returns (coordinator, num_processes, process_id), or None for one process.

    Config values win over the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID environment variables.

    Raises:
      ConfigError: if a coordinator is given without the process count and id,
        or the id is out of range.
    """
    address = config.coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num = config.num_processes if config.num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = config.process_id if config.process_id is not None else _env_int(ENV_PROCESS_ID)
    if address is None:
        if num not in (None, 1) or pid not in (None, 0):
            what = f"num_processes={num}" if num not in (None, 1) else f"process_id={pid}"
            raise ConfigError(
                f"{what} but no coordinator address; set config.coordinator_address or "
                f"${ENV_COORDINATOR} (with the process count and id), or neither for one process."
            )
        return None
    if num is None or pid is None:
        raise ConfigError(
            f"coordinator address {address!r} is set but num_processes={num}, process_id="
            f"{pid}; set both (config.num_processes / config.process_id or "
            f"${ENV_NUM_PROCESSES} / ${ENV_PROCESS_ID})."
        )
    if not 0 <= pid < num:
        raise ConfigError(f"process_id={pid}: expected 0 <= process_id < num_processes={num}.")
    return address, num, pid


def initialize(config: Any) -> None:
    """Calls jax.distributed.initialize when the config or environment asks for it.

    Must run before JAX touches a device. With CPU devices across processes,
    the collectives implementation is set from ``config.cpu_collectives``.

    Raises:
      ConfigError: for inconsistent settings, or several processes without
        ``data_parallel`` (each process would otherwise train on its own).
    """
    settings = distributed_settings(config)
    if settings is None:
        # The caller may have started jax.distributed itself (a launcher's auto-detection).
        if jax.distributed.is_initialized():
            _check_data_parallel(config, jax.process_count())
        return
    address, num, pid = settings
    _check_data_parallel(config, num)
    if jax.distributed.is_initialized():
        if jax.process_count() != num or jax.process_index() != pid:
            raise ConfigError(
                f"jax.distributed is already initialized as process {jax.process_index()} "
                f"of {jax.process_count()}, but the config asks for {pid} of {num}."
            )
        return
    jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
    # jax.distributed waits (minutes) for every process to join, silently.
    print(f"process {pid} of {num}: joining the JAX cluster at {address} ...", file=sys.stderr, flush=True)
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def _check_data_parallel(config: Any, num_processes: int) -> None:
    if not config.data_parallel and num_processes > 1:
        raise ConfigError(
            f"{num_processes} processes need config.data_parallel=True; without it every "
            "process would train its own copy of the model."
        )


def check_same_on_every_process(what: str, parts: dict[str, Any]) -> None:
    """Raises a ConfigError unless every process holds the same ``parts``.

    Every process must build the same model from the same config and data
    (:func:`put_replicated` trusts that); a launcher that passes one process
    another seed or data set would otherwise train diverging replicas without
    a word. Compares a SHA-256 of each part across processes (one small
    all-gather); a no-op in a single process.

    Args:
      what: names the parts in the error (e.g. "the config and data").
      parts: name -> a str, or a tuple of arrays (hashed by dtype, shape and contents).
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digests = []
    for value in parts.values():
        h = hashlib.sha256()
        for item in (value,) if isinstance(value, str) else value:
            if isinstance(item, str):
                h.update(item.encode())
            else:
                a = np.ascontiguousarray(item)
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(a.tobytes())
        digests.append(np.frombuffer(h.digest()[:8], np.uint32))
    mine = np.stack(digests)
    every = np.asarray(multihost_utils.process_allgather(mine))  # (processes, parts, 2)
    differ = [name for i, name in enumerate(parts) if not (every[:, i] == every[0, i]).all()]
    if differ:
        odd = sorted({p for p in range(every.shape[0]) for i, name in enumerate(parts)
                      if name in differ and not (every[p, i] == every[0, i]).all()})
        raise ConfigError(
            f"{what} differ between processes: {', '.join(differ)} on process(es) {odd} "
            "are not the same as on process 0. Every process must run the same config "
            "on the same data."
        )


def is_main_process() -> bool:
    """True on the process that writes logs, metrics and plots."""
    return jax.process_index() == 0


def batch_mesh(data_parallel: bool) -> Mesh:
    """A 1-D mesh with axis "batch": all global devices, or the first local one."""
    devices = jax.devices() if data_parallel else jax.local_devices()[:1]
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, P())


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places host arrays (identical on every process) on every device of `mesh`."""
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def make_sync_replicas(mesh: Mesh):
    """Returns a jitted ``sync(state) -> (state, divergence)`` for replicated state.

    ``divergence`` is the largest absolute difference between any device's copy
    of the parameters or running statistics and device 0's, before syncing.
    The running statistics are then replaced by device 0's copy on every device
    (an exact broadcast), so evaluation and checkpoints see the same values
    everywhere. On a single device this is the identity with divergence 0.
    """

    def per_device(state):
        first = lax.axis_index(BATCH_AXIS) == 0

        def from_first(x):
            x32 = x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
            return lax.psum(jnp.where(first, x32, jnp.zeros_like(x32)), BATCH_AXIS).astype(x.dtype)

        def gap(x, ref):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return jnp.max(jnp.abs(x - ref).astype(jnp.float32), initial=0.0)
            return jnp.max(jnp.abs(x - ref), initial=0.0).astype(jnp.float32)

        stats0 = jax.tree.map(from_first, state.batch_stats)
        params0 = jax.tree.map(from_first, state.params)
        gaps = [gap(a, b) for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(stats0))]
        gaps += [gap(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params0))]
        local = jnp.max(jnp.stack(gaps)) if gaps else jnp.float32(0)
        return state.replace(batch_stats=stats0), lax.pmax(local, BATCH_AXIS)

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    return jax.jit(mapped, donate_argnums=0)
