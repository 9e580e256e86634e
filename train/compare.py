"""Train several configs on the same data, data order and seed; plot and tabulate them.

    python -m train.compare --workdir runs/mlp configs/mlp_bn.py configs/mlp_nobn.py
    jaxbn-compare --workdir runs/lenet configs/lenet_bn.py configs/lenet_nobn.py \\
        --plot docs/comparison_lenet.png --config.num_epochs=3

Each config trains in ``WORKDIR/<config name>`` (resuming when it already
has checkpoints); ``--config.key=value`` overrides apply to every config. The
dataset is loaded once, and the configs must agree on the data and the seed
(so every run gets the same split and the same per-epoch shuffles; configs that
differ there are refused, ``--config.seed=N`` puts them all on one seed). The
result is ``comparison.png`` (training
and validation loss and accuracy per epoch, one line per config) and
``comparison.md`` (a markdown table of final metrics beside the published
numbers, where there are any).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from train import config_base, report
from train.config_base import ConfigError

# Keys that must agree for runs to see the same data in the same order.
DATA_KEYS = ("dataset", "num_train_examples", "num_test_examples", "validation_fraction", "seed")

# Published (Keras) test accuracies of the classic recipes, by config name.
PUBLISHED_TEST_ACCURACY = {"lenet_bn": 0.9538, "mlp_bn": 0.9713, "mlp_nobn": 0.9449}


def run_names(paths: Sequence[str]) -> list[str]:
    """Run names from config paths: the file name without .py, made unique."""
    names: list[str] = []
    for path in paths:
        base = os.path.splitext(os.path.basename(path))[0]
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def load_configs(paths: Sequence[str], overrides: Sequence[str]) -> list[Any]:
    """Loads, overrides and validates the configs; checks they share data and seed.

    Raises:
      ConfigError: for a bad file or override, or configs that would see
        different data (e.g. different validation_fraction).
    """
    if len(paths) < 1:
        raise ConfigError("no config files given; expected one or more configs/*.py paths.")
    configs = []
    for path in paths:
        config = config_base.load_config_file(path)
        config_base.apply_overrides(config, overrides)
        configs.append(config)
    for key in DATA_KEYS:
        values = {path: config[key] for path, config in zip(paths, configs)}
        if len(set(values.values())) > 1:
            raise ConfigError(
                f"the configs differ in {key} ({values}), so they would not see the same data "
                f"in the same order; pass --config.{key}=VALUE to compare them on the same data."
            )
    return [config_base.normalized(c) for c in configs]


def compare(
    paths: Sequence[str],
    workdir: str,
    overrides: Sequence[str] = (),
    plot_path: str | None = None,
    table_path: str | None = None,
    data: Any = None,
) -> dict[str, dict[str, Any]]:
    """Trains each config and writes the comparison plot and table.

    Args:
      paths: config files.
      workdir: parent directory of the runs.
      overrides: ``key=value`` strings applied to every config.
      plot_path: where to write the plot (default WORKDIR/comparison.png).
      table_path: where to write the table (default WORKDIR/comparison.md).
      data: an already loaded dataset (default: load the configs' dataset once).

    Returns:
      Run name -> final metrics.
    """
    from train import inputs, loop

    configs = load_configs(paths, overrides)
    names = run_names(paths)
    workdir = os.path.expanduser(workdir)
    if data is None:
        data = inputs.load_dataset(configs[0])
    results, histories = {}, {}
    for name, config in zip(names, configs):
        print(f"=== {name} ===", flush=True)
        result = loop.train(config, os.path.join(workdir, name), data=data)
        results[name], histories[name] = result.metrics, result.history
    plot_path = plot_path or os.path.join(workdir, "comparison.png")
    table_path = table_path or os.path.join(workdir, "comparison.md")
    report.plot_histories(histories, plot_path, title=" vs ".join(names))
    published = {n: PUBLISHED_TEST_ACCURACY[n] for n in names if n in PUBLISHED_TEST_ACCURACY}
    table = report.markdown_table(results, published or None)
    os.makedirs(os.path.dirname(os.path.abspath(table_path)), exist_ok=True)
    with open(table_path, "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {plot_path} and {table_path}")
    return results


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parses the command line; returns the options and the config overrides."""
    parser = argparse.ArgumentParser(
        prog="jaxbn-compare",
        description="Train several configs on the same data order and seed; plot and tabulate.",
        epilog="--config.KEY=VALUE overrides apply to every config.",
    )
    parser.add_argument("configs", nargs="+", help="config files (configs/*.py)")
    parser.add_argument("--workdir", required=True, help="parent directory of the runs")
    parser.add_argument("--plot", default=None, help="plot path (default WORKDIR/comparison.png)")
    parser.add_argument("--table", default=None, help="table path (default WORKDIR/comparison.md)")
    argv = list(argv)
    try:
        spans = config_base.override_spans(["jaxbn-compare"] + argv)
    except ConfigError as e:
        parser.error(str(e))
    overrides = [f"{key}={text}" for _, _, key, text in spans]
    inside = {i - 1 for a, b, _, _ in spans for i in range(a, b)}
    args = parser.parse_intermixed_args([arg for i, arg in enumerate(argv) if i not in inside])
    return args, overrides


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m train.compare`` and the jaxbn-compare script."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from train.data import DataFormatError, SourceUnavailableError
    from train.loop import CheckpointError, stop_on_sigterm

    try:
        with stop_on_sigterm("jaxbn-compare"):
            compare(args.configs, args.workdir, overrides, args.plot, args.table)
    except (ConfigError, DataFormatError, SourceUnavailableError, CheckpointError) as e:
        sys.stderr.write(f"jaxbn-compare: error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    run()
