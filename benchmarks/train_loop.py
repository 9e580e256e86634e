"""Epoch time of the jaxbn trainer vs a plain per-step jax.jit loop (Flax MNIST example style).

Both loops train the same model (train.models, built from the same config),
with the same optimizer, initial state and data; only the loop differs:

* trainer: train.loop (dataset resident on device as uint8, a jax permutation
  per epoch, several steps per compiled call, donated state, metrics fetched
  once per call, overlapped with the next call).
* flax_example: the loop of the Flax MNIST example: a jax permutation whose
  rows index float32 numpy arrays on the host each step, `apply_model` (grads)
  and `update_model` (apply) as two jitted calls per step, per-step metrics
  averaged at the end of the epoch.
* plain_jit: a leaner per-step loop: numpy permutation, one fused jitted step,
  float32 numpy batches fed per step.
* trainer_xla: the trainer with XLA's default CPU library fusions
  (``cpu_ynn_fusions="xla"``), and plain_jit_opts: plain_jit compiled with the
  trainer's XLA options. Together they split the trainer's gain into what the
  loop saves and what its compiler options save.

Epoch time counts only the training steps of an epoch (no evaluation); all
programs are compiled before timing. Each loop runs its epochs interleaved
with the others', and the median epoch time is reported.

    python benchmarks/train_loop.py                      # lenet_bn on MNIST
    python benchmarks/train_loop.py --norms jaxbn,flax,none --epochs 3
    python benchmarks/train_loop.py --synthetic 6400     # quick, no download
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train import config_base, inputs, loop, models


def flax_example_loop(run: loop.Run, state0: Any, config: Any) -> Callable[[int], float]:
    """The Flax MNIST example's train_epoch; returns epoch(epoch_number) -> seconds."""
    model = models.create_model(config)
    steps = run.steps_per_epoch * config.num_epochs
    tx = loop.make_optimizer(config, steps)
    images = np.asarray(jax.device_get(run.arrays["train_images"]), np.float32) / 255.0
    labels = np.asarray(jax.device_get(run.arrays["train_labels"]))
    batch = config.batch_size

    @jax.jit
    def apply_model(state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                mutable=["batch_stats"])
            one_hot = jax.nn.one_hot(labels, 10)
            loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return grads, updates.get("batch_stats", {}), loss, accuracy

    @jax.jit
    def update_model(state, grads, batch_stats):
        deltas, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, deltas),
                             batch_stats=batch_stats, opt_state=opt_state)

    holder = {"state": jax.device_put(state0, jax.local_devices()[0])}
    rng = jax.random.key(config.seed)

    def epoch(number: int) -> float:
        state = holder["state"]
        t0 = time.perf_counter()
        perms = jax.random.permutation(jax.random.fold_in(rng, number), len(images))
        perms = perms[: run.steps_per_epoch * batch].reshape((run.steps_per_epoch, batch))
        epoch_loss, epoch_accuracy = [], []
        for perm in perms:
            grads, stats, loss, accuracy = apply_model(state, images[perm, ...], labels[perm, ...])
            state = update_model(state, grads, stats)
            epoch_loss.append(loss)
            epoch_accuracy.append(accuracy)
        float(np.mean(epoch_loss)), float(np.mean(epoch_accuracy))
        jax.block_until_ready(state)
        holder["state"] = state
        return time.perf_counter() - t0

    epoch(0)  # compile
    return epoch


