"""The benchmark suite runs end to end in --quick mode (timings are never checked).

The run must succeed (exit 0: no contender failed, every agreement check
passed) and its JSON must hold every section and contender.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bn.py")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bn_quick.json"
    env = dict(os.environ)
    # The benchmark picks its own device counts (1 in-process, 8 in its sync subprocess).
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    data = json.loads(out.read_text()) if out.exists() else None
    return proc, data


def test_quick_benchmark_exits_cleanly(quick_run):
    proc, data = quick_run
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert data is not None and data["ok"] is True
    assert data["errors"] == []


def test_quick_benchmark_agreement(quick_run):
    _, data = quick_run
    checks = data["agreement"]
    assert checks and all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    where = {c["where"].split()[0] for c in checks}
    assert {"fwdbwd", "infer", "fold", "chain", "half", "masked", "sync"} <= where


def test_quick_benchmark_has_every_contender(quick_run):
    _, data = quick_run
    expected = {"jaxbn.batch_norm", "jaxbn.BatchNorm", "flax.linen.BatchNorm", "copy (x + 1)"}
    if data["config"]["torch"]:
        expected.add("torch")
    assert data["fwdbwd"], "no fwd+bwd results"
    for entry in data["fwdbwd"]:
        assert expected <= set(entry["times_us"]), entry["times_us"].keys()
        assert all(t > 0 for t in entry["times_us"].values())
        assert entry["floor_us"] > 0
        assert expected <= set(entry["pipelined_us"]), entry["pipelined_us"].keys()
        assert all(t > 0 for t in entry["pipelined_us"].values())
        for name in ("jaxbn.batch_norm", "jaxbn.BatchNorm", "flax.linen.BatchNorm"):
            assert entry["temp_bytes"][name] >= 0
            assert entry["hlo"][name]["passes"] > 0
    for entry in data["infer"]:
        assert {"jaxbn.normalize", "jaxbn.BatchNorm", "flax.linen.BatchNorm"} <= set(entry["times_us"])
    assert {"Conv+jaxbn.BatchNorm", "Conv+flax.linen.BatchNorm", "folded Conv (jaxbn.fold_batch_norm)",
            "Conv alone (no bias)", "Conv alone (with bias)"} <= set(data["fold"]["times_us"])
    assert {"sum(x)", "sum(x - k)", "sum(dy * x)", "sum(dy * (x - k))"} <= set(data["reduce"]["times_us"])
    for entry in data["chain"]:
        assert {"jaxbn.BatchNorm", "flax.linen.BatchNorm"} <= set(entry["times_us"])
    assert data["half"], "no bfloat16 results"
    for entry in data["half"]:
        assert {"jaxbn.BatchNorm", "flax.linen.BatchNorm"} <= set(entry["times_us"]) == set(entry["temp_bytes"])
    assert {e["dtype"] for e in data["masked"]} == {"float32", "bfloat16"}, "no masked results"
    for entry in data["masked"]:
        assert {"jaxbn.BatchNorm", "flax.linen.BatchNorm"} <= set(entry["times_us"]) == set(entry["temp_bytes"])
    assert {"jaxbn.BatchNorm", "flax.linen.BatchNorm", "no BN"} <= set(data["lenet"]["step_us"])
    sync = data["sync"]
    assert sync["devices"] == 8 and sync["shapes"]
    for s in sync["shapes"]:
        assert s["collectives_forward"]["jaxbn.BatchNorm"]["total"] >= 1
    assert data["targets"], "targets were not evaluated"


def test_quick_benchmark_runs_lenet_with_both_compile_settings(quick_run):
    _, data = quick_run
    lenet = data["lenet"]
    names = {"jaxbn.BatchNorm", "flax.linen.BatchNorm", "no BN"}
    if lenet["compiler_options"]:  # CPU: the trainer's options differ from XLA's defaults
        assert names <= set(lenet["xla_defaults"]["step_us"])


def test_train_loop_benchmark_runs_every_loop():
    """benchmarks/train_loop.py on a small synthetic set: every loop trains and is tabled."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_loop.py"), "--synthetic", "640",
         "--epochs", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| jaxbn |"))
    assert row.count(" s |") == 5 and row.count("x |") == 4  # 5 loops, trainer / each other


def test_torch_is_optional():
    """The benchmark imports without torch: the contender module guards the import."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def fake(name, *a, **k):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        raise ImportError('no torch')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})\n"
        "import _contenders\n"
        "assert not _contenders.torch_available()\n"
        "import numpy as np\n"
        "p = _contenders.problem((8, 4))\n"
        "cons = _contenders.fwdbwd_contenders(p, with_torch=True)\n"
        "assert 'torch' not in cons and 'flax.linen.BatchNorm' in cons\n"
    )
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_hlo_traffic_counts_the_branches_of_a_conditional():
    """The pass counter reads a conditional's branches: the cheap and the costly side are both reported."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import _harness

    def f(x):
        plain = x * 2  # one read of x, one write
        small = jax.lax.cond(x[0, 0] > 0, lambda: jnp.zeros(64), lambda: jnp.sum(x * x, axis=0))
        return plain, small

    x = jnp.ones((4096, 64), jnp.float32)
    text = jax.jit(f).lower(x).compile().as_text()
    t = _harness.hlo_traffic(text, x.nbytes)
    assert (t["passes"], t["kernels"]) == (2, 1)
    assert (t["passes_max"], t["kernels_max"]) == (3, 2)


@pytest.mark.parametrize(
    "shape, passes, worst",
    [((4096, 512), (8, 4), (9, 5)), ((64, 24, 24, 6), (8, 4), (9, 5)), ((128, 28, 28, 32), (9, 5), (11, 7))],
)
def test_fwdbwd_tensor_passes(shape, passes, worst):
    """The float32 fwd+bwd of jaxbn.batch_norm moves the tensor-sized buffers README and BENCHMARKS.md state.

    Up to 2M elements: 8 passes in 4 kernels (each pair of sums one kernel;
    a narrow input's dy reaches the backward's reduce as itself and as its
    2-D view, one buffer read once); above, 9 in 5: the statistics as
    YNNPACK's two reductions, the backward's sums still one kernel (10 in 6
    before). ``worst``: when the run-time accuracy checks take their
    centered sums.
    """
    import jax
    import jax.numpy as jnp

    import jaxbn

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import _harness

    def loss(x, w):
        y = jaxbn.batch_norm(x)[0]
        return jnp.sum(y * w), y  # y is written, as it feeds the next layer

    a = jax.ShapeDtypeStruct(shape, jnp.float32)
    text = jax.jit(jax.grad(loss, has_aux=True)).lower(a, a).compile().as_text()
    t = _harness.hlo_traffic(text, 4 * math.prod(shape))
    assert (t["passes"], t["kernels"]) == passes, t
    assert (t["passes_max"], t["kernels_max"]) == worst, t
