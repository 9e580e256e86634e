"""The experiment config schema: every key, its type, its default, and validation.

Each file in ``configs/`` starts from :func:`base_config` and changes values;
no config may add a key. :func:`validate_config` checks keys, types and values
before any data is loaded or anything is compiled, and every error names the
key, the value and what was expected. :func:`check_overrides` does the same for
``--config.key=value`` command-line overrides, listing the valid keys.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

# Choices of the string-valued keys.
CHOICES: dict[str, tuple[str, ...]] = {
    "model": ("lenet", "mlp"),
    "norm": ("jaxbn", "flax", "none"),
    "activation": ("sigmoid", "relu", "tanh", "gelu"),
    "conv_padding": ("VALID", "SAME"),
    "kernel_init": ("glorot_uniform", "lecun_normal", "he_normal"),
    "dataset": ("mnist", "synthetic"),
    "data_source": ("auto", "tfds", "idx", "registry", "cache"),
    "input_scaling": ("unit", "standardize"),
    "optimizer": ("sgd", "momentum", "rmsprop", "adam", "adamw"),
    "schedule": ("constant", "cosine", "onecycle"),
    "unroll_steps": ("auto", "full", "none"),
    "cpu_collectives": ("gloo", "mpi"),
}

# Keys that may change when a run resumes from its workdir's checkpoint.
RESUMABLE_KEYS = frozenset(
    {
        "num_epochs",
        "progress_bar",
        "checkpoint",
        "max_checkpoints_to_keep",
        "steps_per_dispatch",
        "unroll_steps",
        "cpu_ynn_fusions",
        "eval_batch_size",
        "data_source",
        "data_dir",
        "coordinator_address",
        "num_processes",
        "process_id",
    }
)


# Kinds of XLA:CPU library fusion that config.cpu_ynn_fusions may list.
YNN_FUSION_KINDS = ("dot", "eltwise", "reduce", "individual_dot", "individual_convolution")


class ConfigError(ValueError):
    """A config key, type or value is invalid."""


def base_config() -> ml_collections.ConfigDict:
    """Returns the full schema with defaults: the classic LeNet + BN recipe.

    Keys (all flat):
      model: "lenet" (conv blocks then dense layers) or "mlp" (dense only).
      norm: the normalization after every hidden conv/dense layer, before its
        activation: "jaxbn" (jaxbn.BatchNorm), "flax" (flax.linen.BatchNorm)
        or "none".
      activation: hidden activation.
      conv_features: output channels of the LeNet conv blocks (conv, norm,
        activation, 2x2 max-pool).
      conv_kernel: square conv kernel size.
      conv_padding: "VALID" (classic LeNet on 28x28) or "SAME".
      dense_features: widths of the hidden dense layers (LeNet and MLP).
      kernel_init: initializer of conv and dense kernels (biases start at 0).
      bn_momentum, bn_epsilon: BatchNorm running-average momentum (Flax/Keras
        convention) and epsilon. The momentum only matters with
        precise_bn_batches=0: otherwise the moving averages are replaced
        before every evaluation and checkpoint.
      precise_bn_batches: at each epoch end, replace the running statistics
        by the average batch statistics of the current weights over this many
        fixed training batches (the batch-norm paper's inference procedure,
        Algorithm 2, with the average biased batch variance where the paper
        scales it by m / (m - 1)), before evaluation and checkpointing; 0
        keeps the moving averages (Keras' and Flax's behaviour).
      dataset: "mnist" (real data via train.data.load_mnist) or "synthetic"
        (small deterministic class-dependent blobs, for tests).
      data_source, data_dir: passed to train.data.load_mnist.
      num_train_examples, num_test_examples: use only the first N examples of
        the training / test set (0: all; for "synthetic": 1000 / 200).
      validation_fraction: fraction of the training examples held out for
        validation (a split fixed by `seed`).
      input_scaling: "unit" (pixels / 255) or "standardize" (MNIST mean/std).
      augment_shift: random translation of training images by up to this many
        pixels (0: no augmentation).
      optimizer, learning_rate, optimizer_eps, momentum, weight_decay: the optax
        optimizer. optimizer_eps defaults to Keras' 1e-7 and is added outside
        the square root, as in Keras. momentum is the heavy-ball momentum of
        "momentum" (default 0.9) and "rmsprop" (default none, as in Keras);
        the other optimizers refuse it.
      schedule: learning-rate schedule over the whole run ("onecycle" peaks at
        `learning_rate` after `warmup_fraction` of the steps).
      batch_size: global batch size (split across devices when data parallel).
      num_epochs: epochs to train (each drops the last incomplete batch).
      seed: seeds the split, the init, the shuffles and the augmentation.
      data_parallel: shard every batch over all devices (all processes) with
        jax.shard_map over a "batch" mesh axis; BN statistics are synced.
      coordinator_address, num_processes, process_id: jax.distributed settings
        (default: the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
        JAX_PROCESS_ID environment variables; neither: one process).
      cpu_collectives: CPU collectives used across processes ("gloo").
      steps_per_dispatch: training steps run by one compiled call (0: auto,
        2 when unrolled, 100 otherwise).
      unroll_steps: "full" writes the steps of a call as straight-line code,
        "none" as a rolled lax.scan, "auto" unrolls on CPU only (XLA:CPU runs
        convolution gradients inside loops on a slow path).
      cpu_ynn_fusions: which fusions XLA:CPU hands to the YNNPACK library in
        the trainer's programs: "auto" (default: none for small activations,
        reductions only for large ones; see train.loop.compiler_options),
        "none", "xla" (XLA's own default set) or a comma-separated list of
        kinds from ``YNN_FUSION_KINDS``. Ignored on other backends.
      eval_batch_size: examples per evaluation batch.
      progress_bar: show a tqdm bar per epoch.
      checkpoint: save an orbax checkpoint every epoch and resume from it.
      max_checkpoints_to_keep: how many epoch checkpoints to keep.
    """
    c = ml_collections.ConfigDict()
    # Model.
    c.model = "lenet"
    c.norm = "jaxbn"
    c.activation = "sigmoid"
    c.conv_features = (6, 16)
    c.conv_kernel = 5
    c.conv_padding = "VALID"
    c.dense_features = (120, 84)
    c.kernel_init = "glorot_uniform"
    c.bn_momentum = 0.99
    c.bn_epsilon = 1e-3
    c.precise_bn_batches = 200
    # Data.
    c.dataset = "mnist"
    c.data_source = "auto"
    c.data_dir = config_dict.placeholder(str)
    c.num_train_examples = 0
    c.num_test_examples = 0
    c.validation_fraction = 0.2
    c.input_scaling = "unit"
    c.augment_shift = 0
    # Optimization.
    c.optimizer = "rmsprop"
    c.learning_rate = 1e-3
    c.optimizer_eps = 1e-7
    c.momentum = config_dict.placeholder(float)
    c.weight_decay = 0.0
    c.schedule = "constant"
    c.warmup_fraction = 0.3
    c.batch_size = 64
    c.num_epochs = 5
    c.seed = 0
    # Devices and processes.
    c.data_parallel = False
    c.coordinator_address = config_dict.placeholder(str)
    c.num_processes = config_dict.placeholder(int)
    c.process_id = config_dict.placeholder(int)
    c.cpu_collectives = "gloo"
    # Loop and outputs.
    c.steps_per_dispatch = 0
    c.unroll_steps = "auto"
    c.cpu_ynn_fusions = "auto"
    c.eval_batch_size = 1000
    c.progress_bar = True
    c.checkpoint = True
    c.max_checkpoints_to_keep = 2
    return c


SYNTHETIC_DEFAULT_SIZES = (1000, 200)
MNIST_SIZES = (60_000, 10_000)


# --------------------------------------------------------------------------
# Schema: key -> expected type
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, tuple[type, bool]]:
    """Maps each key to (type, optional) from the defaults of base_config."""
    base = base_config()
    out = {}
    for key in base.keys():
        field = base.get_ref(key)
        out[key] = (field.get_type(), field.get() is None)
    return out


def _type_name(key: str) -> str:
    typ, optional = _schema()[key]
    if typ is tuple:
        name = "tuple of int"
    else:
        name = typ.__name__
    return f"{name} or None" if optional else name


def describe_keys() -> str:
    """A table of every valid key with its type and default, one per line."""
    base = base_config()
    width = max(len(k) for k in base.keys())
    lines = []
    for key in sorted(base.keys()):
        lines.append(f"  {key:<{width}}  {_type_name(key):<16} default {base[key]!r}")
    return "\n".join(lines)


def _unknown_key_message(key: str, where: str) -> str:
    valid = sorted(base_config().keys())
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{where}{hint}. Valid keys:\n{describe_keys()}"


# --------------------------------------------------------------------------
# Validation of a config object
# --------------------------------------------------------------------------


def _check_type(key: str, value: Any) -> None:
    typ, optional = _schema()[key]
    if value is None:
        if optional:
            return
        raise ConfigError(f"config.{key} is None; expected {_type_name(key)}.")
    ok: bool
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif typ is tuple:
        ok = isinstance(value, (tuple, list)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    else:
        ok = isinstance(value, typ)
    if not ok:
        raise ConfigError(
            f"config.{key}={value!r} has type {type(value).__name__}; "
            f"expected {_type_name(key)}."
        )


def _require(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"config.{key}={value!r}: expected {expected}.")


def check_schema(config: Mapping[str, Any] | ml_collections.ConfigDict) -> None:
    """Checks that `config` has exactly the keys of base_config with their types.

    Raises:
      ConfigError: on an unknown or missing key (listing the valid keys) or a
        value of the wrong type.
    """
    keys = set(config.keys())
    valid = set(base_config().keys())
    for key in sorted(keys - valid):
        raise ConfigError(_unknown_key_message(key, " in the config"))
    missing = sorted(valid - keys)
    if missing:
        raise ConfigError(
            f"config is missing keys {missing}; build configs from "
            "train.config_base.base_config()."
        )
    for key in sorted(keys):
        _check_type(key, config[key])


def check_values(config: Mapping[str, Any] | ml_collections.ConfigDict) -> None:
    """Checks value ranges and choices (not the ones that need the data or devices).

    Raises:
      ConfigError: naming the key, its value and what was expected.
    """
    for key, choices in CHOICES.items():
        _require(config[key] in choices, key, config[key], f"one of {list(choices)}")
    positive_ints = (
        "batch_size",
        "num_epochs",
        "conv_kernel",
        "eval_batch_size",
        "max_checkpoints_to_keep",
    )
    for key in positive_ints:
        _require(config[key] >= 1, key, config[key], "an integer >= 1")
    for key in ("num_train_examples", "num_test_examples", "augment_shift", "seed",
                "steps_per_dispatch", "precise_bn_batches"):
        _require(config[key] >= 0, key, config[key], "an integer >= 0")
    for key in ("conv_features", "dense_features"):
        _require(all(v >= 1 for v in config[key]), key, config[key], "positive widths")
    if config.model == "lenet":
        _require(len(config.conv_features) >= 1, "conv_features", config.conv_features,
                 "at least one conv block for model='lenet'")
    _require(0.0 <= config.bn_momentum <= 1.0, "bn_momentum", config.bn_momentum,
             "a float in [0, 1]")
    for key in ("bn_epsilon", "learning_rate", "optimizer_eps"):
        _require(config[key] > 0 and math.isfinite(config[key]), key, config[key],
                 "a finite float > 0")
    _require(0.0 <= config.validation_fraction < 1.0, "validation_fraction",
             config.validation_fraction, "a float in [0, 1)")
    if config.momentum is not None:
        _require(0.0 <= config.momentum < 1.0, "momentum", config.momentum, "a float in [0, 1)")
        _require(config.optimizer in ("momentum", "rmsprop"), "momentum", config.momentum,
                 f"None with optimizer={config.optimizer!r}, which has no momentum "
                 "(it applies to 'momentum' and 'rmsprop')")
    _require(config.weight_decay >= 0.0, "weight_decay", config.weight_decay, "a float >= 0")
    _require(0.0 < config.warmup_fraction < 1.0, "warmup_fraction", config.warmup_fraction,
             "a float in (0, 1)")
    _require(config.augment_shift <= 8, "augment_shift", config.augment_shift,
             "at most 8 pixels")
    if config.num_processes is not None:
        _require(config.num_processes >= 1, "num_processes", config.num_processes,
                 "an integer >= 1")
    if config.process_id is not None:
        _require(config.process_id >= 0, "process_id", config.process_id, "an integer >= 0")
    if config.data_source == "idx":
        _require(config.data_dir is not None, "data_dir", config.data_dir,
                 "the directory with the four IDX files when config.data_source='idx'")
    if config.cpu_ynn_fusions not in ("auto", "none", "xla"):
        kinds = [k.strip() for k in config.cpu_ynn_fusions.split(",")]
        _require(all(k in YNN_FUSION_KINDS for k in kinds), "cpu_ynn_fusions",
                 config.cpu_ynn_fusions,
                 f"'auto', 'none', 'xla' or a comma-separated list of {list(YNN_FUSION_KINDS)}")
    if config.model == "lenet":
        _check_lenet_geometry(config)


def lenet_conv_sides(config: Any) -> list[int]:
    """Side of each LeNet conv block's output (before its 2x2 max-pool), from 28x28 input."""
    sides, side = [], 28
    for _ in config.conv_features:
        if config.conv_padding == "VALID":
            side -= config.conv_kernel - 1
        sides.append(side)
        side //= 2
    return sides


def _check_lenet_geometry(config: Any) -> None:
    for i, side in enumerate(lenet_conv_sides(config)):
        if side // 2 < 1:
            raise ConfigError(
                f"config.conv_features={tuple(config.conv_features)} with "
                f"conv_kernel={config.conv_kernel} and conv_padding="
                f"{config.conv_padding!r}: the 28x28 image shrinks to nothing after "
                f"conv block {i + 1}; expected fewer blocks, a smaller kernel or 'SAME'."
            )


def dataset_sizes(config: Any) -> tuple[int, int]:
    """Returns (training examples before the split, test examples) for `config`."""
    full = SYNTHETIC_DEFAULT_SIZES if config.dataset == "synthetic" else MNIST_SIZES
    n_train = config.num_train_examples or full[0]
    n_test = config.num_test_examples or full[1]
    if config.dataset == "mnist":
        n_train, n_test = min(n_train, full[0]), min(n_test, full[1])
    return n_train, n_test


def split_sizes(num_examples: int, validation_fraction: float) -> tuple[int, int]:
    """Returns (train, validation) sizes of the held-out split."""
    n_val = int(round(num_examples * validation_fraction))
    return num_examples - n_val, n_val


def check_sizes(config: Any, num_examples: int, num_devices: int) -> None:
    """Checks the batch against the data and the devices.

    Args:
      config: the experiment config.
      num_examples: training examples before the validation split.
      num_devices: devices the batch is split over (1 unless data parallel).

    Raises:
      ConfigError: if the batch is larger than the training split, the split
        leaves no validation example, or the batch does not divide evenly.
    """
    n_train, n_val = split_sizes(num_examples, config.validation_fraction)
    if config.validation_fraction > 0 and n_val < 1:
        raise ConfigError(
            f"config.validation_fraction={config.validation_fraction} of {num_examples} "
            "examples holds out no example; expected a larger fraction or 0."
        )
    if config.batch_size > n_train:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {n_train} training "
            f"examples left after holding out validation_fraction="
            f"{config.validation_fraction} of {num_examples}; expected 1 <= batch_size "
            f"<= {n_train}."
        )
    if config.batch_size % num_devices:
        raise ConfigError(
            f"config.batch_size={config.batch_size} does not split evenly over "
            f"{num_devices} devices (data_parallel=True); expected a multiple of "
            f"{num_devices}."
        )
    if config.norm != "none" and num_devices == 1 and config.batch_size < 2:
        raise ConfigError(
            f"config.batch_size={config.batch_size}: batch norm needs at least 2 "
            "examples per batch; expected batch_size >= 2 or norm='none'."
        )


