"""Batch-norm benchmark: jaxbn against flax.linen.BatchNorm and PyTorch, side by side.

    python benchmarks/bn.py            # full run (a few minutes), writes benchmarks/results/bn.json
    python benchmarks/bn.py --quick    # smoke run (small shapes, few repeats), CI

Everything runs in this process on one CPU device, interleaving the contenders
(each round calls every contender once, in a fresh random order), after warm-up
calls, timing each call up to ``block_until_ready`` and reporting medians.
The 8-device part (sync) runs in a subprocess. Sections:

fwdbwd     training-mode forward + backward: ``jax.grad`` of ``sum(y * w)`` w.r.t.
           x, scale and bias (y returned too) for jaxbn.batch_norm, jaxbn.BatchNorm,
           flax.linen.BatchNorm (its defaults) and torch.nn.functional.batch_norm
           with autograd (channels-last), float32; timed per call and pipelined
           (8 calls dispatched before one wait, as a training loop runs). Also:
           the memory floor, the full-size passes XLA makes (from the compiled
           HLO) and the compiled temporary memory of each JAX contender.
infer      inference mode (running statistics).
fold       Conv + BN against the BN folded into the Conv, and the Conv alone.
reduce     XLA's per-feature sums with and without a broadcast operand (why
           jaxbn's CPU kernels use plain sums).
chain      fwd+bwd of 4 layers of BN -> relu in a row (no conv between), jaxbn.BatchNorm
           against flax.linen.BatchNorm: whether XLA recomputes earlier layers in later ones.
half       the fwd+bwd of a bfloat16 model (x, y and dy in bfloat16, dtype=bfloat16,
           float32 parameters and statistics): jaxbn.BatchNorm against flax.linen.BatchNorm.
masked     fwd+bwd with a mask (80% of the positions kept), float32 and bfloat16:
           jaxbn.BatchNorm against flax.linen.BatchNorm, same mask.
lenet      the LeNet + BN training step of the lenet_bn config (batch 64).
sync       jaxbn vs flax under ``axis_name`` on 8 virtual devices (subprocess).

The memory floor of a fwd+bwd: it must read x for the statistics, read x and
write y, read dy and x for the two reductions, and read dy and x and write dx:
8 passes over the tensor. floor = 8 * nbytes / B with B the copy bandwidth
(read + write) of ``jax.jit(lambda x: x + 1)`` on the same tensor, measured in
the same rounds as the contenders, less the fixed cost of a call (a 1-element
``x + 1`` in the same rounds), which a contender pays once: floor = 4 x (copy
- call) + call.

The exit status is 1 if a contender fails or the results disagree (y, dx,
dscale, dbias against a float64 NumPy reference, and contenders with each
other); timing targets are reported, never enforced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any

# One device for the main measurements, whatever the caller's XLA_FLAGS say.
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# torch's OpenMP workers spin after each parallel region. Unbounded (the
# default), the spinning slows the next JAX contender on a 2-core machine
# ((128, 28, 28, 32): 4.3 -> 5.6 ms); passive waiting (OMP_WAIT_POLICY=PASSIVE)
# instead makes torch wake its sleeping workers on every call (~0.7 ms:
# (64, 120) 64 -> 846 us). A bounded spin avoids both.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _contenders as C
import _harness as H

FULL_SHAPES = [(64, 24, 24, 6), (64, 8, 8, 16), (64, 120), (128, 28, 28, 32), (32, 56, 56, 64), (4096, 512)]
QUICK_SHAPES = [(64, 8, 8, 16), (64, 120)]
LARGE_SHAPES = [(128, 28, 28, 32), (32, 56, 56, 64)]  # larger than the caches: the floor targets
FOLD_FULL = ((32, 28, 28, 16), 32)
FOLD_QUICK = ((8, 12, 12, 8), 16)
CHAIN_FULL = [(64, 24, 24, 6), (128, 28, 28, 32)]
CHAIN_QUICK = [(16, 8, 8, 6), (16, 8, 8, 32)]
CHAIN_DEPTH = 4
SYNC_FULL = ["64x28x28x32", "1024x512"]
SYNC_QUICK = ["16x8x8x16"]

JAXBN_FN, JAXBN_MOD, FLAX, TORCH = "jaxbn.batch_norm", "jaxbn.BatchNorm", "flax.linen.BatchNorm", "torch"
COPY = "copy (x + 1)"
CALL = "call (1-element x + 1)"

# Agreement tolerances (float32 against a float64 reference), relative to the largest |value|.
TOL = {"y": 1e-4, "dx": 1e-3, "dscale": 1e-3, "dbias": 1e-3}


class Report:
    """Collects results, errors and agreement checks; prints as it goes."""

    def __init__(self):
        self.data: dict = {"errors": [], "agreement": []}

    def error(self, where: str, exc: BaseException) -> None:
        msg = f"{where}: {type(exc).__name__}: {exc}"
        print(f"ERROR {msg}", file=sys.stderr)
        traceback.print_exc()
        self.data["errors"].append(msg)

    def agree(self, where: str, name: str, got: dict, ref: dict, tol: dict) -> bool:
        """Checks got against ref (max |diff| / max |ref| per output); records the result."""
        worst, ok = {}, True
        for key, r in ref.items():
            g = np.asarray(got[key], np.float64)
            r = np.asarray(r, np.float64)
            if g.shape != r.shape:
                worst[key] = float("inf")
                ok = False
                continue
            err = float(np.max(np.abs(g - r)) / max(float(np.max(np.abs(r))), 1e-30))
            worst[key] = err
            ok &= bool(np.isfinite(err) and err <= tol[key])
        self.data["agreement"].append({"where": where, "contender": name, "rel_err": worst, "ok": ok})
        if not ok:
            print(f"DISAGREE {where} {name}: {worst} (tolerance {tol})", file=sys.stderr)
        return ok

    @property
    def ok(self) -> bool:
        return not self.data["errors"] and all(a["ok"] for a in self.data["agreement"])


def check_and_time(rep, where, cons, ref, copy, budget, extra=None):
    """Checks every contender against ``ref`` (dropping failures), then times them
    interleaved with ``copy`` (:func:`_contenders.copy_contender` of the input)
    and the ``extra`` callables; returns (timed callables, times, medians in us)."""
    for name, con in list(cons.items()):
        try:
            rep.agree(where, name, con.result(), ref, TOL)
        except Exception as e:  # noqa: BLE001
            rep.error(f"{where} {name}", e)
            del cons[name]
    fns = {name: con.run for name, con in cons.items()}
    fns[COPY] = copy.run
    fns.update(extra or {})
    times = H.interleave(fns, warmup=2, min_rounds=5, max_rounds=300, budget_s=budget)
    return fns, times, {k: H.median_us(v) for k, v in times.items()}


#: Calls in flight in the pipelined timing of :func:`time_pipelined`.
PIPELINE = 8


def time_pipelined(cons, copy, budget):
    """Time per call when ``PIPELINE`` calls are dispatched before one wait, as a
    training loop dispatches its steps (JAX returns before the work is done, so
    the dispatch of a call overlaps the execution of the one before it).
    Contenders without asynchronous dispatch (torch) make their calls in turn.
    Interleaved rounds like :func:`check_and_time`; returns medians in us per call."""
    launches = {name: con.launch or con.run for name, con in cons.items()}
    launches[COPY] = copy.launch
    fns = {name: (lambda f=f: H.block([f() for _ in range(PIPELINE)])) for name, f in launches.items()}
    times = H.interleave(fns, warmup=2, min_rounds=5, max_rounds=150, budget_s=budget)
    return {k: H.median_us(v) / PIPELINE for k, v in times.items()}


def passes_str(h: dict) -> str:
    """``passes / kernels``, with the costlier branch of any conditional in brackets."""
    out = f"{h['passes']:g} / {h['kernels']}"
    if (h.get("passes_max"), h.get("kernels_max")) != (h["passes"], h["kernels"]):
        out += f" ({h['passes_max']:g} / {h['kernels_max']})"
    return out


def shape_str(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def fmt_us(us: float | None) -> str:
    if us is None or not math.isfinite(us):
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def fmt_x(r: float | None) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------- sections


def section_fwdbwd(rep: Report, shapes, budget: float, with_torch: bool) -> None:
    results = []
    for shape in shapes:
        print(f"fwdbwd {shape_str(shape)} ...", flush=True)
        entry: dict = {"shape": list(shape), "nbytes": int(np.prod(shape)) * 4}
        p = C.problem(shape)
        ref = C.reference_fwdbwd(p)
        try:
            cons = C.fwdbwd_contenders(p, with_torch=with_torch)
        except Exception as e:  # noqa: BLE001
            rep.error(f"fwdbwd {shape_str(shape)} build", e)
            continue
        copy = C.copy_contender(p["x"])
        call = C.copy_contender(np.zeros(1, np.float32))
        fns, times, med = check_and_time(
            rep, f"fwdbwd {shape_str(shape)}", cons, ref, copy, budget, extra={CALL: call.run}
        )
        entry["rounds"] = len(times[COPY])
        del fns[CALL], times[CALL]
        entry["call_us"] = med.pop(CALL)
        entry["times_us"] = med
        entry["min_us"] = {k: min(v) * 1e6 for k, v in times.items()}
        # 8 passes = 4 copies of their bytes, plus the fixed cost of one call (a
        # 1-element x + 1, timed in the same rounds), which a contender pays once.
        entry["floor_us"] = 4 * max(med[COPY] - entry["call_us"], 0) + entry["call_us"]
        bw = rep.data.get("bandwidth", {})
        if bw.get("jax"):
            # The same floor with the copy bandwidth of a buffer far larger than the caches.
            entry["floor_large_buffer_us"] = 8 * entry["nbytes"] / (bw["jax"] * 1e9) * 1e6
        entry["copy_bandwidth_GBps"] = 2 * entry["nbytes"] / (max(med[COPY] - entry["call_us"], 1e-3) * 1e-6) / 1e9
        entry["over_floor"] = {k: v / entry["floor_us"] for k, v in med.items() if k != COPY}
        for base in (FLAX, TORCH):
            if base in med:
                entry[f"over_{'flax' if base == FLAX else 'torch'}"] = {
                    k: v / med[base] for k, v in med.items() if k not in (COPY, base)
                }
        pipe = time_pipelined(cons, copy, budget / 2)
        entry["pipelined_us"] = pipe
        entry["pipelined_over_flax"] = {k: v / pipe[FLAX] for k, v in pipe.items() if k not in (COPY, FLAX)}
        entry["page_faults_per_call"] = {
            k: H.page_faults_per_call(f, calls=3 if budget < 1 else 10) for k, f in fns.items()
        }
        entry["temp_bytes"], entry["hlo"] = {}, {}
        for name, con in cons.items():
            if con.compiled is not None:
                entry["temp_bytes"][name] = int(con.compiled.memory_analysis().temp_size_in_bytes)
                entry["hlo"][name] = H.hlo_traffic(con.compiled.as_text(), entry["nbytes"])
        results.append(entry)
        print(
            "   " + "  ".join(f"{k}: {fmt_us(v)}" for k, v in med.items()) + f"  [{entry['rounds']} rounds]",
            flush=True,
        )
        print("   pipelined: " + "  ".join(f"{k}: {fmt_us(v)}" for k, v in pipe.items()), flush=True)
    rep.data["fwdbwd"] = results
    rep.data["fwdbwd_pipelined_geomean"] = {
        f"{name} / {FLAX}": H.geomean([e["pipelined_over_flax"][name] for e in results])
        for name in (JAXBN_FN, JAXBN_MOD, TORCH)
        if results and all(name in e["pipelined_over_flax"] for e in results)
    }
    summary = {}
    for name in (JAXBN_FN, JAXBN_MOD, TORCH):
        for base, key in ((FLAX, "over_flax"), (TORCH, "over_torch")):
            if name == base:
                continue
            vals = [e[key][name] for e in results if key in e and name in e[key]]
            if vals:
                summary[f"{name} / {base}"] = H.geomean(vals)
    if TORCH in (results[0]["times_us"] if results else {}):
        vals = [e["times_us"][FLAX] / e["times_us"][TORCH] for e in results if TORCH in e["times_us"]]
        summary[f"{FLAX} / {TORCH}"] = H.geomean(vals)
    rep.data["fwdbwd_geomean"] = summary


def section_infer(rep: Report, shapes, budget: float, with_torch: bool) -> None:
    results = []
    for shape in shapes:
        print(f"infer {shape_str(shape)} ...", flush=True)
        p = C.problem(shape)
        ref = C.reference_inference(p)
        try:
            cons = C.inference_contenders(p, with_torch=with_torch)
        except Exception as e:  # noqa: BLE001
            rep.error(f"infer {shape_str(shape)} build", e)
            continue
        _, times, med = check_and_time(rep, f"infer {shape_str(shape)}", cons, ref, C.copy_contender(p["x"]), budget)
        entry = {"shape": list(shape), "times_us": med, "rounds": len(times[COPY])}
        entry["min_us"] = {k: min(v) * 1e6 for k, v in times.items()}
        if FLAX in cons and cons[FLAX].compiled is not None:
            ref_sig = H.kernel_signature(cons[FLAX].compiled.as_text())
            entry["same_kernels_as_flax"] = {
                k: H.kernel_signature(c.compiled.as_text()) == ref_sig
                for k, c in cons.items()
                if c.compiled is not None and k != FLAX
            }
        entry["over_flax"] = {k: v / med[FLAX] for k, v in med.items() if k != FLAX and FLAX in med}
        entry["over_copy"] = {k: v / med[COPY] for k, v in med.items() if k != COPY}
        results.append(entry)
    rep.data["infer"] = results
    if results:
        rep.data["infer_geomean"] = {
            f"{name} / {FLAX}": H.geomean([e["over_flax"][name] for e in results if name in e["over_flax"]])
            for name in ("jaxbn.normalize", JAXBN_MOD, TORCH)
            if any(name in e["over_flax"] for e in results)
        }


def section_fold(rep: Report, spec, budget: float) -> None:
    in_shape, features = spec
    print(f"fold {shape_str(in_shape)} -> {features} channels ...", flush=True)
    try:
        cons = C.fold_contenders(in_shape, features)
    except Exception as e:  # noqa: BLE001
        rep.error("fold build", e)
        return
    outs = {}
    for name, con in list(cons.items()):
        try:
            outs[name] = con.result()
        except Exception as e:  # noqa: BLE001
            rep.error(f"fold {name}", e)
            del cons[name]
    base = "Conv+jaxbn.BatchNorm"
    if base in outs:
        for name in outs:
            if name != base and "no bias" not in name:
                rep.agree("fold", name, outs[name], outs[base], {"y": 1e-4})
    times = H.interleave({k: c.run for k, c in cons.items()}, warmup=2, min_rounds=5, max_rounds=300, budget_s=budget)
    med = {k: H.median_us(v) for k, v in times.items()}
    alone, bare = "Conv alone (with bias)", "Conv alone (no bias)"
    rep.data["fold"] = {
        "input_shape": list(in_shape),
        "features": features,
        "kernel": [3, 3],
        "times_us": med,
        "min_us": {k: min(v) * 1e6 for k, v in times.items()},
        "over_conv_alone": {k: v / med[alone] for k, v in med.items()} if alone in med else {},
        "over_conv_no_bias": {k: v / med[bare] for k, v in med.items()} if bare in med else {},
        "rounds": len(times[alone]) if alone in times else 0,
    }


REDUCE_FULL = (100352, 64)  # (32, 56, 56, 64) as the kernels see it
REDUCE_QUICK = (4096, 64)


def section_reduce(rep: Report, shape, budget: float) -> None:
    """Per-feature sums over the rows of a matrix, with and without a broadcast operand.

    Why jaxbn's CPU kernels use the plain sums: XLA:CPU reduces ``x``,
    ``x * x`` and ``dy * x`` at memory speed, but ``x - k`` (a per-feature
    vector broadcast over the rows) at a fraction of it.
    """
    jnp = jax.numpy
    print(f"reduce {shape_str(shape)} ...", flush=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray((rng.standard_normal(shape) * 2 + 0.5).astype(np.float32))
    dy = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    k = x[0]
    programs = {
        "sum(x)": (lambda x, dy, k: jnp.sum(x, 0), "x"),
        "sum(x - k)": (lambda x, dy, k: jnp.sum(x - k, 0), "x"),
        "sum(x * x)": (lambda x, dy, k: jnp.sum(x * x, 0), "x"),
        "sum((x - k)^2)": (lambda x, dy, k: jnp.sum((x - k) ** 2, 0), "x"),
        "sum(dy * x)": (lambda x, dy, k: jnp.sum(dy * x, 0), "x, dy"),
        "sum(dy * (x - k))": (lambda x, dy, k: jnp.sum(dy * (x - k), 0), "x, dy"),
        "x + 1 (copy)": (lambda x, dy, k: x + 1, "x -> out"),
    }
    fns = {}
    for name, (f, _) in programs.items():
        compiled = jax.jit(f).lower(x, dy, k).compile()
        fns[name] = lambda c=compiled: H.block(c(x, dy, k))
    times = H.interleave(fns, warmup=2, min_rounds=5, max_rounds=300, budget_s=budget)
    med = {name: H.median_us(v) for name, v in times.items()}
    nbytes = x.nbytes
    moved = {name: nbytes * (2 if "dy" in reads or "out" in reads else 1) for name, (_, reads) in programs.items()}
    rep.data["reduce"] = {
        "shape": list(shape),
        "times_us": med,
        "reads": {name: reads for name, (_, reads) in programs.items()},
        "GBps": {name: moved[name] / (med[name] * 1e-6) / 1e9 for name in med},
        "rounds": len(times["sum(x)"]),
    }


def _time_modules(fns: dict, budget: float) -> dict:
    """Times jaxbn.BatchNorm's and flax's callables interleaved: medians (us), their ratio, rounds."""
    times = H.interleave(fns, warmup=2, min_rounds=5, max_rounds=300, budget_s=budget)
    med = {k: H.median_us(v) for k, v in times.items()}
    ratio = med[JAXBN_MOD] / med[FLAX] if {JAXBN_MOD, FLAX} <= med.keys() else None
    return {"times_us": med, "jaxbn_over_flax": ratio, "rounds": len(next(iter(times.values()), []))}


def section_chain(rep: Report, shapes, depth: int, budget: float) -> None:
    """``depth`` layers of BN -> relu applied in a row: ``jax.grad`` of ``sum(out * w)`` w.r.t. x and the BN parameters.

    Between two BN layers there is only an elementwise op, so XLA may fuse a
    layer's output computation into every consumer in the next layer (and
    recompute it there); this measures how much that costs each module. Both
    modules are checked against each other.
    """
    import flax.linen as nn

    import jaxbn

    jnp = jax.numpy
    out = []
    for shape in shapes:
        print(f"chain {shape_str(shape)} x {depth} ...", flush=True)
        where = f"chain {shape_str(shape)}"
        p = C.problem(shape)
        x, w = jnp.asarray(p["x"]), jnp.asarray(p["w"])
        fns, results, hlo = {}, {}, {}
        for name, module in ((JAXBN_MOD, jaxbn.BatchNorm), (FLAX, nn.BatchNorm)):
            try:
                bns = [module(use_running_average=False, epsilon=C.EPS) for _ in range(depth)]
                vs = [bn.init(jax.random.key(i), x) for i, bn in enumerate(bns)]

                def loss(x, vs, w, bns=bns):
                    for bn, v in zip(bns, vs):
                        x = jax.nn.relu(bn.apply(v, x, mutable=["batch_stats"])[0])
                    return jnp.sum(x * w), x

                compiled = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)).lower(x, vs, w).compile()
                (dx, dvs), y = compiled(x, vs, w)
                results[name] = {"y": np.asarray(y), "dx": np.asarray(dx),
                                 "dscale": np.concatenate([np.asarray(v["params"]["scale"]) for v in dvs]),
                                 "dbias": np.concatenate([np.asarray(v["params"]["bias"]) for v in dvs])}
                hlo[name] = H.hlo_traffic(compiled.as_text(), x.nbytes)
                fns[name] = lambda c=compiled, vs=vs: H.block(c(x, vs, w))
            except Exception as e:  # noqa: BLE001
                rep.error(f"{where} {name}", e)
        if FLAX in results and JAXBN_MOD in results:
            rep.agree(where, JAXBN_MOD, results[JAXBN_MOD], results[FLAX], TOL)
        out.append({"shape": list(shape), "depth": depth, "hlo": hlo, **_time_modules(fns, budget)})
    rep.data["chain"] = out


#: Agreement tolerances of the bfloat16 section: y and dx are rounded to bfloat16
#: (relative precision 2**-8), and each module rounds its own intermediates; the
#: parameters' gradients are float32.
HALF_TOL = {"y": 1e-2, "dx": 1.5e-2, "dscale": 1e-4, "dbias": 1e-4}


def _module_fwdbwd(rep: Report, where: str, shape, dtype, mask, tol: dict) -> tuple[dict, dict]:
    """``jax.grad`` of ``sum(y * w)`` w.r.t. x and the parameters of jaxbn.BatchNorm and flax's, x, w
    (so dy) and y in ``dtype`` (``dtype=`` too), float32 parameters; ``mask`` (or None) passed to both.

    Each module is checked against a float64 reference computed from the same
    ``dtype`` values. Returns the entry of the results (shape, bytes, the full-size
    passes and kernels in tensor sizes of ``dtype``, the compiled temporary memory)
    and the compiled calls to time, by contender.
    """
    import flax.linen as nn

    import jaxbn

    jnp = jax.numpy
    p = C.problem(shape)
    x, w = jnp.asarray(p["x"], dtype), jnp.asarray(p["w"], dtype)
    ref = C.reference_fwdbwd({**p, "x": np.asarray(x, np.float32), "w": np.asarray(w, np.float32)}, mask=mask)
    fns, hlo, temp = {}, {}, {}
    for name, module in ((JAXBN_MOD, jaxbn.BatchNorm), (FLAX, nn.BatchNorm)):
        try:
            bn = module(use_running_average=False, epsilon=C.EPS, dtype=dtype)
            v = bn.init(jax.random.key(0), x)
            params = {"scale": jnp.asarray(p["scale"]), "bias": jnp.asarray(p["bias"])}

            def loss(params, x, w, m, bn=bn, stats=v["batch_stats"]):
                y, _ = bn.apply({"params": params, "batch_stats": stats}, x, mask=m, mutable=["batch_stats"])
                return jnp.sum(y.astype(jnp.float32) * w.astype(jnp.float32)), y

            args = (params, x, w, None if mask is None else jnp.asarray(mask))
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)).lower(*args).compile()
            (dp, dx), y = compiled(*args)
            rep.agree(where, name, {"y": y, "dx": dx, "dscale": dp["scale"], "dbias": dp["bias"]}, ref, tol)
            hlo[name] = H.hlo_traffic(compiled.as_text(), x.nbytes)
            temp[name] = int(compiled.memory_analysis().temp_size_in_bytes)
            fns[name] = lambda c=compiled, args=args: H.block(c(*args))
        except Exception as e:  # noqa: BLE001
            rep.error(f"{where} {name}", e)
    return {"shape": list(shape), "nbytes": x.nbytes, "hlo": hlo, "temp_bytes": temp}, fns


def section_half(rep: Report, shapes, budget: float) -> None:
    """Training-mode fwd+bwd of a bfloat16 model: ``jax.grad`` of ``sum(y * w)`` w.r.t. x and
    the parameters, with x, w (so dy) and y in bfloat16 and ``dtype=bfloat16``.

    Both modules are checked against a float64 reference computed from the same
    bfloat16 values. Reported: time per call, full-size passes and kernels (in
    bfloat16 tensor sizes) and compiled temporary memory.
    """
    out = []
    for shape in shapes:
        print(f"half {shape_str(shape)} ...", flush=True)
        entry, fns = _module_fwdbwd(rep, f"half {shape_str(shape)}", shape, jax.numpy.bfloat16, None, HALF_TOL)
        out.append({**entry, **_time_modules(fns, budget)})
        print("   " + "  ".join(f"{k}: {fmt_us(v)}" for k, v in out[-1]["times_us"].items()), flush=True)
    rep.data["half"] = out
    ratios = [e["jaxbn_over_flax"] for e in out if e["jaxbn_over_flax"]]
    rep.data["half_geomean"] = H.geomean(ratios) if ratios else None


def section_masked(rep: Report, shapes, budget: float) -> None:
    """Training-mode fwd+bwd with a mask, float32 and bfloat16: jaxbn.BatchNorm against
    flax.linen.BatchNorm, both given the same boolean mask of x's shape (whole positions,
    80% kept), checked against a float64 reference.
    """
    jnp = jax.numpy
    out = []
    for dtype, tol in ((jnp.float32, TOL), (jnp.bfloat16, HALF_TOL)):
        name = jnp.dtype(dtype).name
        for shape in shapes:
            print(f"masked {name} {shape_str(shape)} ...", flush=True)
            rng = np.random.default_rng(1)
            mask = np.broadcast_to(rng.random(shape[:-1] + (1,)) < 0.8, shape)
            entry, fns = _module_fwdbwd(rep, f"masked {name} {shape_str(shape)}", shape, dtype, mask, tol)
            out.append({"dtype": name, **entry, **_time_modules(fns, budget)})
            print("   " + "  ".join(f"{k}: {fmt_us(v)}" for k, v in out[-1]["times_us"].items()), flush=True)
    rep.data["masked"] = out
    ratios = [e["jaxbn_over_flax"] for e in out if e["jaxbn_over_flax"]]
    rep.data["masked_geomean"] = H.geomean(ratios) if ratios else None


def _lenet_costs(times: dict[str, list[float]], steps: int) -> dict[str, Any]:
    """Step times, BN cost and step / no-BN step (both paired per round) of one compile setting."""
    step_us = {k: H.median_us(v) / steps for k, v in times.items()}
    out: dict[str, Any] = {"step_us": step_us}
    if "no BN" in step_us:
        # Paired per round (both timed in the same round, seconds apart), then the
        # median: slow drifts of the machine cancel out of the difference.
        out["bn_cost_us"] = {
            k: H.median_us([a - b for a, b in zip(times[k], times["no BN"])]) / steps
            for k in step_us
            if k != "no BN"
        }
        # Also paired per round: the median of the per-round ratios (the ratio of
        # the two medians moves with drifts between the rounds).
        out["over_no_bn"] = {
            k: statistics.median(a / b for a, b in zip(times[k], times["no BN"]))
            for k in step_us
            if k != "no BN"
        }
        if JAXBN_MOD in out["bn_cost_us"] and FLAX in out["bn_cost_us"] and out["bn_cost_us"][FLAX] > 0:
            out["bn_cost_jaxbn_over_flax"] = out["bn_cost_us"][JAXBN_MOD] / out["bn_cost_us"][FLAX]
    return out


def section_lenet(rep: Report, rounds: int, steps: int) -> None:
    """Step time of the three networks: ``rounds`` interleaved rounds of ``steps`` steps each
    (many short rounds, so that drifts of the machine cancel out of the BN cost).

    Each network is compiled as the trainer compiles the lenet_bn config (its XLA
    options, ``train.loop.compiler_options``; the targets use these) and, where
    those options are not empty, also with XLA's defaults."""
    import _lenet

    options = _lenet.trainer_compiler_options()
    settings = {"trainer": options, **({"xla": {}} if options else {})}
    print(f"lenet: {rounds} x {steps} steps per contender, compiler options {options} ...", flush=True)
    trainers, losses = {}, {}
    for setting, opts in settings.items():
        for norm, name in (("jaxbn", JAXBN_MOD), ("flax", FLAX), ("none", "no BN")):
            try:
                trainers[setting, name] = _lenet.make_trainer(norm, compiler_options=opts)
                losses[setting, name] = trainers[setting, name]["run_steps"](3)  # warm-up
            except Exception as e:  # noqa: BLE001
                rep.error(f"lenet {norm} ({setting} options)", e)
    for key, loss in losses.items():
        if not math.isfinite(loss):
            rep.data["errors"].append(f"lenet {key}: non-finite loss {loss}")
    for setting in settings:
        # Same initial variables and batches: after the warm-up steps the losses
        # with jaxbn's and flax's BN must agree (float rounding apart).
        a, b = losses.get((setting, JAXBN_MOD)), losses.get((setting, FLAX))
        if a is not None and b is not None:
            err = abs(a - b) / max(abs(b), 1e-12)
            rep.data["agreement"].append(
                {"where": f"lenet loss ({setting} options)", "contender": "jaxbn vs flax",
                 "rel_err": err, "ok": err <= 1e-3}
            )
    times = H.interleave(
        {k: (lambda t=t: t["run_steps"](steps)) for k, t in trainers.items()},
        warmup=0,
        min_rounds=rounds,
        max_rounds=rounds,
        budget_s=0,
    )
    by_setting = {
        setting: _lenet_costs({name: v for (s, name), v in times.items() if s == setting}, steps)
        for setting in settings
    }
    out = {
        "steps_per_epoch": _lenet.STEPS_PER_EPOCH,
        "timed_steps": steps,
        "rounds": rounds,
        "model": next(iter(trainers.values()))["source"] if trainers else None,
        "compiler_options": options,
        **by_setting["trainer"],
        "xla_defaults": by_setting.get("xla"),
        "temp_bytes": {name: int(t["compiled"].memory_analysis().temp_size_in_bytes)
                       for (s, name), t in trainers.items() if s == "trainer"},
    }
    out["epoch_s"] = {k: v * _lenet.STEPS_PER_EPOCH / 1e6 for k, v in out["step_us"].items()}
    rep.data["lenet"] = out


