"""Tests of the training package: configs, models, loop, CLI, resume, data parallelism.

Everything trains on tiny synthetic data (a few hundred examples); nothing
downloads MNIST. The process has 8 virtual CPU devices (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from train import compare, config_base, distributed, inputs, loop, models, report
from train.config_base import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CONFIG_NAMES = ("lenet_bn", "lenet_nobn", "mlp_bn", "mlp_nobn", "lenet_bn_best", "lenet_bn_dp")

# A shrunk experiment: 320 synthetic examples (256 train / 64 validation), 64 test.
TINY = {
    "dataset": "synthetic",
    "num_train_examples": 320,
    "num_test_examples": 64,
    "batch_size": 32,
    "num_epochs": 1,
    "steps_per_dispatch": 2,
    "eval_batch_size": 64,
    "bn_momentum": 0.9,
    "progress_bar": False,
}
TIMEOUT_S = 240


def load(name: str, **overrides):
    config = config_base.load_config_file(str(CONFIGS / f"{name}.py"))
    for key, value in {**TINY, **overrides}.items():
        config[key] = value
    return config


def cli_overrides(**overrides) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


def deterministic(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in loop.TIMING_KEYS}


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_cli(args: list[str], timeout: float = TIMEOUT_S, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=ROOT, env=subprocess_env(**env),
        capture_output=True, text=True, timeout=timeout,
    )


def read_events(tb_dir: Path) -> list:
    """The events of `tb_dir`'s TensorBoard files, oldest file first (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            if pos + 16 + length > len(data):
                break  # a record cut short (TensorBoard skips it too)
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


def read_event_tags(tb_dir: Path) -> set[str]:
    """Scalar tags in the TensorBoard event files of `tb_dir`."""
    return {v.tag for event in read_events(tb_dir) for v in event.summary.value}


def visible_scalar_steps(tb_dir: Path, tag: str) -> list[int]:
    """Steps of `tag` that TensorBoard shows: a SessionLog START at step s (a
    writer's purge_step) discards the earlier events at steps >= s."""
    from tensorboardX.proto import event_pb2

    kept: list[tuple[int, str]] = []
    for event in read_events(tb_dir):
        if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
            kept = [(step, t) for step, t in kept if step < event.step]
        kept += [(event.step, v.tag) for v in event.summary.value]
    return sorted(step for step, t in kept if t == tag)


def params_and_stats(state: loop.TrainState) -> dict:
    host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return jax.tree.map(np.asarray, host)


def assert_trees_close(a, b, rtol: float, atol: float) -> None:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_files_are_valid(name):
    config = config_base.load_config_file(str(CONFIGS / f"{name}.py"))
    config_base.validate_config(config)
    assert config.dataset == "mnist" and config.validation_fraction == 0.2


def test_lenet_bn_is_the_classic_recipe():
    c = config_base.load_config_file(str(CONFIGS / "lenet_bn.py"))
    assert (c.model, c.norm, c.activation) == ("lenet", "jaxbn", "sigmoid")
    assert tuple(c.conv_features) == (6, 16) and c.conv_kernel == 5
    assert tuple(c.dense_features) == (120, 84)
    assert (c.optimizer, c.learning_rate, c.batch_size, c.num_epochs) == ("rmsprop", 1e-3, 64, 5)
    assert (c.bn_momentum, c.bn_epsilon) == (0.99, 1e-3)
    assert not c.data_parallel


@pytest.mark.parametrize(
    "name, reference, differences",
    [
        ("lenet_nobn", "lenet_bn", {"norm": "none"}),
        ("mlp_nobn", "mlp_bn", {"norm": "none"}),
        ("lenet_bn_dp", "lenet_bn", {"data_parallel": True}),
    ],
)
def test_config_pairs_differ_only_where_intended(name, reference, differences):
    a = config_base.to_dict(config_base.load_config_file(str(CONFIGS / f"{name}.py")))
    b = config_base.to_dict(config_base.load_config_file(str(CONFIGS / f"{reference}.py")))
    assert {k: v for k, v in a.items() if v != b[k]} == differences


def test_mlp_configs_match_the_published_recipe():
    for name in ("mlp_bn", "mlp_nobn"):
        c = config_base.load_config_file(str(CONFIGS / f"{name}.py"))
        assert (c.model, c.activation, tuple(c.dense_features)) == ("mlp", "relu", (32, 32))
        assert (c.optimizer, c.learning_rate, c.batch_size, c.num_epochs) == ("adam", 0.01, 32, 10)


