"""The training loop: `train_and_evaluate(config, workdir) -> final metrics`.

Design, for speed and exact reproducibility:

* The dataset lives on the devices (uint8) from the start; each epoch draws a
  `jax.random.permutation` from (seed, epoch) and batches are gathered on
  device, so the host sends nothing per step.
* One compiled call runs several training steps (a rolled `jax.lax.scan` on
  accelerators, straight-line code on CPU; see `loop_settings`), donating the
  state; the host fetches the summed metrics of a call while the next one
  runs, and updates the progress bar per call. Every program is compiled
  ahead of time, so epoch times exclude compilation.
* Data parallel (``config.data_parallel``): the same per-device program under
  `jax.shard_map` over a 1-D ``"batch"`` mesh of all devices of all
  processes. Each device gathers its slice of the global batch, BatchNorm
  pools statistics over ``"batch"``, gradients are averaged with `pmean`.
  Running statistics are checked and made identical on every device before
  every evaluation and checkpoint.
* Every random choice derives from (seed, epoch, position), and an orbax
  checkpoint holds everything else at each epoch end, so a run killed and
  resumed ends exactly like an uninterrupted one.

Evaluation uses the running statistics (``use_running_average=True``). By
default (``config.precise_bn_batches``) they are re-estimated at each epoch
end from the current weights over fixed training batches, as the batch-norm
paper prescribes, instead of keeping the lagging moving averages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxbn
from train import config_base, distributed, inputs, models, report
from train.config_base import ConfigError
from train.data import Mnist

# Key streams derived from the seed.
_INIT_STREAM, _SHUFFLE_STREAM, _AUGMENT_STREAM, _POPULATION_STREAM = 0, 1, 2, 3

# Metrics that measure time (differ run to run; everything else is exact).
TIMING_KEYS = frozenset(
    {"wall_time_s", "train_time_s", "epoch_time_s", "steps_time_s", "compile_time_s"}
)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tb"


@struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: optimizer steps taken.
      params: model parameters.
      batch_stats: BatchNorm running statistics ({} without BN).
      opt_state: optax optimizer state.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns.

    Attributes:
      metrics: final metrics (see `train_and_evaluate`).
      history: one record per epoch (as in metrics.jsonl).
      state: the final TrainState (replicated over the mesh when data parallel).
    """

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    state: TrainState


# --------------------------------------------------------------------------
# Optimizer and state
# --------------------------------------------------------------------------


def learning_rate_schedule(config: Any, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step."""
    lr = config.learning_rate
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1))
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(
            transition_steps=max(total_steps, 1), peak_value=lr, pct_start=config.warmup_fraction
        )
    raise ConfigError(f"config.schedule={config.schedule!r}: expected one of "
                      f"{list(config_base.CHOICES['schedule'])}.")


def make_optimizer(config: Any, total_steps: int) -> optax.GradientTransformation:
    """The optax optimizer of `config` (Keras-style epsilon outside the square root)."""
    lr = learning_rate_schedule(config, total_steps)
    name, eps = config.optimizer, config.optimizer_eps
    if name == "sgd":
        tx = optax.sgd(lr)
    elif name == "momentum":
        tx = optax.sgd(lr, momentum=0.9 if config.momentum is None else config.momentum)
    elif name == "rmsprop":
        tx = optax.rmsprop(lr, decay=0.9, eps=eps, eps_in_sqrt=False, momentum=config.momentum or None)
    elif name == "adam":
        tx = optax.adam(lr, eps=eps)
    elif name == "adamw":
        return optax.adamw(lr, eps=eps, weight_decay=config.weight_decay)
    else:
        raise ConfigError(f"config.optimizer={name!r}: expected one of "
                          f"{list(config_base.CHOICES['optimizer'])}.")
    if config.weight_decay > 0:
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx


def _with_standard_promotion(fn: Callable[..., Any], *args: Any) -> Any:
    with jax.numpy_dtype_promotion("standard"):  # optax mixes weak floats and int32
        return fn(*args)


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Initializes parameters, running statistics and optimizer state on the host."""
    key = jax.random.fold_in(jax.random.key(seed), _INIT_STREAM)
    dummy = jnp.zeros((2, 28, 28, 1), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(key)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=_with_standard_promotion(tx.init, params),
    )
    return jax.device_get(state)


# --------------------------------------------------------------------------
# Per-device programs (run as is on one device, or under shard_map)
# --------------------------------------------------------------------------


def _device_index(axis_name: str | None) -> jax.Array | int:
    return 0 if axis_name is None else lax.axis_index(axis_name)


def _psum(x: Any, axis_name: str | None) -> Any:
    return x if axis_name is None else lax.psum(x, axis_name)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _zero_sums() -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)