def section_sync(rep: Report, shapes: list[str], budget: float) -> None:
    print("sync (subprocess, 8 virtual devices) ...", flush=True)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    cmd = [sys.executable, os.path.join(HERE, "_sync.py"), "--shapes", ",".join(shapes), "--budget", str(budget)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
        res = json.loads(lines[-1])
    except Exception as e:  # noqa: BLE001
        rep.error("sync", e)
        return
    for s in res["shapes"]:
        where = f"sync {'x'.join(map(str, s['shape']))}"
        for what, key in (("y", "synced_vs_global_max_abs_err"), ("dx", "synced_vs_global_dx_max_abs_err")):
            for name, err in s[key].items():
                ok = err <= 1e-4 * 10
                rep.data["agreement"].append(
                    {"where": f"{where} {what}", "contender": name, "max_abs_err_vs_global": err, "ok": ok}
                )
        for what, key in (("y", "jaxbn_vs_flax_max_abs_err"), ("dx", "jaxbn_vs_flax_dx_max_abs_err")):
            ok = s[key] <= 1e-3
            rep.data["agreement"].append(
                {"where": f"{where} {what}", "contender": "jaxbn vs flax", "max_abs_err": s[key], "ok": ok}
            )
    rep.data["sync"] = res


# ---------------------------------------------------------------------- targets


def targets(rep: Report) -> list[dict]:
    d, out = rep.data, []

    def add(name, value, limit, met):
        out.append({"target": name, "value": value, "limit": limit, "met": bool(met) if value is not None else None})

    g = d.get("fwdbwd_geomean", {})
    for name in (JAXBN_FN, JAXBN_MOD):
        v = g.get(f"{name} / {FLAX}")
        add(f"fwd+bwd geomean {name} / flax <= 0.6", v, 0.6, v is not None and v <= 0.6)
        v = g.get(f"{name} / {TORCH}")
        if v is not None:
            add(f"fwd+bwd geomean {name} / torch <= 0.5", v, 0.5, v <= 0.5)
    for e in d.get("fwdbwd", []):
        if tuple(e["shape"]) in LARGE_SHAPES:
            for name in (JAXBN_FN, JAXBN_MOD):
                v = e["over_floor"].get(name)
                add(f"fwd+bwd {shape_str(e['shape'])} {name} / floor <= 1.2", v, 1.2, v is not None and v <= 1.2)
    for e in d.get("fwdbwd", []):
        tb = e["temp_bytes"]
        if FLAX in tb:
            for name in (JAXBN_FN, JAXBN_MOD):
                if name in tb:
                    add(
                        f"temp memory {shape_str(e['shape'])} {name} <= flax",
                        tb[name],
                        tb[FLAX],
                        tb[name] <= tb[FLAX],
                    )
    v = d.get("infer_geomean", {}).get(f"{JAXBN_MOD} / {FLAX}")
    if v is not None:
        same = [e.get("same_kernels_as_flax", {}).get(JAXBN_MOD) for e in d.get("infer", [])]
        add("inference geomean jaxbn.BatchNorm / flax <= 1.02 (no slower)", v, 1.02, v <= 1.02)
        if same and all(x is not None for x in same):
            add(
                "inference: jaxbn.BatchNorm compiles to the same kernels as flax (every shape)",
                sum(same),
                len(same),
                all(same),
            )
    f = d.get("fold", {}).get("over_conv_alone", {})
    v = f.get("folded Conv (jaxbn.fold_batch_norm)")
    if v is not None:
        add("folded Conv / Conv alone (with bias) <= 1.05 (costs the Conv alone)", v, 1.05, v <= 1.05)
    ln = d.get("lenet", {})
    if "bn_cost_jaxbn_over_flax" in ln:
        v = ln["bn_cost_jaxbn_over_flax"]
        add("LeNet BN cost jaxbn / flax <= 0.5", v, 0.5, v <= 0.5)
    if JAXBN_MOD in ln.get("over_no_bn", {}):
        v = ln["over_no_bn"][JAXBN_MOD]
        add("LeNet step jaxbn / no BN <= 1.10", v, 1.10, v <= 1.10)
    for s in d.get("sync", {}).get("shapes", []):
        v = s["collectives_forward"]["jaxbn.BatchNorm"]["total"]
        add(f"sync {'x'.join(map(str, s['shape']))}: collectives in jaxbn's forward == 1", v, 1, v == 1)
    return out


# ----------------------------------------------------------------------- output


def render(rep: Report) -> str:
    d = rep.data
    parts = []
    m = d.get("machine", {})
    parts.append(
        f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count')} cores, caches {m.get('caches', {})}, "
        f"{m.get('mem_total', '?')}; load average {m.get('loadavg_start')} -> {m.get('loadavg_end')}. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in m.get('versions', {}).items() if v)}."
    )
    bw = d.get("bandwidth")
    if bw:
        parts.append(
            f"Copy bandwidth of a {bw['nbytes'] / 2**20:.0f} MiB buffer (read + write): "
            f"jax x+1 into a fresh buffer {bw['jax']:.1f} GB/s, numpy copyto into a touched buffer "
            f"{bw['numpy']:.1f} GB/s."
        )
    if d.get("fwdbwd"):
        names = [n for n in (JAXBN_FN, JAXBN_MOD, FLAX, TORCH) if any(n in e["times_us"] for e in d["fwdbwd"])]
        rows = []
        for e in d["fwdbwd"]:
            t = e["times_us"]
            rows.append(
                [shape_str(e["shape"]), f"{e['nbytes'] / 2**20:.2f} MiB"]
                + [fmt_us(t.get(n)) for n in names]
                + [fmt_us(t[COPY]), fmt_us(e["floor_us"]), str(e["rounds"])]
            )
        header = ["shape", "size"] + names + ["copy (x + 1)", "floor = 4 x (copy - call) + call", "rounds"]
        parts.append("Training-mode forward + backward, median time per call:\n\n" + table(header, rows))

        cols = [(JAXBN_FN, "over_flax"), (JAXBN_MOD, "over_flax")]
        if TORCH in names:
            cols += [(JAXBN_FN, "over_torch"), (JAXBN_MOD, "over_torch"), (FLAX, "over_torch")]
        floor_cols = [n for n in names]
        rows = []
        for e in d["fwdbwd"]:
            rows.append(
                [shape_str(e["shape"])]
                + [fmt_x(e.get(key, {}).get(n)) for n, key in cols]
                + [fmt_x(e["over_floor"].get(n)) for n in floor_cols]
            )
        g = d.get("fwdbwd_geomean", {})
        geo = ["geomean"]
        for n, key in cols:
            base = FLAX if key == "over_flax" else TORCH
            geo.append(fmt_x(g.get(f"{n} / {base}")))
        geo += [""] * len(floor_cols)
        rows.append(geo)
        short = {JAXBN_FN: "fn", JAXBN_MOD: "module", FLAX: "flax", TORCH: "torch"}
        header = ["shape"] + [
            f"{short[n]} / {'flax' if key == 'over_flax' else 'torch'}" for n, key in cols
        ] + [f"{short[n]} / floor" for n in floor_cols]
        parts.append(
            "Ratios (fn = jaxbn.batch_norm, module = jaxbn.BatchNorm; below 1 = faster than the "
            "baseline; floor = 8 passes at the copy bandwidth):\n\n" + table(header, rows)
        )

        if all("pipelined_us" in e for e in d["fwdbwd"]):
            rows = []
            for e in d["fwdbwd"]:
                t, r = e["pipelined_us"], e["pipelined_over_flax"]
                rows.append(
                    [shape_str(e["shape"])]
                    + [fmt_us(t.get(n)) for n in names]
                    + [fmt_us(t[COPY])]
                    + [fmt_x(r.get(n)) for n in names if n != FLAX]
                )
            g = d.get("fwdbwd_pipelined_geomean", {})
            rows.append(
                ["geomean"] + [""] * (len(names) + 1) + [fmt_x(g.get(f"{n} / {FLAX}")) for n in names if n != FLAX]
            )
            header = ["shape"] + names + ["copy (x + 1)"] + [f"{short[n]} / flax" for n in names if n != FLAX]
            parts.append(
                f"Pipelined: {PIPELINE} calls dispatched before one wait, as a training loop dispatches "
                "its steps (torch computes each call before returning), time per call:\n\n" + table(header, rows)
            )

        rows = []
        jnames = [n for n in (JAXBN_FN, JAXBN_MOD, FLAX) if n in names]
        for e in d["fwdbwd"]:
            rows.append(
                [shape_str(e["shape"])]
                + [passes_str(e["hlo"][n]) if n in e["hlo"] else "-" for n in jnames]
                + [f"{e['temp_bytes'][n] / 2**20:.2f} MiB" if n in e["temp_bytes"] else "-" for n in jnames]
            )
        for row, e in zip(rows, d["fwdbwd"]):
            pf = e.get("page_faults_per_call", {})
            row += [f"{pf[n]:.0f}" if n in pf else "-" for n in jnames + [COPY]]
        header = (
            ["shape"]
            + [f"{n} passes / kernels" for n in jnames]
            + [f"{n} temp" for n in jnames]
            + [f"{n} page faults / call" for n in jnames + [COPY]]
        )
        parts.append(
            "Compiled fwd+bwd: full-size buffers read or written (in tensor sizes; the floor is 8) / "
            "kernels touching them (in brackets: when a run-time branch takes its costlier side, "
            "see BENCHMARKS.md), and compiled temporary memory:\n\n" + table(header, rows)
        )
    if d.get("infer"):
        names = [n for n in ("jaxbn.normalize", JAXBN_MOD, FLAX, TORCH) if any(n in e["times_us"] for e in d["infer"])]
        rows = []
        for e in d["infer"]:
            t = e["times_us"]
            rows.append(
                [shape_str(e["shape"])]
                + [fmt_us(t.get(n)) for n in names]
                + [fmt_us(t[COPY])]
                + [fmt_x(e["over_flax"].get(n)) for n in names if n != FLAX]
            )
        header = ["shape"] + names + ["copy"] + [f"{n} / flax" for n in names if n != FLAX]
        same = [e.get("same_kernels_as_flax", {}).get(JAXBN_MOD) for e in d["infer"]]
        note = (
            "\n\njaxbn.BatchNorm's compiled program has the same kernels, doing the same arithmetic, "
            f"as flax's for {sum(bool(x) for x in same)} of {len(same)} shapes."
        )
        parts.append("Inference mode (running statistics), median time per call:\n\n" + table(header, rows) + note)
    if d.get("fold"):
        f = d["fold"]
        rows = [
            [k, fmt_us(v), fmt_x(f["over_conv_alone"].get(k)), fmt_x(f["over_conv_no_bias"].get(k))]
            for k, v in f["times_us"].items()
        ]
        parts.append(
            f"Conv 3x3 {shape_str(f['input_shape'])} -> {f['features']} channels, inference:\n\n"
            + table(["model", "time", "/ Conv alone (with bias)", "/ Conv alone (no bias)"], rows)
        )
    if d.get("reduce"):
        r = d["reduce"]
        rows = [[k, r["reads"][k], fmt_us(v), f"{r['GBps'][k]:.1f} GB/s"] for k, v in r["times_us"].items()]
        parts.append(
            f"XLA:CPU reductions over the rows of a {shape_str(r['shape'])} float32 matrix "
            "(k: a per-feature vector broadcast over the rows):\n\n"
            + table(["program", "full-size buffers", "time", "bandwidth"], rows)
        )
    if d.get("chain"):
        rows = [
            [shape_str(e["shape"]), str(e["depth"])]
            + [fmt_us(e["times_us"].get(n)) for n in (JAXBN_MOD, FLAX)]
            + [fmt_x(e["jaxbn_over_flax"])]
            + [passes_str(e["hlo"][n]) if n in e["hlo"] else "-" for n in (JAXBN_MOD, FLAX)]
            for e in d["chain"]
        ]
        parts.append(
            "Layers of BN -> relu in a row, training-mode fwd+bwd, median time per call:\n\n"
            + table(["shape", "layers", JAXBN_MOD, FLAX, "jaxbn / flax",
                     f"{JAXBN_MOD} passes / kernels", f"{FLAX} passes / kernels"], rows)
        )
    module_cols = ["jaxbn / flax", f"{JAXBN_MOD} passes / kernels", f"{FLAX} passes / kernels",
                   f"{JAXBN_MOD} temp", f"{FLAX} temp"]

    def module_rows(entries, key, label):
        """Rows of a section timed by _module_fwdbwd: ``label(e)`` cells, then times, ratio, passes, temp."""
        rows = [
            label(e)
            + [fmt_us(e["times_us"].get(n)) for n in (JAXBN_MOD, FLAX)]
            + [fmt_x(e["jaxbn_over_flax"])]
            + [passes_str(e["hlo"][n]) if n in e["hlo"] else "-" for n in (JAXBN_MOD, FLAX)]
            + [f"{e['temp_bytes'][n] / 2**20:.2f} MiB" if n in e["temp_bytes"] else "-" for n in (JAXBN_MOD, FLAX)]
            for e in entries
        ]
        return rows + [["geomean", "", "", "", fmt_x(d.get(key)), "", "", "", ""]]

    if d.get("half"):
        rows = module_rows(d["half"], "half_geomean", lambda e: [shape_str(e["shape"]), f"{e['nbytes'] / 2**20:.2f} MiB"])
        parts.append(
            "bfloat16 model (x, dy and y in bfloat16, `dtype=bfloat16`; float32 parameters and statistics), "
            "training-mode fwd+bwd, median time per call; passes in bfloat16 tensor sizes:\n\n"
            + table(["shape", "size", JAXBN_MOD, FLAX] + module_cols, rows)
        )
    if d.get("masked"):
        rows = module_rows(d["masked"], "masked_geomean", lambda e: [e["dtype"], shape_str(e["shape"])])
        parts.append(
            "Masked inputs (the same boolean mask of x's shape for both, 80% of the positions kept), "
            "training-mode fwd+bwd, median time per call; passes in tensor sizes of the dtype (a read of the "
            "mask, 1 byte per element, counts 0.5 in bfloat16 and is left out in float32):\n\n"
            + table(["dtype", "shape", JAXBN_MOD, FLAX] + module_cols, rows)
        )
    if d.get("lenet"):
        ln = d["lenet"]
        xla = ln.get("xla_defaults") or {}
        rows = []
        for k, v in ln["step_us"].items():
            rows.append(
                [
                    k,
                    fmt_us(v),
                    f"{ln['epoch_s'][k]:.2f} s",
                    fmt_us(ln.get("bn_cost_us", {}).get(k)),
                    fmt_x(ln.get("over_no_bn", {}).get(k)),
                    fmt_us(xla.get("step_us", {}).get(k)),
                    fmt_us(xla.get("bn_cost_us", {}).get(k)),
                    fmt_x(xla.get("over_no_bn", {}).get(k)),
                ]
            )
        ratios = [f"{label}: {fmt_x(src['bn_cost_jaxbn_over_flax'])}"
                  for label, src in (("trainer's options", ln), ("XLA defaults", xla))
                  if "bn_cost_jaxbn_over_flax" in src]
        parts.append(
            f"LeNet + BN training step (batch 64, {ln['steps_per_epoch']} steps per epoch; "
            f"{ln['rounds']} rounds of {ln['timed_steps']} steps; model {ln['model']}), "
            f"compiled as the trainer compiles it (XLA options {ln.get('compiler_options')}) "
            "and with XLA's defaults:\n\n"
            + table(["BN", "step", "epoch", "BN cost (median of per-round step - no-BN step)",
                     "/ no BN (median of per-round step / no-BN step)", "step, XLA defaults",
                     "BN cost, XLA defaults",
                     "/ no BN, XLA defaults"], rows)
            + (f"\n\nBN cost, jaxbn / flax: {'; '.join(ratios)}" if ratios else "")
        )
    if d.get("sync"):
        rows = []
        for s in d["sync"]["shapes"]:
            for n in ("jaxbn.BatchNorm", "flax.linen.BatchNorm"):
                rows.append(
                    [
                        "x".join(map(str, s["shape"])),
                        n,
                        str(s["collectives_forward"][n]["total"]),
                        str(s["collectives_fwdbwd"][n]["total"]),
                        fmt_us(s["fwdbwd_us"][n]),
                        f"{s['synced_vs_global_max_abs_err'][n]:.1e}",
                    ]
                )
        parts.append(
            "Synchronized BN (shard_map over 8 virtual CPU devices, axis_name='batch'):\n\n"
            + table(
                ["global shape", "module", "collectives fwd", "collectives fwd+bwd", "fwd+bwd", "max |y - y_global|"],
                rows,
            )
        )
    if d.get("targets"):
        rows = [
            [
                t["target"],
                "-" if t["value"] is None else (f"{t['value']:.3g}" if isinstance(t["value"], float) else str(t["value"])),
                "met" if t["met"] else ("n/a" if t["met"] is None else "MISSED"),
            ]
            for t in d["targets"]
        ]
        parts.append("Targets:\n\n" + table(["target", "value", ""], rows))
    status = "OK" if rep.ok else "FAILED"
    parts.append(
        f"Agreement checks: {sum(a['ok'] for a in d['agreement'])}/{len(d['agreement'])} passed; "
        f"errors: {len(d['errors'])}. Status: {status}."
    )
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small shapes, few repeats")
    ap.add_argument("--json", help="where to write the results (default benchmarks/results/bn[_quick].json)")
    ap.add_argument("--markdown", help="also write the tables to this file")
    ap.add_argument(
        "--sections",
        default="fwdbwd,infer,fold,reduce,chain,half,masked,lenet,sync",
        help="comma-separated subset of fwdbwd,infer,fold,reduce,chain,half,masked,lenet,sync",
    )
    ap.add_argument("--shapes", help="override the shapes, e.g. 64x120,32x56x56x64")
    ap.add_argument("--budget", type=float, help="seconds of timing per shape and section")
    ap.add_argument("--no-torch", action="store_true", help="leave torch out even if installed")
    args = ap.parse_args(argv)

    quick = args.quick
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    budget = args.budget if args.budget is not None else (0.3 if quick else 6.0)
    sections = set(args.sections.split(","))
    with_torch = C.torch_available() and not args.no_torch

    rep = Report()
    rep.data["machine"] = H.machine_info()
    rep.data["machine"]["malloc"] = H.keep_freed_memory()
    if C.torch_available():
        import torch

        rep.data["machine"]["torch_threads"] = torch.get_num_threads()
    rep.data["config"] = {
        "quick": quick,
        "shapes": [list(s) for s in shapes],
        "budget_s": budget,
        "torch": with_torch,
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv else "bn.py"] + (argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "jax_devices": [str(dv) for dv in jax.devices()],
    }
    if not with_torch:
        print("torch not installed (or --no-torch): the torch contender is skipped.", flush=True)
    start = time.perf_counter()
    try:
        nbytes = (16 if quick else 256) * 2**20
        rep.data["bandwidth"] = {"nbytes": nbytes, **H.copy_bandwidth(nbytes, budget_s=0.3 if quick else 2.0)}
    except Exception as e:  # noqa: BLE001
        rep.error("bandwidth", e)
    runs = {
        "fwdbwd": lambda: section_fwdbwd(rep, shapes, budget, with_torch),
        "infer": lambda: section_infer(rep, shapes, budget / 2, with_torch),
        "fold": lambda: section_fold(rep, FOLD_QUICK if quick else FOLD_FULL, budget / 2),
        "reduce": lambda: section_reduce(rep, REDUCE_QUICK if quick else REDUCE_FULL, budget / 2),
        "chain": lambda: section_chain(rep, CHAIN_QUICK if quick else CHAIN_FULL, CHAIN_DEPTH, budget / 2),
        "half": lambda: section_half(rep, shapes, budget / 2),
        "masked": lambda: section_masked(rep, shapes, budget / 2),
        "lenet": lambda: section_lenet(rep, rounds=2 if quick else 100, steps=10 if quick else 40),
        "sync": lambda: section_sync(rep, SYNC_QUICK if quick else SYNC_FULL, 0.3 if quick else 3.0),
    }
    rep.data["section_s"] = {}
    for name, fn in runs.items():
        if name in sections:
            t0 = time.perf_counter()
            fn()
            rep.data["section_s"][name] = round(time.perf_counter() - t0, 1)
    rep.data["machine"]["loadavg_end"] = H.load_average()
    rep.data["wall_s"] = time.perf_counter() - start
    rep.data["targets"] = targets(rep)
    rep.data["ok"] = rep.ok

    text = render(rep)
    print()
    print(text)
    path = args.json or os.path.join(HERE, "results", "bn_quick.json" if quick else "bn.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rep.data, f, indent=1, default=float)
    print(f"\nwrote {path}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