def plain_jit_loop(run: loop.Run, state0: Any, config: Any,
                   options: dict[str, str] | None = None) -> Callable[[int], float]:
    """A fused per-step jitted loop fed numpy batches; returns epoch(number) -> seconds.

    `options`: XLA compiler options of its step (default: none, XLA's defaults).
    """
    model = models.create_model(config)
    tx = loop.make_optimizer(config, run.steps_per_epoch * config.num_epochs)
    images = np.asarray(jax.device_get(run.arrays["train_images"]), np.float32) / 255.0
    labels = np.asarray(jax.device_get(run.arrays["train_labels"]))
    batch = config.batch_size

    @partial(jax.jit, compiler_options=options or None)
    def train_step(state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.mean(loss), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        deltas, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, deltas),
                            batch_stats=updates.get("batch_stats", {}), opt_state=opt_state)
        return new, loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    holder = {"state": jax.device_put(state0, jax.local_devices()[0])}

    def epoch(number: int) -> float:
        state = holder["state"]
        t0 = time.perf_counter()
        perm = np.random.default_rng(number).permutation(len(images))
        losses = []
        for s in range(run.steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            state, loss, _ = train_step(state, images[idx], labels[idx])
            losses.append(loss)
        float(np.mean(jax.device_get(losses)))
        jax.block_until_ready(state)
        holder["state"] = state
        return time.perf_counter() - t0

    epoch(0)  # compile
    return epoch


def trainer_loop(run: loop.Run, state0: loop.TrainState) -> Callable[[int], float]:
    """The jaxbn trainer's epoch (train.loop.train_epoch); returns epoch(number) -> seconds."""
    holder = {"state": state0}

    def epoch(number: int) -> float:
        t0 = time.perf_counter()
        state, _ = loop.train_epoch(run, holder["state"], number + 1)
        jax.block_until_ready(state)
        holder["state"] = state
        return time.perf_counter() - t0

    epoch(0)  # warm-up (programs are compiled ahead of time by prepare)
    return epoch


def prepared_trainer_loop(config: Any, data: Any) -> Callable[[int], float]:
    """The trainer's epoch for a run prepared from `config` (its own programs and state)."""
    return trainer_loop(*loop.prepare(config, data, verbose=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "lenet_bn.py"))
    parser.add_argument("--norms", default="jaxbn", help="comma-separated: jaxbn, flax, none")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loop")
    parser.add_argument("--synthetic", type=int, default=0,
                        help="use N synthetic examples instead of MNIST")
    parser.add_argument("--loops", default="trainer,trainer_xla,flax_example,plain_jit,plain_jit_opts")
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}, "
          f"cpu count {os.cpu_count()}")
    base = config_base.load_config_file(args.config)
    base.progress_bar = False
    base.checkpoint = False
    data = inputs.synthetic_mnist(args.synthetic, 1000) if args.synthetic else None
    rows = []
    for norm in args.norms.split(","):
        config = config_base.normalized(base)
        config.norm = norm
        run, state0 = loop.prepare(config, data, verbose=False)
        config = run.config
        host_state = jax.device_get(state0)  # the trainer donates state0
        xla_config = config_base.normalized(config)
        xla_config.cpu_ynn_fusions = "xla"
        options = loop.compiler_options(config)
        makers = {
            "trainer": partial(trainer_loop, run, state0),
            "trainer_xla": partial(prepared_trainer_loop, xla_config, data),
            "flax_example": partial(flax_example_loop, run, host_state, config),
            "plain_jit": partial(plain_jit_loop, run, host_state, config),
            "plain_jit_opts": partial(plain_jit_loop, run, host_state, config, options),
        }
        loops = {name: makers[name]() for name in args.loops.split(",")}
        times: dict[str, list[float]] = {name: [] for name in loops}
        for e in range(1, args.epochs + 1):
            for name, epoch in loops.items():
                times[name].append(epoch(e))
                print(f"  norm={norm} {name:<13} epoch {e}: {times[name][-1]:.2f} s", flush=True)
        medians = {name: statistics.median(t) for name, t in times.items()}
        rows.append((norm, run.steps_per_epoch, medians))

    print(f"\n{args.config}: median epoch time (training steps only), "
          f"{rows[0][1]} steps of batch {base.batch_size}")
    names = list(rows[0][2])
    others = [n for n in names if n != "trainer"] if "trainer" in names else []
    print("| norm | " + " | ".join(names) + "".join(f" | trainer / {n}" for n in others) + " |")
    print("|---" * (len(names) + len(others) + 1) + "|")
    for norm, _, med in rows:
        cells = [f"{med[n]:.2f} s" for n in names] + [f"{med['trainer'] / med[n]:.2f}x" for n in others]
        print(f"| {norm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