def test_apply_overrides_parses_by_type():
    c = config_base.base_config()
    config_base.apply_overrides(
        c, ["batch_size=8", "learning_rate=0.5", "conv_features=(3,4)", "checkpoint=false",
            "data_dir=none", "norm=flax"])
    assert (c.batch_size, c.learning_rate, c.conv_features) == (8, 0.5, (3, 4))
    assert (c.checkpoint, c.data_dir, c.norm) == (False, None, "flax")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": -1}, "config.batch_size=-1: expected an integer >= 1"),
        ({"batch_size": 0}, "config.batch_size=0"),
        ({"num_epochs": 0}, "config.num_epochs=0"),
        ({"batch_size": 300}, "larger than the 256 training examples"),
        ({"batch_size": "64"}, "config.batch_size='64' has type str; expected int"),
        ({"checkpoint": 1}, "config.checkpoint=1 has type int; expected bool"),
        ({"learning_rate": -0.1}, "config.learning_rate=-0.1"),
        ({"norm": "layer"}, "expected one of ['jaxbn', 'flax', 'none']"),
        ({"validation_fraction": 1.0}, "config.validation_fraction=1.0"),
        ({"conv_features": (6, 16, 32, 64), "conv_padding": "VALID"}, "shrinks to nothing"),
        ({"data_parallel": True, "batch_size": 36}, "does not split evenly over 8 devices"),
        ({"optimizer": "adam", "momentum": 0.9},
         "config.momentum=0.9: expected None with optimizer='adam', which has no momentum"),
        ({"cpu_ynn_fusions": "reduce,conv"},
         ("config.cpu_ynn_fusions='reduce,conv': expected 'auto', 'none', 'xla' or a "
          "comma-separated list")),
    ],
)
def test_bad_config_values_fail_before_loading_or_training(tmp_path, overrides, message):
    # "mnist" from an empty IDX directory: loading data would fail differently.
    config = load("lenet_bn", dataset="mnist", data_source="idx", data_dir=str(tmp_path / "none"),
                  num_train_examples=320).to_dict()
    config.update(overrides)  # a plain dict, so that wrong types get through to the check
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        loop.train_and_evaluate(config, str(workdir))
    assert message in str(info.value)
    assert not workdir.exists()


def test_unknown_key_lists_the_valid_keys(tmp_path):
    config = load("lenet_bn").to_dict()
    config["batchsize"] = 32
    with pytest.raises(ConfigError) as info:
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    text = str(info.value)
    assert "unknown config key 'batchsize'" in text and "did you mean 'batch_size'" in text
    for key in ("batch_size", "learning_rate", "norm", "data_parallel"):
        assert f"\n  {key} " in text


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.batchsize=3", ["unknown config key 'batchsize'", "did you mean 'batch_size'",
                                  "Valid keys:", "  learning_rate"]),
        ("--config.batch_size=abc", ["--config.batch_size=abc: expected int", "Valid keys:"]),
        ("--config.batch_size=-4", ["config.batch_size=-4: expected an integer >= 1"]),
        ("--config.noprogress_bar", ["--config.noprogress_bar: write --config.progress_bar=false"]),
        # None is None, not the text 'None' (which would send the loader to ./None)
        ("--config.data_source=idx --config.data_dir=None",
         ["config.data_dir=None: expected the directory with the four IDX files"]),
        ("--config.data_source=cache", ["no MNIST cache at"]),
    ],
)
def test_cli_rejects_bad_overrides(tmp_path, override, expected):
    proc = run_cli(["--config", "configs/lenet_bn.py", "--workdir", str(tmp_path / "w"),
                    *override.split()],
                   timeout=120, JAXBN_DATA_DIR=str(tmp_path / "empty"))
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "w" / "checkpoints").glob("[0-9]*"))  # nothing was trained


def test_without_validation_split_metrics_are_null_not_nan(tmp_path):
    """metrics.jsonl stays strict JSON: absent metrics are null (JSON has no NaN)."""
    metrics = loop.train_and_evaluate(load("mlp_bn", validation_fraction=0.0), str(tmp_path))
    assert metrics["val_accuracy"] is None and metrics["val_loss"] is None
    assert 0 <= metrics["test_accuracy"] <= 1

    def no_constants(name):
        raise AssertionError(f"{name} in metrics.jsonl")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=no_constants) for line in lines]
    assert records[-1]["final"] and records[-1]["val_accuracy"] is None


def test_chunk_plan_covers_the_epoch():
    assert loop.chunk_plan(750, 10) == [10] * 75
    assert loop.chunk_plan(12, 10) == [6, 6]
    assert loop.chunk_plan(4, 10) == [4]
    assert loop.chunk_plan(23, 10) == [10, 10, 3]
    for steps in range(1, 60):
        for target in range(1, 12):
            plan = loop.chunk_plan(steps, target)
            assert sum(plan) == steps and max(plan) <= target and len(set(plan)) <= 2


