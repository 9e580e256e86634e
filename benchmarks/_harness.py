"""Measurement machinery shared by the benchmark scripts (no contender lives here).

* :func:`interleave` times several zero-argument callables in rounds, each round
  calling every contender once in a fresh random order, so that slow drifts of
  the machine (other processes, frequency changes) hit all contenders alike and
  no contender always runs right after the same other one (torch's worker
  threads, say, or a cache-evicting neighbour).
* :func:`copy_bandwidth` measures the copy bandwidth that defines the memory floor.
* :func:`hlo_traffic` and :func:`count_collectives` read a compiled XLA program.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def block(out: Any) -> Any:
    """Waits for every array in ``out`` (JAX arrays block; others pass)."""
    import jax

    return jax.block_until_ready(out)


def interleave(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    min_rounds: int = 5,
    max_rounds: int = 200,
    budget_s: float = 2.0,
) -> dict[str, list[float]]:
    """Times each callable (seconds per call) in interleaved rounds.

    Every callable must itself wait for its result (``block_until_ready``).
    After ``warmup`` untimed calls each, rounds run until ``budget_s`` has been
    spent (at least ``min_rounds``, at most ``max_rounds``). Each round visits
    the contenders in a random order (a fixed seed, so runs are repeatable).

    Returns:
      name -> list of per-call times in seconds.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    r = 0
    while r < max_rounds and (r < min_rounds or time.perf_counter() - start < budget_s):
        for i in rng.permutation(len(names)):
            name = names[i]
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        r += 1
    return times


def keep_freed_memory() -> dict[str, Any]:
    """Asks glibc's malloc to keep freed buffers instead of returning them to the OS.

    Every call of a compiled program allocates fresh output buffers. By default
    glibc adapts its thresholds to the allocation history of the process, and
    in some histories it unmaps or trims freed buffers, so that every later
    call faults in the pages of its outputs anew (about 6,000 minor faults per
    25 MiB output, several milliseconds) and the timings of every contender
    depend on what ran before. Fixed thresholds (the largest mmap threshold
    glibc accepts, 32 MiB, no trimming) make freed buffers reusable; the page
    faults per call are still measured and reported. Returns what was set
    (empty where the C library is not glibc).
    """
    import ctypes
    import ctypes.util

    settings = {"M_TRIM_THRESHOLD": (-1, 2**31 - 1), "M_TOP_PAD": (-2, 64 * 2**20), "M_MMAP_THRESHOLD": (-3, 32 * 2**20)}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = {}
    for name, (param, value) in settings.items():
        if mallopt(param, value) == 1:
            done[name] = value
    return done


def page_faults_per_call(fn: Callable[[], Any], calls: int = 5) -> float:
    """Minor page faults of this process per call of ``fn`` (fresh memory being touched)."""
    import resource

    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def kernel_signature(hlo_text: str) -> list[str]:
    """The entry computation's kernels and fused computations with names and metadata removed.

    Two programs with equal signatures run the same kernels doing the same arithmetic.
    """
    text = re.sub(r", metadata=\{[^}]*\}", "", hlo_text)
    text = re.sub(r"%[\w.-]+", "%_", text)
    text = re.sub(r"(stack_frame_id|op_name)=\S+", "", text)
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip().startswith(("%_", "ENTRY"))]
    return sorted(re.sub(r"\s+", " ", b) for b in blocks)


def median_us(ts: Sequence[float]) -> float:
    return statistics.median(ts) * 1e6


def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def copy_bandwidth(nbytes: int, *, budget_s: float = 1.0) -> dict[str, float]:
    """Copy bandwidth (GB/s, counting read + write) of a buffer of ``nbytes``.

    ``jax``: ``jax.jit(lambda x: x + 1)`` into a fresh output, as every
    contender writes its outputs; ``numpy``: ``np.copyto`` into a preallocated,
    already-touched destination (one thread, no page faults).
    """
    import jax
    import jax.numpy as jnp

    n = nbytes // 4
    x = jnp.arange(n, dtype=jnp.float32)
    f = jax.jit(lambda v: v + 1)
    src = np.arange(n, dtype=np.float32)
    dst = np.empty_like(src)
    dst[...] = 0
    ts = interleave(
        {"jax": lambda: block(f(x)), "numpy": lambda: np.copyto(dst, src)},
        warmup=2,
        min_rounds=5,
        max_rounds=50,
        budget_s=budget_s,
    )
    return {k: 2 * n * 4 / statistics.median(v) / 1e9 for k, v in ts.items()}


# --------------------------------------------------------------------------- HLO


_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\((.*?)\)(?:, |$)")
_FREE = {"parameter", "tuple", "bitcast", "constant", "get-tuple-element", "copy-start", "copy-done"}


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def entry_computation(hlo_text: str) -> str:
    i = hlo_text.find("\nENTRY ")
    return hlo_text[i + 1 :] if i >= 0 else hlo_text


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Every computation of an HLO module by name (the entry one as ``"ENTRY"``), as lines."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) .*\{\s*$", line)
        if head:
            name = "ENTRY" if head.group(1) else head.group(2)
            comps[name] = [line]
        elif name is not None:
            comps[name].append(line)
            if line.startswith("}"):
                name = None
    return comps