def chunk_plan(steps_per_epoch: int, target: int) -> list[int]:
    """Splits an epoch into dispatches of about `target` steps.

    Prefers equal chunks (one compiled program): the largest divisor of
    `steps_per_epoch` in (target / 2, target]; otherwise `target`-step chunks
    and one shorter tail chunk (a second program).
    """
    if target >= steps_per_epoch:
        return [steps_per_epoch]
    for k in range(target, target // 2, -1):
        if steps_per_epoch % k == 0:
            return [k] * (steps_per_epoch // k)
    plan = [target] * (steps_per_epoch // target)
    return plan + ([steps_per_epoch % target] if steps_per_epoch % target else [])


YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"


#: config.cpu_ynn_fusions="auto" keeps YNNPACK's reductions from activations of this
#: many elements per device on (8 MiB of float32).
YNN_REDUCE_FROM = 1 << 21


def compiler_options(config: Any, backend: str | None = None, num_devices: int = 1) -> dict[str, str]:
    """XLA compiler options of the trainer's programs for ``config.cpu_ynn_fusions``.

    On CPU, XLA hands some fusions (reductions, dots, weight-gradient
    convolutions, elementwise ops) to the YNNPACK library. For these models
    the generated code is mostly faster: the lenet_bn training step took
    5.1 ms with no YNNPACK fusions against 6.4 ms with XLA's default set
    (BENCHMARKS.md). Only its reductions of large activations pay off: with
    conv_features=(64, 128) and SAME padding (largest activation 3.2M
    elements) the step took 122 ms with YNNPACK reductions alone, 126 ms with
    XLA's default set and 141 ms with none; with (32, 64) (1.6M elements)
    43, 52 and 39 ms. So "auto" (the default) uses no YNNPACK fusions when the
    largest activation per device is below ``YNN_REDUCE_FROM`` elements and
    YNNPACK reductions only from there on. "none", "xla" (XLA's default set)
    or a comma-separated list of kinds (e.g. "reduce,individual_dot") choose
    directly. No options on other backends.
    """
    backend = backend or jax.default_backend()
    setting = config.cpu_ynn_fusions
    if backend != "cpu" or setting == "xla":
        return {}
    if setting == "auto":
        batch = config.batch_size // num_devices if config.data_parallel else config.batch_size
        setting = "reduce" if models.largest_activation(config, batch) >= YNN_REDUCE_FROM else "none"
    kinds = [] if setting == "none" else setting.split(",")
    return {YNN_FUSION_OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{k.strip().upper()}" for k in kinds)}


def _compile(lowered: jax.stages.Lowered, options: dict[str, str]) -> jax.stages.Compiled:
    """Compiles with `options`; if this jaxlib rejects them, warns and compiles without."""
    if not options:
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=options)
    except Exception as e:  # noqa: BLE001 - an XLA without these options: use its defaults
        warnings.warn(f"XLA rejected compiler options {options} ({str(e).splitlines()[0]}); "
                      "compiling with its defaults (see config.cpu_ynn_fusions).",
                      RuntimeWarning, stacklevel=2)
        return lowered.compile()


def loop_settings(config: Any, backend: str | None = None) -> tuple[bool, int]:
    """Returns (unroll, steps per dispatch) for ``config.unroll_steps`` and the backend.

    "auto" unrolls on CPU: XLA:CPU runs the weight-gradient convolutions of a
    while-loop body through a slow generic path (several times slower than the
    same convolutions at the top level of a program), and programs of more
    than a few unrolled steps ran slower per step in our measurements, hence
    2 steps per call there. On accelerators a rolled `lax.scan` of 100 steps
    per call removes per-step dispatch and keeps compile time constant.
    """
    backend = backend or jax.default_backend()
    unroll = config.unroll_steps == "full" or (config.unroll_steps == "auto" and backend == "cpu")
    steps = config.steps_per_dispatch or (2 if unroll else 100)
    return unroll, steps


@dataclasses.dataclass(frozen=True)
class _Programs:
    """Compiled functions of one run."""

    permutation: Callable[[Any], jax.Array]
    train_chunk: dict[int, Callable[..., tuple[TrainState, Any]]]  # by number of steps
    evaluate: dict[str, Callable[..., Any]]
    sync: Callable[[TrainState], tuple[TrainState, jax.Array]] | None
    population: Callable[..., TrainState] | None
    plan: list[int]

    def compile(self, state: TrainState, arrays: dict[str, jax.Array],
                options: dict[str, str]) -> _Programs:
        """Compiles every program ahead of time for these arguments, with XLA `options`."""
        perm = self.permutation(np.int32(1))
        chunks = {
            k: _compile(fn.lower(state, arrays["train_images"], arrays["train_labels"], perm,
                                 np.int32(1), np.int32(0)), options)
            for k, fn in self.train_chunk.items()
        }
        evaluate = {
            split: _compile(self.evaluate["all"].lower(
                state, arrays[f"{split}_images"], arrays[f"{split}_labels"]), options)
            for split in ("val", "test") if f"{split}_images" in arrays
        }
        sync = None if self.sync is None else _compile(self.sync.lower(state), options)
        population = None if self.population is None else _compile(self.population.lower(
            state, arrays["train_images"]), options)
        return dataclasses.replace(self, train_chunk=chunks, evaluate=evaluate, sync=sync,
                                   population=population)


def _make_train_step(config: Any, model: nn.Module, tx: optax.GradientTransformation,
                     axis_name: str | None):
    """One optimizer step on this device's part of the batch."""

    def step(state: TrainState, images: jax.Array, labels: jax.Array):
        x = inputs.to_float(images, config.input_scaling)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            per_example = _cross_entropy(logits, labels)
            return jnp.mean(per_example), (per_example, logits, updates)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (per_example, logits, updates)), grads = grad_fn(state.params)
        if axis_name is not None:
            grads = lax.pmean(grads, axis_name)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes weak floats and int32
            deltas, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, deltas),
            batch_stats=updates.get("batch_stats", state.batch_stats),
            opt_state=opt_state,
        )
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels).astype(jnp.int32)
        sums = (jnp.sum(per_example), correct, jnp.asarray(labels.shape[0], jnp.int32))
        return new_state, sums

    return step


