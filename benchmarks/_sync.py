"""Synchronized batch norm on 8 virtual CPU devices: jaxbn vs flax under ``axis_name``.

Run by ``bn.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the main measurements
keep one device). Prints one JSON object on its last line of stdout.

For each global shape, the batch axis is split over a 1-D mesh ``"batch"`` of 8
devices with ``jax.shard_map``; ``jaxbn.BatchNorm`` and ``flax.linen.BatchNorm``
(both ``axis_name="batch"``, training mode) are compared on

* the collectives in the compiled HLO of the forward pass (y and the updated
  running statistics) and of forward + backward (the gradient w.r.t. x of
  ``sum(y * w)`` over the global batch);
* the time of forward + backward (interleaved rounds, median);
* agreement: the synced y on 8 shards equals each module's unsynced y on the
  whole batch, and jaxbn equals flax.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _harness import block, count_collectives, interleave, median_us
from jax.sharding import PartitionSpec as P

import jaxbn

DEVICES = 8


def _modules():
    return {
        "jaxbn.BatchNorm": lambda **kw: jaxbn.BatchNorm(**kw),
        "flax.linen.BatchNorm": lambda **kw: nn.BatchNorm(**kw),
    }


def run_shape(shape: tuple[int, ...], budget_s: float, seed: int = 0) -> dict:
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(seed)
    x = jnp.asarray((rng.standard_normal(shape) * 2 + 0.5).astype(np.float32))
    w = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    c = shape[-1]
    params = {
        "scale": jnp.asarray((1 + 0.1 * rng.standard_normal(c)).astype(np.float32)),
        "bias": jnp.asarray((0.1 * rng.standard_normal(c)).astype(np.float32)),
    }
    stats = {"mean": jnp.zeros(c, jnp.float32), "var": jnp.ones(c, jnp.float32)}
    xs = jax.device_put(x, jax.NamedSharding(mesh, P("batch")))
    ws = jax.device_put(w, jax.NamedSharding(mesh, P("batch")))

    out: dict = {"shape": list(shape), "per_device_shape": [shape[0] // DEVICES, *shape[1:]]}
    runs, ys, dxs = {}, {}, {}
    for name, make in _modules().items():
        synced = make(use_running_average=False, axis_name="batch")
        alone = make(use_running_average=False)

        def fwd(params, stats, x, bn=synced):
            y, upd = bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        def fwdbwd(params, stats, x, w, bn=synced):
            def loss(x):
                y, upd = bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
                return jnp.sum(y * w), (y, upd["batch_stats"])

            dx, (y, new_stats) = jax.grad(loss, has_aux=True)(x)
            return dx, y, new_stats

        smap = dict(mesh=mesh, check_vma=False)
        fwd_m = jax.jit(
            jax.shard_map(fwd, in_specs=(P(), P(), P("batch")), out_specs=(P("batch"), P()), **smap)
        )
        fb_m = jax.jit(
            jax.shard_map(
                fwdbwd,
                in_specs=(P(), P(), P("batch"), P("batch")),
                out_specs=(P("batch"), P("batch"), P()),
                **smap,
            )
        )
        fwd_c = fwd_m.lower(params, stats, xs).compile()
        fb_c = fb_m.lower(params, stats, xs, ws).compile()
        y_sync, _ = fwd_c(params, stats, xs)
        y_alone, _ = jax.jit(
            lambda p, s, x, bn=alone: bn.apply({"params": p, "batch_stats": s}, x, mutable=["batch_stats"])
        )(params, stats, x)
        ys[name] = np.asarray(y_sync)
        err = float(np.max(np.abs(np.asarray(y_sync) - np.asarray(y_alone))))
        # The backward too: the synced dx against the global batch's.
        dx_sync = np.asarray(fb_c(params, stats, xs, ws)[0])
        dx_alone = jax.jit(jax.grad(
            lambda x, bn=alone: jnp.sum(
                bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])[0] * w
            )
        ))(x)
        dxs[name] = dx_sync
        out.setdefault("synced_vs_global_dx_max_abs_err", {})[name] = float(
            np.max(np.abs(dx_sync - np.asarray(dx_alone)))
        )
        out.setdefault("collectives_forward", {})[name] = count_collectives(fwd_c.as_text())
        out.setdefault("collectives_fwdbwd", {})[name] = count_collectives(fb_c.as_text())
        out.setdefault("synced_vs_global_max_abs_err", {})[name] = err
        runs[name] = lambda c=fb_c: block(c(params, stats, xs, ws))

    out["jaxbn_vs_flax_max_abs_err"] = float(np.max(np.abs(ys["jaxbn.BatchNorm"] - ys["flax.linen.BatchNorm"])))
    out["jaxbn_vs_flax_dx_max_abs_err"] = float(
        np.max(np.abs(dxs["jaxbn.BatchNorm"] - dxs["flax.linen.BatchNorm"]))
    )
    times = interleave(runs, warmup=2, min_rounds=5, max_rounds=200, budget_s=budget_s)
    out["fwdbwd_us"] = {k: median_us(v) for k, v in times.items()}
    out["rounds"] = len(next(iter(times.values())))
    out["ratio_jaxbn_over_flax"] = out["fwdbwd_us"]["jaxbn.BatchNorm"] / out["fwdbwd_us"]["flax.linen.BatchNorm"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", required=True, help="global shapes, e.g. 64x28x28x32,1024x512")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per shape")
    args = ap.parse_args(argv)
    if jax.device_count() != DEVICES:
        print(json.dumps({"error": f"expected {DEVICES} devices, got {jax.device_count()}"}))
        return 1
    results = {"devices": jax.device_count(), "shapes": []}
    for s in args.shapes.split(","):
        shape = tuple(int(d) for d in s.split("x"))
        results["shapes"].append(run_shape(shape, args.budget))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