def test_compiler_options_follow_cpu_ynn_fusions():
    c = load("lenet_bn")
    opt = loop.YNN_FUSION_OPTION
    assert loop.compiler_options(c, "cpu") == {opt: ""}  # auto, small activations
    assert loop.compiler_options(c, "gpu") == {}
    c.batch_size, c.conv_features, c.conv_padding = 64, (64, 128), "SAME"  # 64*28*28*64
    assert loop.compiler_options(c, "cpu") == {opt: "LIBRARY_FUSION_TYPE_REDUCE"}
    c.data_parallel = True  # a quarter of that per device
    assert loop.compiler_options(c, "cpu", num_devices=4) == {opt: ""}
    c.cpu_ynn_fusions = "none"
    assert loop.compiler_options(c, "cpu") == {opt: ""}
    c.cpu_ynn_fusions = "xla"
    assert loop.compiler_options(c, "cpu") == {}
    c.cpu_ynn_fusions = "reduce, individual_dot"
    assert loop.compiler_options(c, "cpu") == {
        opt: "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def test_trainer_programs_are_compiled_with_the_configured_fusions():
    ynn = {}
    for setting in ("auto", "xla"):
        run, _ = loop.prepare(load("lenet_bn", cpu_ynn_fusions=setting), verbose=False)
        programs = [*run.programs.train_chunk.values(), *run.programs.evaluate.values()]
        ynn[setting] = sum(p.as_text().count("__ynn_fusion") for p in programs)
    assert ynn["auto"] == 0 and ynn["xla"] > 0


def test_options_this_xla_rejects_fall_back_to_its_defaults():
    lowered = jax.jit(lambda x: x * 2).lower(jnp.ones(3))
    with pytest.warns(RuntimeWarning, match="XLA rejected compiler options"):
        compiled = loop._compile(lowered, {"xla_cpu_no_such_option": "1"})
    np.testing.assert_array_equal(compiled(jnp.ones(3)), [2.0, 2.0, 2.0])


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def _variables(config):
    model = models.create_model(config)
    return jax.device_get(model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False))


def test_lenet_has_the_classic_shapes():
    variables = _variables(config_base.load_config_file(str(CONFIGS / "lenet_bn.py")))
    shapes = jax.tree.map(np.shape, variables["params"])
    assert shapes["conv0"] == {"kernel": (5, 5, 1, 6)}
    assert shapes["conv1"] == {"kernel": (5, 5, 6, 16)}
    assert shapes["dense0"] == {"kernel": (256, 120)}
    assert shapes["dense1"] == {"kernel": (120, 84)}
    assert shapes["logits"] == {"kernel": (84, 10), "bias": (10,)}
    stats = jax.tree.map(np.shape, variables["batch_stats"])
    assert stats == {
        "bn_conv0": {"mean": (6,), "var": (6,)}, "bn_conv1": {"mean": (16,), "var": (16,)},
        "bn_dense0": {"mean": (120,), "var": (120,)}, "bn_dense1": {"mean": (84,), "var": (84,)},
    }


@pytest.mark.parametrize("shape", [(3, 24, 24, 6), (2, 7, 9, 4)])
def test_lenet_pooling_matches_flax_max_pool(shape):
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(1), shape)  # continuous: no tied maxima
    pooled = models.max_pool_2x2(x)
    np.testing.assert_array_equal(pooled, nn.max_pool(x, (2, 2), strides=(2, 2)))
    w = jax.random.normal(jax.random.key(2), pooled.shape)
    grad = jax.grad(lambda v: jnp.sum(models.max_pool_2x2(v) * w))(x)
    ref = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), strides=(2, 2)) * w))(x)
    np.testing.assert_array_equal(grad, ref)


def test_lenet_pooling_shares_the_gradient_of_tied_maxima():
    x = jnp.array([[1.0, 1.0], [0.5, 1.0]]).reshape((1, 2, 2, 1))
    grad = jax.grad(lambda v: jnp.sum(models.max_pool_2x2(v)) * 3.0)(x)
    np.testing.assert_allclose(grad.reshape((2, 2)), [[1.0, 1.0], [0.0, 1.0]])


def test_mlp_shapes_and_no_bn_variant():
    bn = _variables(config_base.load_config_file(str(CONFIGS / "mlp_bn.py")))
    nobn = _variables(config_base.load_config_file(str(CONFIGS / "mlp_nobn.py")))
    assert jax.tree.map(np.shape, bn["params"]["dense0"]) == {"kernel": (784, 32)}
    assert jax.tree.map(np.shape, nobn["params"]["dense0"]) == {"kernel": (784, 32), "bias": (32,)}
    assert set(bn["batch_stats"]) == {"bn_dense0", "bn_dense1"}
    assert "batch_stats" not in nobn