def _make_train_chunk(config: Any, model: nn.Module, tx: optax.GradientTransformation,
                      axis_name: str | None, num_devices: int, num_steps: int, unroll: bool):
    """Runs `num_steps` steps starting at step `start` of the epoch.

    Step ``s`` uses the examples ``perm[s * B:(s + 1) * B]``; under data
    parallelism device ``d`` takes its ``B / num_devices`` of them.
    """
    global_batch = config.batch_size
    local_batch = global_batch // num_devices
    step_fn = _make_train_step(config, model, tx, axis_name)
    augment_root = jax.random.fold_in(jax.random.key(config.seed), _AUGMENT_STREAM)

    def chunk(state, images, labels, perm, epoch, start):
        first = _device_index(axis_name) * local_batch
        augment_key = jax.random.fold_in(augment_root, epoch)

        def body(state, i):
            offset = (start + i) * global_batch + first
            idx = lax.dynamic_slice(perm, (offset,), (local_batch,))
            x = images[idx]
            if config.augment_shift:
                positions = offset + jnp.arange(local_batch, dtype=jnp.int32)
                x = inputs.random_shift(x, augment_key, positions, config.augment_shift)
            return step_fn(state, x, labels[idx])

        if unroll:
            per_step = []
            for i in range(num_steps):
                state, sums = body(state, jnp.int32(i))
                per_step.append(sums)
            sums = jax.tree.map(lambda *v: jnp.stack(v), *per_step)
        else:
            state, sums = lax.scan(body, state, jnp.arange(num_steps, dtype=jnp.int32))
        return state, _psum(jax.tree.map(lambda v: jnp.sum(v, axis=0), sums), axis_name)

    return chunk