def hlo_traffic(hlo_text: str, nbytes: int) -> dict[str, float]:
    """Estimates the full-size passes of a compiled program over a tensor of ``nbytes``.

    Every top-level instruction of the entry computation (fusion, custom call,
    copy, ...) that reads or writes a buffer of at least ``nbytes / 2`` counts
    each such operand and its result once. Loop fusions with a small result
    are not counted unless they reduce (a slice reads a few rows; a reduction,
    such as the blocked sums of ``jaxbn._stats.paired_sums``, reads its
    operands in full). A ``conditional``
    runs one of its branches, which are counted the same way: ``passes`` and
    ``kernels`` take the branch with the least traffic, ``passes_max`` and
    ``kernels_max`` the one with the most (what the data decide at run time).
    A buffer that reaches one kernel twice, as itself and through a
    ``bitcast`` (a reshape that moves nothing, such as the 2-D view of a
    narrow input), also through a conditional's operands, is read once in the
    kernel's loop and counted once.
    The result is the number of full-size buffers moved and the number of
    kernels that touch them.
    """
    comps = computations(hlo_text)

    def reduces(line: str) -> bool:
        """A fusion that reduces its operands (read in full), unlike a slice."""
        called = re.search(r"calls=%?([\w.-]+)", line)
        body = comps.get(called.group(1), []) if called else []
        return any(re.search(r" reduce(?:-window)?\(", b) for b in body)

    def walk(lines: list[str], outer: list[str] | None = None) -> tuple[float, float, int, int]:
        """``outer``: the buffers (by identity) of the elements of the computation's tuple parameter."""
        size: dict[str, int] = {}
        ident: dict[str, str] = {}  # name -> the buffer it is (through bitcasts and tuples)
        elems: dict[str, list[str]] = {}  # a tuple's name -> its elements' identities
        lo = hi = 0.0
        k_lo = k_hi = 0
        for line in lines[1:]:
            m = _INSTR.match(re.sub(r"/\*[^*]*\*/", "", line))
            if not m:
                continue
            name, ty, op, operands = m.groups()
            size[name] = _shape_bytes(ty)
            args = [o.strip().lstrip("%") for o in operands.split(",") if o.strip()]
            if op == "bitcast":
                ident[name] = ident.get(args[0], args[0])
            elif op == "tuple":
                elems[name] = [ident.get(a, a) for a in args]
            elif op == "parameter" and outer is not None:
                elems[name] = outer
            elif op == "get-tuple-element":
                index = int(re.search(r"index=(\d+)", line).group(1))
                if index < len(elems.get(args[0], [])):
                    ident[name] = elems[args[0]][index]
            if op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                names = [b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else []
                for key in ("true_computation", "false_computation"):
                    t = re.search(key + r"=%?([\w.-]+)", line)
                    if t:
                        names.append(t.group(1))
                costs = [walk(comps[b], elems.get(a)) for b, a in zip(names, args[1:]) if b in comps]
                if costs:
                    lo += min(c[0] for c in costs)
                    k_lo += min(c[2] for c in costs)
                    hi += max(c[1] for c in costs)
                    k_hi += max(c[3] for c in costs)
                continue
            if op in _FREE:
                continue
            if "kind=kLoop" in line and size[name] < nbytes // 2 and not reduces(line):
                continue
            reads = {ident.get(a, a): a for a in args}  # each buffer once
            io = [size[name]] + [size.get(a, 0) for a in reads.values()]
            io = [b for b in io if b >= nbytes // 2]
            if io:
                lo += sum(io)
                hi += sum(io)
                k_lo += 1
                k_hi += 1
        return lo, hi, k_lo, k_hi

    lo, hi, k_lo, k_hi = walk(comps.get("ENTRY") or entry_computation(hlo_text).splitlines())
    return {
        "passes": round(lo / nbytes, 2),
        "kernels": k_lo,
        "passes_max": round(hi / nbytes, 2),
        "kernels_max": k_hi,
    }


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Counts collective instructions in the entry computation (``-start`` halves of async ones)."""
    counts = {c: 0 for c in _COLLECTIVES}
    for line in entry_computation(hlo_text).splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        op = m.group(3)
        for c in _COLLECTIVES:
            if op in (c, c + "-start"):
                counts[c] += 1
    counts["total"] = sum(counts[c] for c in _COLLECTIVES)
    return counts


# ----------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU model, cores, caches, memory, library versions, load average."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        caches = {}
        base = "/sys/devices/system/cpu/cpu0/cache"
        for idx in sorted(os.listdir(base)):
            p = os.path.join(base, idx)
            level = open(os.path.join(p, "level")).read().strip()
            kind = open(os.path.join(p, "type")).read().strip()
            size = open(os.path.join(p, "size")).read().strip()
            caches[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = size
        info["caches"] = caches
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total"] = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    info["loadavg_start"] = load_average()
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            versions[mod] = None
    info["versions"] = versions
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