def test_jaxbn_and_flax_norms_are_interchangeable():
    c = config_base.load_config_file(str(CONFIGS / "lenet_bn.py"))
    c.norm = "flax"
    flax_vars = _variables(c)
    c.norm = "jaxbn"
    jaxbn_vars = _variables(c)
    assert jax.tree.structure(flax_vars) == jax.tree.structure(jaxbn_vars)
    x = inputs.to_float(jnp.asarray(inputs.synthetic_mnist(8, 0).train_images), "unit")
    outs = {}
    for norm in ("jaxbn", "flax"):
        c.norm = norm
        model = models.create_model(c)
        logits, _ = model.apply(jaxbn_vars, x, train=True, mutable=["batch_stats"])
        outs[norm] = logits
    np.testing.assert_allclose(outs["jaxbn"], outs["flax"], rtol=1e-4, atol=1e-5)


def test_evaluation_mode_uses_running_statistics():
    c = config_base.load_config_file(str(CONFIGS / "lenet_bn.py"))
    model = models.create_model(c)
    variables = _variables(c)
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda v: v + 0.3, variables["batch_stats"]),
    }
    x = inputs.to_float(jnp.asarray(inputs.synthetic_mnist(16, 0).train_images), "unit")
    full = model.apply(variables, x, train=False)
    alone = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(full[:1], alone, rtol=1e-5, atol=1e-6)  # no batch statistics
    train_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(full, train_logits, atol=1e-3)


def test_population_statistics_replace_the_moving_averages():
    import flax.linen as nn


    # One population batch holding the whole training split: the statistics of
    # the first BN layer must be the moments of the first conv over that split.
    config = load("lenet_bn", batch_size=256, precise_bn_batches=1)
    run, state = loop.prepare(config)
    params = jax.device_get(state.params)
    state = run.programs.population(state, run.arrays["train_images"])
    x = inputs.to_float(run.arrays["train_images"], "unit")
    h = nn.Conv(6, (5, 5), padding="VALID", use_bias=False).apply({"params": params["conv0"]}, x)
    expected = jaxbn.moments(h, axis=-1)
    got = jax.device_get(state.batch_stats["bn_conv0"])
    np.testing.assert_allclose(got["mean"], expected.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], expected.var, rtol=1e-4, atol=1e-6)
    assert not np.allclose(jax.device_get(state.batch_stats["bn_dense0"]["var"]), 1.0)


# --------------------------------------------------------------------------
# Training end to end
# --------------------------------------------------------------------------


def test_read_history_survives_a_cut_last_line_and_repeated_epochs(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "val_loss": 3}\n{"epoch": 2, "val_loss": 2}\n'
                    '{"epoch": 2, "val_loss": 1}\n{"final": true, "test_loss": 1}\n{"epoch": 3, "va')
    assert report.read_history(path) == [{"epoch": 1, "val_loss": 3}, {"epoch": 2, "val_loss": 1}]
    path.write_text('{"epoch": 1\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match="line 1: not a JSON record"):
        report.read_history(path)


def test_cli_trains_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    proc = run_cli(["--config", "configs/lenet_bn.py", "--workdir", str(workdir), *cli_overrides()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)  # stdout is the metrics, as JSON
    assert metrics["epochs"] == 1 and metrics["steps"] == 8
    # The same run again (it resumes; stdout stays pure JSON), with the other
    # spellings absl accepts: a single dash, a separate value, None for an
    # optional integer key.
    again = [a for a in cli_overrides() if not a.startswith("--config.batch_size=")]
    again += ["-config.batch_size", str(TINY["batch_size"]), "--config.num_processes=None"]
    proc = run_cli(["--config", "configs/lenet_bn.py", "--workdir", str(workdir), *again])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert deterministic(json.loads(proc.stdout)) == deterministic(metrics)
    assert "Resumed from the checkpoint of epoch 1" in proc.stderr
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in lines[:-1]] == [1]
    assert lines[-1]["final"] and lines[-1]["test_accuracy"] == metrics["test_accuracy"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s"):
        assert np.isfinite(lines[0][key])
    tags = read_event_tags(workdir / "tb")
    assert {"train/loss", "train/accuracy", "epoch/val_accuracy", "test/accuracy"} <= tags
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "checkpoints" / "1").is_dir()
    assert json.loads((workdir / "config.json").read_text())["dataset"] == "synthetic"


def test_training_learns_and_is_deterministic(tmp_path):
    config = load("mlp_bn", num_epochs=3, num_train_examples=640)
    a = loop.train(config, str(tmp_path / "a"))
    b = loop.train(config, str(tmp_path / "b"))
    assert deterministic(a.metrics) == deterministic(b.metrics)
    assert_trees_close(params_and_stats(a.state), params_and_stats(b.state), rtol=0, atol=0)
    assert a.metrics["val_accuracy"] > 0.5 and a.metrics["test_accuracy"] > 0.5  # 10 classes
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]