def _make_evaluate(config: Any, model: nn.Module, axis_name: str | None, num_devices: int):
    """Summed loss, correct count and count over a whole (replicated) eval set."""
    per_device = -(-config.eval_batch_size // num_devices)
    per_call = per_device * num_devices

    def evaluate(state, images, labels):
        n = images.shape[0]
        first = _device_index(axis_name) * per_device

        def body(sums, j):
            pos = j * per_call + first + jnp.arange(per_device, dtype=jnp.int32)
            valid = pos < n
            idx = jnp.minimum(pos, n - 1)
            x = inputs.to_float(images[idx], config.input_scaling)
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            logits = model.apply(variables, x, train=False)
            per_example = _cross_entropy(logits, labels[idx])
            hits = valid & (jnp.argmax(logits, axis=-1) == labels[idx])
            new = (
                sums[0] + jnp.sum(jnp.where(valid, per_example, jnp.float32(0))),
                sums[1] + jnp.sum(hits).astype(jnp.int32),
                sums[2] + jnp.sum(valid).astype(jnp.int32),
            )
            return new, None

        sums, _ = lax.scan(body, _zero_sums(), jnp.arange(-(-n // per_call), dtype=jnp.int32))
        return _psum(sums, axis_name)

    return evaluate


def population_batches(config: Any, num_train: int) -> int:
    """Batches used to re-estimate the BN statistics (0: keep the running averages)."""
    if config.norm == "none":
        return 0
    return min(config.precise_bn_batches, num_train // config.batch_size)


def _make_population_stats(config: Any, axis_name: str | None, num_devices: int, num_train: int):
    """Replaces the running statistics by their average over fixed training batches.

    This is the inference procedure of the batch-norm paper (Ioffe & Szegedy,
    2015, Algorithm 2): with the final weights, average each BN layer's batch
    mean and batch variance over many training batches of the training batch
    size, instead of relying on the moving averages, which lag behind weights
    that changed during their window. The variance averaged is the biased one
    each layer stores (the paper scales it by m / (m - 1): 1.6% for a dense
    layer at batch 64, 0.003% for LeNet's first conv layer). Unlike
    jaxbn.recompute_batch_stats this works for any BN module (flax's too) and
    runs on the device, in the data-parallel mesh. A copy of the model with
    momentum 0 makes each forward pass store exactly its batch statistics.
    """
    model = models.create_model(_with_momentum(config, 0.0), axis_name)
    global_batch = config.batch_size
    local_batch = global_batch // num_devices
    num_batches = population_batches(config, num_train)
    key = jax.random.fold_in(jax.random.key(config.seed), _POPULATION_STREAM)

    def population(state, images):
        perm = jax.random.permutation(key, num_train).astype(jnp.int32)
        first = _device_index(axis_name) * local_batch

        def body(sums, i):
            idx = lax.dynamic_slice(perm, (i * global_batch + first,), (local_batch,))
            x = inputs.to_float(images[idx], config.input_scaling)
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return jax.tree.map(jnp.add, sums, updates["batch_stats"]), None

        zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
        sums, _ = lax.scan(body, zeros, jnp.arange(num_batches, dtype=jnp.int32))
        scale = jnp.float32(1.0 / num_batches)
        return state.replace(batch_stats=jax.tree.map(lambda v: (v * scale).astype(v.dtype), sums))

    return population


def _with_momentum(config: Any, momentum: float) -> ml_collections.ConfigDict:
    copy = config_base.normalized(config)
    copy.bn_momentum = momentum
    return copy


def _build_programs(config: Any, model: nn.Module, tx: optax.GradientTransformation,
                    mesh: Mesh, num_train: int, steps_per_epoch: int) -> _Programs:
    dp = config.data_parallel
    axis_name = distributed.BATCH_AXIS if dp else None
    num_devices = mesh.size if dp else 1
    unroll, target = loop_settings(config)
    plan = chunk_plan(steps_per_epoch, target)
    replicated = distributed.replicated(mesh)

    def compiled(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
        if dp:
            fn = jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
        return jax.jit(fn, out_shardings=replicated, **jit_kwargs)

    chunks = {
        k: compiled(_make_train_chunk(config, model, tx, axis_name, num_devices, k, unroll),
                    donate_argnums=0)
        for k in sorted(set(plan))
    }
    shuffle_root = jax.random.fold_in(jax.random.key(config.seed), _SHUFFLE_STREAM)

    def permutation(epoch):
        key = jax.random.fold_in(shuffle_root, epoch)
        return jax.random.permutation(key, num_train).astype(jnp.int32)

    population = None
    if population_batches(config, num_train):
        population = compiled(_make_population_stats(config, axis_name, num_devices, num_train),
                              donate_argnums=0)
    return _Programs(
        permutation=jax.jit(permutation, out_shardings=replicated),
        train_chunk=chunks,
        evaluate={"all": compiled(_make_evaluate(config, model, axis_name, num_devices))},
        sync=distributed.make_sync_replicas(mesh) if dp else None,
        population=population,
        plan=plan,
    )


# --------------------------------------------------------------------------
# Outputs: metrics.jsonl, TensorBoard, checkpoints
# --------------------------------------------------------------------------


def json_line(record: dict[str, Any], **kwargs: Any) -> str:
    """``record`` as strict JSON: a non-finite float (a diverged loss) is written as null."""
    def finite(v: Any) -> Any:
        return None if isinstance(v, float) and not np.isfinite(v) else v

    return json.dumps({k: finite(v) for k, v in record.items()}, allow_nan=False, **kwargs)


class _Outputs:
    """metrics.jsonl, TensorBoard events and curves.png (written by process 0 only)."""

    @classmethod
    def disabled(cls) -> _Outputs:
        return cls("", [], None, enabled=False)

    def __init__(self, workdir: str, history: list[dict[str, Any]], resume_step: int | None,
                 enabled: bool):
        self.workdir = workdir
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        with open(self.path(METRICS_FILE), "w") as f:  # rewritten from the checkpoint
            f.writelines(json_line(record) + "\n" for record in history)
        self._files = 0
        self.writer = self._writer(purge_step=resume_step)

    def _writer(self, **kwargs: Any) -> Any:
        from tensorboardX import SummaryWriter

        # A file per writer, named apart (tensorboardX names files by the second).
        self._files += 1
        return SummaryWriter(self.path(TENSORBOARD_DIR),
                             filename_suffix=f".{os.getpid()}.{self._files:06d}", **kwargs)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path(METRICS_FILE), "a") as f:
            f.write(json_line(record) + "\n")

    def flush(self) -> None:
        """Puts every TensorBoard event so far on disk (once per epoch: a killed run keeps them).

        tensorboardX's flush() writes only what its writer thread has taken from
        its queue; close() drains the queue. Later events go to a new file.
        """
        if self.writer is not None:
            self.writer.close()
            self.writer = self._writer()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _has_checkpoints(workdir: str) -> bool:
    path = os.path.join(workdir, CHECKPOINT_DIR)
    return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def _checkpoint_manager(config: Any, workdir: str) -> ocp.CheckpointManager | None:
    if not config.checkpoint:
        return None
    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep, create=True)
    return ocp.CheckpointManager(os.path.join(workdir, CHECKPOINT_DIR), options=options)


class StopRequested(Exception):
    """SIGTERM arrived while a run trained under :func:`stop_on_sigterm`; the run stopped cleanly."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Stop:
    armed = False  # in the epoch loop: SIGTERM waits for the next call boundary
    requested: int | None = None


def _on_sigterm(signum: int, frame: Any) -> None:
    # Only a flag: an exception raised in a signal handler can land in a
    # garbage-collection callback or a __del__, where Python drops it.
    if _Stop.armed:
        _Stop.requested = signum
    else:  # loading, compiling, the final test: nothing to keep, end as usual
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _check_stop() -> None:
    if _Stop.requested is not None:
        signum, _Stop.requested = _Stop.requested, None
        raise StopRequested(signum)


@contextlib.contextmanager
def stop_on_sigterm(program: str) -> Iterator[None]:
    """For command lines: SIGTERM during training stops the run cleanly, with exit status 143.

    SIGTERM (``kill``, a scheduler's preemption) that arrives while epochs
    train is acted on between two compiled calls: the run stops, completes the
    checkpoint being saved and writes TensorBoard's events; rerunning the
    command resumes. At other times (loading, compiling, the final test) it
    ends the process at once, as by default. Only in the main thread of a
    single-process run: in a multi-process run JAX's preemption service takes
    SIGTERM over.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except StopRequested as e:
        sys.stderr.write(f"{program}: stopped by {signal.Signals(e.signum).name}; rerun the "
                         "same command to resume from the last checkpoint.\n")
        sys.exit(128 + e.signum)
    finally:
        signal.signal(signal.SIGTERM, old)
        _Stop.requested = None


# 2: config.momentum is None unless set, and rmsprop applies it (format 1 kept
# 0.9 there and only the "momentum" optimizer used it).
META_FORMAT = 2


def _effective_momentum(config: dict[str, Any], legacy: bool) -> dict[str, Any]:
    """`config` with the momentum its optimizer actually uses, so that equal runs compare equal."""
    if "momentum" not in config:
        return config
    name, value = config.get("optimizer"), config["momentum"]
    if name == "momentum":
        value = 0.9 if value is None else value
    elif legacy or name != "rmsprop" or not value:
        value = None
    return {**config, "momentum": value}


class CheckpointError(RuntimeError):
    """A checkpoint of the workdir cannot be read (damaged or incomplete)."""


def _restore(manager: ocp.CheckpointManager, epoch: int, **items: Any) -> Any:
    """manager.restore of `items` at `epoch`; a CheckpointError naming it if it cannot be read."""
    try:
        return manager.restore(epoch, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax and tensorstore raise many kinds for damaged files
        where = os.path.join(os.fspath(manager.directory), str(epoch))
        older = [int(s) for s in manager.all_steps() if s < epoch]
        way_out = (f"move it away to resume from epoch {max(older)}" if older
                   else "move it away to start afresh")
        first = (str(e).splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"the checkpoint {where} cannot be read ({type(e).__name__}: {first}); {way_out}, "
            "or use a new --workdir.") from e


def _restore_meta(manager: ocp.CheckpointManager | None, config: Any) -> tuple[int, dict[str, Any]]:
    """Returns (latest epoch, its metadata), or (0, {}); checks the config matches."""
    if manager is None or manager.latest_step() is None:
        return 0, {}
    epoch = int(manager.latest_step())
    if epoch > config.num_epochs:
        raise ConfigError(
            f"the workdir holds a checkpoint of epoch {epoch}, past config.num_epochs="
            f"{config.num_epochs}; use a new --workdir or num_epochs >= {epoch}."
        )
    meta = _restore(manager, epoch, meta=ocp.args.JsonRestore()).meta
    saved = _effective_momentum(meta.get("config", {}), legacy=meta.get("format", 1) < 2)
    current = _effective_momentum(config_base.to_dict(config), legacy=False)
    changed = sorted(
        k for k in current
        if k not in config_base.RESUMABLE_KEYS and saved.get(k, current[k]) != current[k]
    )
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"the workdir holds a checkpoint of epoch {epoch} from a different config "
            f"({diffs}); use a new --workdir, or only change {sorted(config_base.RESUMABLE_KEYS)}."
        )
    old_epochs = saved.get("num_epochs", config.num_epochs)
    if config.schedule != "constant" and old_epochs != config.num_epochs:
        # The schedule spans all the run's steps: resuming with another length
        # would jump to a different point of a different curve.
        raise ConfigError(
            f"config.num_epochs={config.num_epochs} differs from the checkpoint's {old_epochs}, "
            f"and the {config.schedule!r} learning-rate schedule spans all epochs; resume with "
            f"num_epochs={old_epochs}, or use a new --workdir (only schedule='constant' runs "
            f"can be extended)."
        )
    return epoch, meta


def _save(manager: ocp.CheckpointManager | None, epoch: int, state: TrainState,
          history: list[dict[str, Any]], config: Any) -> None:
    if manager is None:
        return
    meta = {"epoch": epoch, "history": history, "config": config_base.to_dict(config),
            "format": META_FORMAT}
    manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def _restore_state(manager: ocp.CheckpointManager, epoch: int, like: TrainState) -> TrainState:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return _restore(manager, epoch, state=ocp.args.StandardRestore(abstract)).state


def restore_state(workdir: str, like: TrainState, epoch: int | None = None) -> TrainState:
    """Loads the TrainState saved in `workdir` at `epoch` (default: the latest).

    Args:
      workdir: a training workdir.
      like: a TrainState with the structure, dtypes and shardings to restore to
        (e.g. ``prepare(config)[1]``).
      epoch: the epoch checkpoint to load.

    Raises:
      FileNotFoundError: if the workdir has no checkpoint.
      CheckpointError: if that checkpoint cannot be read.
    """
    path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        epoch = manager.latest_step() if epoch is None else epoch
        if epoch is None or epoch not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {'' if epoch is None else f'of epoch {epoch} '}"
                                    f"in {path}")
        return _restore_state(manager, epoch, like)
    finally:
        manager.close()


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def _fetch(sums: Any) -> tuple[float, int, int]:
    loss, correct, count = jax.device_get(sums)
    return float(loss), int(correct), int(count)


# Training metrics reach the host, the progress bar and TensorBoard about this often.
LOG_EVERY_STEPS = 50


def _rates(sums: tuple[float, int, int]) -> tuple[float, float]:
    loss, correct, count = sums
    return loss / max(count, 1), correct / max(count, 1)


@dataclasses.dataclass
class Run:
    """The pieces of one run shared by the epoch loop (see `prepare`)."""

    config: Any
    programs: _Programs
    arrays: dict[str, jax.Array]
    steps_per_epoch: int
    schedule: optax.Schedule
    outputs: _Outputs
    progress: bool
    num_devices: int
    compile_time_s: float


def train_epoch(run: Run, state: TrainState, epoch: int) -> tuple[TrainState, tuple[float, int, int]]:
    """Trains one epoch; returns the state and the summed training metrics."""
    from tqdm.auto import tqdm

    config, prog = run.config, run.programs
    perm = prog.permutation(np.int32(epoch))
    totals = [0.0, 0, 0]
    bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch}/{config.num_epochs}",
               unit="step", disable=not run.progress, dynamic_ncols=True, leave=True)
    pending: list[tuple[int, Any]] = []  # (steps done after the call, its metric sums)

    def consume(items: list[tuple[int, Any]]) -> None:
        fetched = [_fetch(sums) for sums in jax.device_get([sums for _, sums in items])]
        interval = tuple(sum(f[i] for f in fetched) for i in range(3))
        for i in range(3):
            totals[i] += interval[i]
        done = items[-1][0]
        bar.update(done - bar.n)
        loss, acc = _rates(tuple(totals))
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}")
        interval_loss, interval_acc = _rates(interval)
        global_step = (epoch - 1) * run.steps_per_epoch + done
        run.outputs.scalars({"train/loss": interval_loss, "train/accuracy": interval_acc},
                            global_step)

    start = logged = 0
    for num_steps in prog.plan:
        state, sums = prog.train_chunk[num_steps](
            state, run.arrays["train_images"], run.arrays["train_labels"], perm,
            np.int32(epoch), np.int32(start))
        start += num_steps
        pending.append((start, sums))
        _check_stop()
        if start - logged >= LOG_EVERY_STEPS and len(pending) > 1:
            # Everything but the call just dispatched, which keeps the device busy.
            consume(pending[:-1])
            logged, pending = pending[-2][0], pending[-1:]
    consume(pending)
    bar.close()
    return state, (totals[0], totals[1], totals[2])


def _evaluate(run: Run, state: TrainState, split: str) -> tuple[float, float]:
    sums = run.programs.evaluate[split](state, run.arrays[f"{split}_images"], run.arrays[f"{split}_labels"])
    return _rates(_fetch(sums))


def _sync(run: Run, state: TrainState) -> tuple[TrainState, float]:
    """Makes the running statistics identical on every device (data parallel)."""
    if run.programs.sync is None:
        return state, 0.0
    state, divergence = run.programs.sync(state)
    return state, float(jax.device_get(divergence))


def _warn_if_stale(state: TrainState, when: str) -> None:
    """jaxbn.warn_if_stale on the (synced, replicated) running statistics."""
    if state.batch_stats:
        jaxbn.warn_if_stale({"batch_stats": jax.device_get(state.batch_stats)}, when=when)


def _learning_rate(run: Run, step: int) -> float:
    with jax.numpy_dtype_promotion("standard"):
        return float(run.schedule(step))


def _epoch_record(run: Run, state: TrainState, epoch: int, train_sums,
                  divergence: float) -> dict[str, Any]:
    train_loss, train_acc = _rates(train_sums)
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": epoch * run.steps_per_epoch,
        "learning_rate": _learning_rate(run, epoch * run.steps_per_epoch - 1),
        "train_loss": train_loss,
        "train_accuracy": train_acc,
    }
    if "val_images" in run.arrays:
        record["val_loss"], record["val_accuracy"] = _evaluate(run, state, "val")
    if run.config.data_parallel:
        record["replica_divergence"] = divergence
    return record