def validate_config(config: Any) -> None:
    """Checks keys, types and values of `config` (everything but data and devices).

    Raises:
      ConfigError: naming the offending key and what was expected.
    """
    check_schema(config)
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(dict(config))
    check_values(config)


def normalized(config: Any) -> ml_collections.ConfigDict:
    """A validated, locked copy of `config` with floats as floats and tuples as tuples."""
    validate_config(config)
    out = base_config()
    for key in out.keys():
        value = config[key]
        typ, _ = _schema()[key]
        if value is not None and typ is float:
            value = float(value)
        if value is not None and typ is tuple:
            value = tuple(int(v) for v in value)
        out[key] = value
    out.lock()
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of the config (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


# --------------------------------------------------------------------------
# Command-line overrides
# --------------------------------------------------------------------------


def _parse_bool(text: str) -> bool | None:
    low = text.lower()  # what absl's boolean flags accept
    if low in ("true", "t", "1"):
        return True
    if low in ("false", "f", "0"):
        return False
    return None


def _parse_value(key: str, text: str) -> Any:
    """Parses `text` as a value of `key`'s type; ConfigError if it cannot."""
    typ, optional = _schema()[key]
    if optional and text.lower() == "none":
        return None
    try:
        if typ is bool:
            value = _parse_bool(text)
            if value is None:
                raise ValueError
            return value
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is tuple:
            body = text.strip().strip("()[]")
            return tuple(int(v) for v in body.split(",") if v.strip())
        return text
    except ValueError:
        raise ConfigError(
            f"bad value in --config.{key}={text}: expected {_type_name(key)}, "
            f"e.g. --config.{key}={_example(key)}. Valid keys:\n{describe_keys()}"
        ) from None


def _example(key: str) -> str:
    value = base_config()[key]
    if isinstance(value, tuple):
        return "'(" + ",".join(str(v) for v in value) + ")'"
    if value is None:
        return "VALUE"
    return str(value)


def override_spans(argv: Sequence[str], flag_name: str = "config") -> list[tuple[int, int, str, str]]:
    """Finds and checks the config overrides in `argv` against the schema.

    An override is ``--config.KEY=VALUE``, ``--config.KEY VALUE`` or, for a
    boolean key, a bare ``--config.KEY`` (true); absl also accepts a single
    dash. The parsing stops at ``--``.

    Args:
      argv: command-line arguments (argv[0] is the program).
      flag_name: the name of the config flag.

    Returns:
      ``(start, stop, key, text)`` for each override: ``argv[start:stop]``
      holds it, ``text`` is its value as written.

    Raises:
      ConfigError: for an unknown key (with a suggestion and the list of valid
        keys) or a value that does not parse as the key's type.
    """
    prefixes = (f"--{flag_name}.", f"-{flag_name}.")
    schema = _schema()
    spans = []
    i = 1
    while i < len(argv) and argv[i] != "--":
        arg = argv[i]
        prefix = next((p for p in prefixes if arg.startswith(p)), None)
        if prefix is None:
            i += 1
            continue
        name, eq, text = arg[len(prefix):].partition("=")
        if name not in schema:
            if name.startswith("no") and name[2:] in schema and schema[name[2:]][0] is bool and not eq:
                raise ConfigError(f"{arg}: write --{flag_name}.{name[2:]}=false.")
            raise ConfigError(_unknown_key_message(name, f" in {arg!r}"))
        stop = i + 1
        if not eq:
            if schema[name][0] is bool:
                text = "true"
            elif i + 1 < len(argv):
                text, stop = argv[i + 1], i + 2
            else:
                raise ConfigError(f"--{flag_name}.{name} needs a value.")
        _parse_value(name, text)
        spans.append((i, stop, name, text))
        i = stop
    return spans


def check_overrides(argv: Sequence[str], flag_name: str = "config") -> None:
    """Checks the ``--config.key=value`` overrides in `argv` (see :func:`override_spans`).

    Raises:
      ConfigError: for an unknown key (with a suggestion and the list of valid
        keys) or a value that does not parse as the key's type.
    """
    override_spans(argv, flag_name)


def split_none_overrides(argv: Sequence[str], flag_name: str = "config") -> tuple[list[str], list[str]]:
    """Takes the overrides that set an optional key to None out of `argv`.

    absl's parsers of integer and float config fields cannot read None, so the
    command line applies these itself (``--config.num_processes=None``).

    Returns:
      `argv` without those overrides, and the keys they set to None.
    """
    schema = _schema()
    spans = override_spans(argv, flag_name)
    last = {key: text for _, _, key, text in spans}  # the last override of a key wins
    drop = [(a, b) for a, b, key, text in spans if schema[key][1] and text.lower() == "none"]
    removed = {i for a, b in drop for i in range(a, b)}
    keys = [key for key, text in last.items() if schema[key][1] and text.lower() == "none"]
    return [arg for i, arg in enumerate(argv) if i not in removed], keys


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``key=value`` strings to `config` in place, parsed by the key's type.

    Raises:
      ConfigError: for a malformed override, an unknown key or a bad value.
    """
    schema = _schema()
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE.")
        if key not in schema:
            raise ConfigError(_unknown_key_message(key, f" in {item!r}"))
        config[key] = _parse_value(key, text)


def config_module(path: str) -> Any:
    """Imports a config file (as ml_collections does) and checks that it defines get_config().

    Raises:
      ConfigError: if the file does not exist or has no get_config().
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; expected a configs/*.py file.")
    name = "_jaxbn_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path!r} cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config().")
    return module


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Loads and validates ``get_config()`` of a config file path.

    Raises:
      ConfigError: if the file does not exist, has no get_config() or gives an
        invalid config.
    """
    module = config_module(path)
    config = module.get_config()
    validate_config(config)
    return config