def test_trainer_warns_when_running_statistics_never_change(tmp_path):
    # bn_momentum=1 keeps the moving averages at their initial values (a typo
    # for 0.99, say); without precise BN the trainer would evaluate with mean 0,
    # var 1 and must say so before evaluating.
    config = load("mlp_bn", num_train_examples=320, bn_momentum=1.0, precise_bn_batches=0)
    with pytest.warns(jaxbn.StaleBatchStatsWarning, match="bn_dense0"):
        loop.train(config, str(tmp_path / "stale"))
    fine = load("mlp_bn", num_train_examples=320, precise_bn_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jaxbn.StaleBatchStatsWarning)
        loop.train(fine, str(tmp_path / "fine"))


def test_restart_after_completion_restores_instead_of_training(tmp_path):
    config = load("mlp_bn", num_epochs=2)
    first = loop.train(config, str(tmp_path))
    again = loop.train(config, str(tmp_path))
    assert deterministic(again.metrics) == deterministic(first.metrics)
    assert again.history == first.history
    config.num_epochs = 3  # allowed to change: trains one more epoch
    more = loop.train(config, str(tmp_path))
    assert [r["epoch"] for r in more.history] == [1, 2, 3] and more.history[:2] == first.history
    config.batch_size = 16
    with pytest.raises(ConfigError, match="batch_size: 32 -> 16"):
        loop.train(config, str(tmp_path))
    # TensorBoard keeps every epoch's scalars across the two resumes, and the
    # test scalars once per run that trained (not again for the rerun).
    spe = more.metrics["steps"] // 3
    assert visible_scalar_steps(tmp_path / "tb", "epoch/val_accuracy") == [spe, 2 * spe, 3 * spe]
    assert visible_scalar_steps(tmp_path / "tb", "test/accuracy") == [2 * spe, 3 * spe]


def test_workdir_of_the_previous_checkpoint_format_resumes(tmp_path):
    # Format 1 stored momentum 0.9 for every optimizer (only "momentum" used it).
    for overrides in ({}, {"optimizer": "rmsprop"}, {"optimizer": "momentum"}):
        config = load("mlp_bn", num_epochs=1, **overrides)
        workdir = tmp_path / config.optimizer
        loop.train(config, str(workdir))
        meta_file = workdir / "checkpoints" / "1" / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        assert meta.pop("format") == 2
        meta["config"]["momentum"] = 0.9
        meta_file.write_text(json.dumps(meta))
        config.num_epochs = 2
        assert loop.train(config, str(workdir)).metrics["epochs"] == 2
    config = load("mlp_bn", num_epochs=2, optimizer="rmsprop", momentum=0.9)
    with pytest.raises(ConfigError, match="momentum: None -> 0.9"):  # it was not applied
        loop.train(config, str(tmp_path / "rmsprop"))


def test_restore_state_of_a_missing_epoch_is_file_not_found(tmp_path):
    result = loop.train(load("mlp_bn"), str(tmp_path))
    assert loop.restore_state(str(tmp_path), result.state).step == result.state.step
    with pytest.raises(FileNotFoundError, match="no checkpoint of epoch 7"):
        loop.restore_state(str(tmp_path), result.state, epoch=7)


def test_damaged_checkpoint_is_named_with_a_way_out(tmp_path):
    config = load("mlp_bn", num_epochs=2)
    loop.train(config, str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "meta")
    with pytest.raises(loop.CheckpointError,
                       match=r"checkpoints/2 cannot be read .*move it away to resume from epoch 1"):
        loop.train(config, str(tmp_path))
    shutil.move(tmp_path / "checkpoints" / "2", tmp_path / "damaged")
    assert loop.train(config, str(tmp_path)).metrics["epochs"] == 2  # epoch 2 trained again


def test_fresh_run_in_a_used_workdir_replaces_its_tensorboard_scalars(tmp_path):
    config = load("mlp_bn", checkpoint=False)
    for _ in range(2):
        metrics = loop.train_and_evaluate(config, str(tmp_path))
    assert visible_scalar_steps(tmp_path / "tb", "epoch/val_accuracy") == [metrics["steps"]]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line).get("epoch") for line in lines] == [1, None]