def _place_arrays(splits: inputs.Splits, mesh: Mesh) -> dict[str, jax.Array]:
    arrays = {
        "train_images": splits.train_images,
        "train_labels": splits.train_labels,
        "test_images": splits.test_images,
        "test_labels": splits.test_labels,
    }
    if len(splits.val_labels):
        arrays["val_images"] = splits.val_images
        arrays["val_labels"] = splits.val_labels
    return distributed.put_replicated(arrays, mesh)


def _check(config: Any, data: Mnist | None) -> tuple[ml_collections.ConfigDict, Mnist | None]:
    """Validates the config (and injected data) and initializes jax.distributed."""
    config = config_base.normalized(config)
    distributed.initialize(config)
    num_devices = jax.device_count() if config.data_parallel else 1
    if data is not None:
        inputs.check_data(data)
        n_train = config.num_train_examples or len(data.train_labels)
        n_test = config.num_test_examples or len(data.test_labels)
        data = inputs.truncate(data, n_train, n_test)
        num_examples = len(data.train_labels)
    else:
        num_examples, _ = config_base.dataset_sizes(config)
    config_base.check_sizes(config, num_examples, num_devices)
    return config, data


def prepare(config: Any, data: Mnist | None = None, *, verbose: bool = True) -> tuple[Run, TrainState]:
    """Validates `config`, loads the data, builds and compiles everything for training.

    Args:
      config: an experiment config.
      data: an already loaded dataset; default: the one ``config.dataset`` names.
      verbose: report data loading.

    Returns:
      The run (programs, device-resident data, schedule) and the initial state;
      ``train_epoch(run, state, epoch)`` trains one epoch.
    """
    config, data = _check(config, data)
    mesh = distributed.batch_mesh(config.data_parallel)
    if data is None:
        data = inputs.load_dataset(config, verbose=verbose and distributed.is_main_process())
    splits = inputs.make_splits(data, config.validation_fraction, config.seed)
    if jax.process_count() > 1:
        # How each process finds the cluster and its data may differ (the
        # coordinator as localhost on its own host, values from the environment
        # on one host and from flags on another); the cluster formed, so they agree.
        per_process = ("process_id", "num_processes", "coordinator_address", "data_dir", "data_source",
                       "progress_bar")
        shared = {k: v for k, v in config.to_dict().items() if k not in per_process}
        distributed.check_same_on_every_process(
            "the config and data",
            {
                **{f"config.{k}": json.dumps(v, sort_keys=True, default=str) for k, v in sorted(shared.items())},
                "training data": (splits.train_images, splits.train_labels),
                "validation data": (splits.val_images, splits.val_labels),
                "test data": (splits.test_images, splits.test_labels),
            },
        )
    steps_per_epoch = splits.num_train // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs
    model = models.create_model(config, distributed.BATCH_AXIS if config.data_parallel else None)
    tx = make_optimizer(config, total_steps)
    state = distributed.put_replicated(init_state(model, tx, config.seed), mesh)
    arrays = _place_arrays(splits, mesh)
    compile_start = time.perf_counter()
    programs = _build_programs(config, model, tx, mesh, splits.num_train, steps_per_epoch)
    platform = mesh.devices.flat[0].platform
    programs = programs.compile(state, arrays, compiler_options(config, platform, mesh.size))
    run = Run(
        config=config,
        programs=programs,
        arrays=arrays,
        steps_per_epoch=steps_per_epoch,
        schedule=learning_rate_schedule(config, total_steps),
        outputs=_Outputs.disabled(),
        progress=config.progress_bar and distributed.is_main_process(),
        num_devices=mesh.size,
        compile_time_s=time.perf_counter() - compile_start,
    )
    return run, state


def train(config: Any, workdir: str, data: Mnist | None = None) -> TrainResult:
    """Trains and evaluates; resumes from the latest checkpoint in `workdir`.

    Args:
      config: an experiment config (see train.config_base); validated first.
      workdir: where checkpoints, metrics.jsonl, TensorBoard events and
        curves.png go.
      data: an already loaded dataset (e.g. tiny synthetic data in tests);
        default: load the one ``config.dataset`` names.

    Returns:
      The final metrics, the per-epoch history and the final state.

    Raises:
      ConfigError: (a ValueError) for invalid config values, before any data is
        loaded or anything is compiled; also for a workdir that is a file, is
        in use by another process, or holds checkpoints of another config (or
        any, with checkpoint=False).
      CheckpointError: when the latest checkpoint cannot be read.
    """
    start_time = time.perf_counter()
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
        raise ConfigError(f"workdir={workdir!r}: expected a directory path.")
    config, data = _check(config, data)
    workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))  # --workdir=~/x
    main = distributed.is_main_process()
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir={workdir!r} is a file; expected a directory (new or a run's).")
    os.makedirs(workdir, exist_ok=True)
    lock = _lock_workdir(workdir) if main else None
    try:
        return _train_in(config, workdir, data, main, start_time)
    finally:
        if lock is not None:
            lock.close()


def _lock_workdir(workdir: str) -> Any:
    """Holds WORKDIR/.lock for the run: a second training process in the same workdir is refused."""
    import fcntl

    f = open(os.path.join(workdir, ".lock"), "a+")  # noqa: SIM115 (held until the run ends)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(
            f"workdir={workdir!r} is in use by another training process (pid {owner}); "
            "wait for it to finish or use another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _train_in(config: Any, workdir: str, data: Mnist | None, main: bool,
              start_time: float) -> TrainResult:
    if not config.checkpoint and _has_checkpoints(workdir):
        raise ConfigError(
            f"workdir={workdir!r} holds checkpoints, and config.checkpoint=False would leave "
            "its config.json and metrics describing another run than they do; use a new "
            "--workdir, or resume it with checkpoint=True.")
    manager = _checkpoint_manager(config, workdir)
    resume_epoch, meta = _restore_meta(manager, config)

    run, state = prepare(config, data)
    history: list[dict[str, Any]] = []
    if resume_epoch:
        state = _restore_state(manager, resume_epoch, state)
        history = [r for r in meta["history"] if r["epoch"] <= resume_epoch]
        if main:  # stdout is for the metrics
            print(f"Resumed from the checkpoint of epoch {resume_epoch} in {workdir}",
                  file=sys.stderr, flush=True)
    if main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_base.to_dict(config), f, indent=2, sort_keys=True)
    # TensorBoard drops the events at and after purge_step: those of a run that
    # did not reach its checkpoint, or all of them when starting afresh (the
    # resumed epoch's last scalars, at resume_epoch * steps_per_epoch, stay).
    purge_step = resume_epoch * run.steps_per_epoch + 1 if resume_epoch else 0
    run.outputs = _Outputs(workdir, history, purge_step, main)
    diverged = False
    try:
        _Stop.armed = True
        for epoch in range(resume_epoch + 1, config.num_epochs + 1):
            t0 = time.perf_counter()
            state, train_sums = train_epoch(run, state, epoch)
            steps_time = time.perf_counter() - t0
            if run.programs.population is not None:
                state = run.programs.population(state, run.arrays["train_images"])
            state, divergence = _sync(run, state)
            _warn_if_stale(state, "evaluation and checkpointing")
            record = _epoch_record(run, state, epoch, train_sums, divergence)
            record["steps_time_s"] = steps_time
            record["epoch_time_s"] = time.perf_counter() - t0
            if main and not diverged and not np.isfinite(record["train_loss"]):
                diverged = True
                warnings.warn(f"{workdir}: epoch {epoch}: the training loss is "
                              f"{record['train_loss']}; the run has diverged (metrics.jsonl "
                              "records it as null).", stacklevel=2)
            history.append(record)
            run.outputs.record(record)
            run.outputs.scalars(
                {f"epoch/{k}": v for k, v in record.items() if k not in ("epoch", "step")},
                record["step"])
            # On disk before the checkpoint: a run killed after it resumes from
            # it and must find its scalars there (those of an epoch whose
            # checkpoint never came are purged on resume).
            run.outputs.flush()
            _save(manager, epoch, state, history, config)
            _check_stop()
        _Stop.armed = False
        if manager is not None:
            manager.wait_until_finished()
        state, _ = _sync(run, state)
        _warn_if_stale(state, "the final test")
        metrics = _final_metrics(run, state, history, start_time)
        run.outputs.record({"final": True, **metrics})
        if resume_epoch < config.num_epochs:  # else logged by the run that trained them
            run.outputs.scalars(
                {"test/loss": metrics["test_loss"], "test/accuracy": metrics["test_accuracy"]},
                metrics["steps"])
        if main and history:
            report.plot_curves(history, os.path.join(workdir, CURVES_FILE),
                               title=os.path.basename(workdir))
    finally:
        _Stop.armed = False
        run.outputs.close()
        if manager is not None:
            manager.close()
    return TrainResult(metrics=metrics, history=history, state=state)