def test_workdir_misuse_is_refused(tmp_path, monkeypatch, capsys):
    config = load("mlp_bn")
    loop.train(config, str(tmp_path / "run"))
    # checkpoint=False would leave config.json and metrics.jsonl describing
    # another run than the checkpoints beside them.
    config.checkpoint = False
    with pytest.raises(ConfigError, match="holds checkpoints"):
        loop.train(config, str(tmp_path / "run"))
    config.checkpoint = True
    monkeypatch.setenv("HOME", str(tmp_path))  # --workdir=~/run: no shell expands that ~
    capsys.readouterr()
    assert loop.train(config, "~/run").metrics["epochs"] == 1
    assert f"Resumed from the checkpoint of epoch 1 in {tmp_path / 'run'}" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        loop.train(config, str(tmp_path / "file"))
    lock = loop._lock_workdir(str(tmp_path / "run"))  # a second process's hold
    try:
        with pytest.raises(ConfigError, match=f"in use by another training process \\(pid {os.getpid()}"):
            loop.train(config, str(tmp_path / "run"))
    finally:
        lock.close()
    assert loop.train(config, str(tmp_path / "run")).metrics["epochs"] == 1


def test_diverged_run_writes_strict_json_and_warns(tmp_path):
    config = load("mlp_nobn", optimizer="sgd", learning_rate=1e6)
    with pytest.warns(UserWarning, match="epoch 1: the training loss is nan"):
        metrics = loop.train_and_evaluate(config, str(tmp_path))
    assert np.isnan(metrics["train_loss"])

    def no_constants(name):
        raise AssertionError(f"{name} in metrics.jsonl")

    lines = [json.loads(x, parse_constant=no_constants)
             for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train_loss"] is None and lines[-1]["test_loss"] is None


def test_rmsprop_applies_momentum(tmp_path):
    plain = loop.train(load("mlp_bn"), str(tmp_path / "a"))
    heavy = loop.train(load("mlp_bn", optimizer="rmsprop", momentum=0.9), str(tmp_path / "b"))
    assert plain.metrics["train_loss"] != heavy.metrics["train_loss"]


def test_resume_refuses_to_stretch_a_decaying_schedule(tmp_path):
    """cosine/onecycle span the whole run: more epochs would change the curve mid-way."""
    config = load("mlp_bn", num_epochs=1, schedule="cosine")
    loop.train(config, str(tmp_path))
    config.num_epochs = 2
    with pytest.raises(ConfigError, match="num_epochs=2 differs from the checkpoint's 1"):
        loop.train(config, str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, sig):
    epochs = 12
    reference = loop.train_and_evaluate(load("mlp_bn", num_epochs=epochs), str(tmp_path / "ref"))

    workdir = tmp_path / "killed"
    args = ["--config", "configs/mlp_bn.py", "--workdir", str(workdir),
            *cli_overrides(num_epochs=epochs)]
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first = workdir / "checkpoints" / "1"
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not first.is_dir():
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.005)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:  # stopped like Ctrl-C: the checkpoint being saved is completed
            assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
            assert "stopped by SIGTERM; rerun the same command to resume" in stderr
            assert [p.name for p in (workdir / "checkpoints").iterdir()
                    if not p.name.isdigit()] == []
    finally:
        if proc.poll() is None:
            proc.kill()
    done = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert done and done[-1] < epochs, f"the run was not interrupted: {done}"
    spe = reference["steps"] // epochs
    # TensorBoard's events of the checkpointed epochs were on disk at the kill.
    assert set(visible_scalar_steps(workdir / "tb", "epoch/val_accuracy")) >= {
        e * spe for e in done}

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from the checkpoint of epoch {done[-1]}" in resumed.stderr
    metrics = json.loads(resumed.stdout)
    assert deterministic(metrics) == deterministic(reference)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines[:-1]] == list(range(1, epochs + 1))
    assert visible_scalar_steps(workdir / "tb", "epoch/val_accuracy") == [
        e * spe for e in range(1, epochs + 1)]


def test_compare_trains_configs_on_the_same_data(tmp_path):
    overrides = [f"{k}={v}" for k, v in TINY.items()] + ["num_epochs=2"]
    paths = [str(CONFIGS / "mlp_bn.py"), str(CONFIGS / "mlp_nobn.py")]
    results = compare.compare(paths, str(tmp_path), overrides)
    assert set(results) == {"mlp_bn", "mlp_nobn"}
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("\n| mlp_") == 2 and "97.13%" in table and "94.49%" in table
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    histories = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
                 for n in results}
    assert all(len(h) == 3 for h in histories.values())  # 2 epochs + final