def _final_metrics(run: Run, state: TrainState, history: list[dict[str, Any]],
                   start_time: float) -> dict[str, Any]:
    test_loss, test_acc = _evaluate(run, state, "test")
    last = history[-1] if history else {}
    metrics: dict[str, Any] = {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "val_accuracy": last.get("val_accuracy"),
        "val_loss": last.get("val_loss"),
        "train_accuracy": last.get("train_accuracy"),
        "train_loss": last.get("train_loss"),
        "epochs": len(history),
        "steps": int(jax.device_get(state.step)),
        "num_devices": run.num_devices if run.config.data_parallel else 1,
        "num_processes": jax.process_count(),
        "train_time_s": float(sum(r["epoch_time_s"] for r in history)),
        "compile_time_s": run.compile_time_s,
        "wall_time_s": time.perf_counter() - start_time,
    }
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict | Any, workdir: str,
                       data: Mnist | None = None) -> dict[str, Any]:
    """Trains the experiment `config` in `workdir` and returns its final metrics.

    Restarting with the same workdir resumes from the last epoch checkpoint and
    ends with the same metrics as an uninterrupted run.

    Args:
      config: an experiment config (configs/*.py ``get_config()``).
      workdir: output directory (checkpoints/, tb/, metrics.jsonl, curves.png).
      data: optional preloaded dataset; default: the one the config names.

    Returns:
      A dict with test_accuracy, test_loss, val_accuracy, val_loss,
      train_accuracy, train_loss (last epoch; None when there is no such
      epoch metric, e.g. no validation split), epochs, steps, num_devices,
      num_processes, train_time_s (sum of epoch times) and wall_time_s.
    """
    return train(config, workdir, data).metrics