def test_compare_rejects_configs_on_different_data(tmp_path):
    other = tmp_path / "other.py"
    other.write_text(
        "from train.config_base import base_config\n\n\ndef get_config():\n"
        "    config = base_config()\n    config.validation_fraction = 0.1\n    return config\n")
    paths = [str(CONFIGS / "mlp_bn.py"), str(other)]
    with pytest.raises(ConfigError, match="differ in validation_fraction"):
        compare.load_configs(paths, [])
    configs = compare.load_configs(paths, ["validation_fraction=0.2", "seed=3"])
    assert [c.seed for c in configs] == [3, 3]


def test_compare_reads_overrides_as_the_train_command_does():
    args, overrides = compare.parse_args(
        ["a.py", "--config.seed", "3", "--workdir", "w", "--config.checkpoint", "b.py",
         "-config.batch_size=16", "--config.num_processes=None", "--config.progress_bar=f"])
    assert args.configs == ["a.py", "b.py"] and args.workdir == "w"
    assert overrides == ["seed=3", "checkpoint=true", "batch_size=16", "num_processes=None",
                         "progress_bar=f"]
    config = config_base.base_config()
    config_base.apply_overrides(config, overrides)
    assert (config.seed, config.checkpoint, config.num_processes, config.progress_bar) == (
        3, True, None, False)
    with pytest.raises(SystemExit):
        compare.parse_args(["a.py", "--workdir", "w", "--config.checkpoint=no"])  # not absl's


def test_none_overrides_follow_absl_order_and_config_arguments_pass_the_check(tmp_path):
    argv = ["x", "--config.data_dir=None", "--config.data_dir=/a", "--config.num_processes=3",
            "--config.num_processes", "none"]
    assert config_base.split_none_overrides(argv) == (
        ["x", "--config.data_dir=/a", "--config.num_processes=3"], ["num_processes"])
    from train import main

    with_arg = tmp_path / "sized.py"  # ml_collections' --config=FILE:ARG form
    with_arg.write_text("from train.config_base import base_config\n\n\n"
                        "def get_config(arg):\n    return base_config()\n")
    main._check_config_path(["x", f"--config={with_arg}:small"])
    with pytest.raises(ConfigError, match="defines no get_config"):
        (tmp_path / "empty.py").write_text("")
        main._check_config_path(["x", "--config", str(tmp_path / "empty.py")])


def test_compare_refuses_configs_with_different_seeds(tmp_path):
    # A config of a seed sweep must not be run silently with another config's seed.
    seeded = tmp_path / "mlp_bn_seed1.py"
    seeded.write_text((CONFIGS / "mlp_bn.py").read_text() + (
        "\n_recipe = get_config\n\n\ndef get_config():\n"
        "    config = _recipe()\n    config.seed = 1\n    return config\n"))
    paths = [str(CONFIGS / "mlp_bn.py"), str(seeded)]
    with pytest.raises(ConfigError, match=r"differ in seed .*--config.seed=VALUE"):
        compare.load_configs(paths, [])
    assert [c.seed for c in compare.load_configs(paths[1:], [])] == [1]


# --------------------------------------------------------------------------
# Data parallelism
# --------------------------------------------------------------------------


# The recipe's RMSprop (epsilon 1e-7 outside the square root) turns rounding-order
# differences in near-zero gradients into steps of up to ~learning_rate, so exact
# agreement is checked with SGD (rounding-sized differences stay rounding-sized)
# and the recipe's own optimizer with a tolerance of a fraction of one step
# (learning rate 1e-3) on the parameters. The running statistics are averages of
# activations computed with those parameters, so there the tolerance also
# scales with the activations (stats_rtol).
DP_CASES = [
    pytest.param({"optimizer": "sgd", "learning_rate": 0.1}, 1e-5, 1e-6, 1e-5, id="sgd"),
    pytest.param({}, 0.0, 5e-4, 2e-3, id="rmsprop"),
]


@pytest.mark.parametrize("optimizer, rtol, atol, stats_rtol", DP_CASES)
def test_data_parallel_on_8_devices_matches_one_device(tmp_path, optimizer, rtol, atol, stats_rtol):
    assert jax.device_count() == 8
    # 8 steps of a global batch of 64: 8 examples per device.
    overrides = dict(num_train_examples=640, batch_size=64, **optimizer)
    single = loop.train(load("lenet_bn", **overrides), str(tmp_path / "single"))
    parallel = loop.train(load("lenet_bn_dp", **overrides), str(tmp_path / "dp"))
    assert parallel.metrics["num_devices"] == 8 and single.metrics["num_devices"] == 1
    assert parallel.history[-1]["replica_divergence"] == 0.0
    got, want = params_and_stats(parallel.state), params_and_stats(single.state)
    assert_trees_close(got["params"], want["params"], rtol=rtol, atol=atol)
    assert_trees_close(got["batch_stats"], want["batch_stats"], rtol=stats_rtol, atol=atol)
    config = load("lenet_bn", **overrides)
    init = loop.init_state(models.create_model(config), loop.make_optimizer(config, 8), config.seed)
    trained = params_and_stats(single.state)["params"]
    moved = max(np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(trained),
                                                       jax.tree.leaves(init.params)))
    assert moved > 10 * atol  # the comparison is not between barely trained models
    for key in ("train_loss", "val_loss", "test_loss"):
        np.testing.assert_allclose(parallel.metrics[key], single.metrics[key], rtol=1e-3)


def test_multi_process_settings_errors(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)

    def settings(**kw):
        return distributed.distributed_settings(load("lenet_bn_dp", **kw))

    assert settings() is None
    assert settings(num_processes=1, process_id=0) is None
    assert settings(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1) == ("127.0.0.1:1234", 2, 1)
    bad = [
        # A process id alone (a launcher that sets only the ids) would make every
        # process a single-process run writing to the same workdir.
        ({"process_id": 1}, "process_id=1 but no coordinator"),
        ({"num_processes": 2}, "num_processes=2 but no coordinator"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2}, "process_id=None"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, "process_id=2"),
    ]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            settings(**kw)
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    with pytest.raises(ConfigError, match="process_id=3 but no coordinator"):
        settings()


def test_cluster_started_by_the_caller_needs_data_parallel(monkeypatch):
    """jax.distributed already initialized (by a launcher): several processes without
    data_parallel would each train their own model, then fail in orbax."""
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match="2 processes need config.data_parallel=True"):
        distributed.initialize(load("lenet_bn"))
    distributed.initialize(load("lenet_bn_dp"))  # nothing to do: the cluster is up


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(args_per_process: list[list[str]], **env: str) -> list[tuple[int, str, str]]:
    """Runs ``python -m train`` once per argument list as one JAX cluster; (rc, stdout, stderr) each."""
    env = {"JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
           "JAX_NUM_PROCESSES": str(len(args_per_process)), **env}
    procs = [
        subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT,
                         env=subprocess_env(**env, JAX_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, args in enumerate(args_per_process)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


@pytest.mark.slow
def test_processes_with_different_configs_refuse_to_train(tmp_path):
    """A launcher that gives one process another seed used to train diverging
    replicas to the end (test accuracy 0.30 against 0.73) without a word."""
    args = ["--config", "configs/lenet_bn_dp.py", "--workdir", str(tmp_path / "w"), *cli_overrides()]
    results = _run_processes([args, [*args, "--config.seed=1"]],
                             XLA_FLAGS="--xla_force_host_platform_device_count=2")
    for rc, _, err in results:
        assert rc == 2, err[-3000:]
        assert "the config and data differ between processes: config.seed," in err
        assert "on process(es) [1]" in err
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_two_processes_match_one_process_with_8_devices(tmp_path):
    # SGD: see DP_CASES. Each process holds 4 of the 8 devices, collectives over gloo.
    overrides = dict(num_train_examples=640, batch_size=64, optimizer="sgd", learning_rate=0.1)
    workdir = tmp_path / "multi"
    args = ["--config", "configs/lenet_bn_dp.py", "--workdir", str(workdir),
            *cli_overrides(**overrides)]
    results = _run_processes([args, args], XLA_FLAGS="--xla_force_host_platform_device_count=4")
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    out = results[0][1]
    metrics = json.loads(out[out.index("{"):])
    assert metrics["num_processes"] == 2 and metrics["num_devices"] == 8

    reference = loop.train(load("lenet_bn_dp", **overrides), str(tmp_path / "one"))
    restored = loop.restore_state(str(workdir), reference.state)
    assert_trees_close(params_and_stats(restored), params_and_stats(reference.state),
                       rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["test_loss"], reference.metrics["test_loss"], rtol=1e-5)


def test_each_epoch_draws_its_own_shuffle():
    run, _ = loop.prepare(load("mlp_bn", num_epochs=2), verbose=False)
    p1, p1_again, p2 = (np.asarray(run.programs.permutation(np.int32(e))) for e in (1, 1, 2))
    n = p1.size
    np.testing.assert_array_equal(np.sort(p1), np.arange(n))
    np.testing.assert_array_equal(np.sort(p2), np.arange(n))
    np.testing.assert_array_equal(p1, p1_again)  # a resumed run redraws the same order
    assert np.mean(p1 == p2) < 0.1  # another epoch, another order
