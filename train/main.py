"""Command line: ``python -m train --config configs/NAME.py --workdir DIR [--config.key=value ...]``.

Also installed as the ``jaxbn-train`` console script. All logic lives in
`train.train_and_evaluate`; this module only parses flags.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from train import config_base

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); override keys with --config.key=value.",
    lock_config=True,
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parses flags after checking --config.key=value overrides against the schema.

    Errors (an unknown key, a value of the wrong type, a missing flag) are
    printed without a traceback and exit with status 2.
    """
    try:
        config_base.check_overrides(argv)
        _check_config_path(argv)
        return flags.FLAGS(list(argv))
    except (config_base.ConfigError, flags.Error) as e:
        sys.stderr.write(f"jaxbn-train: error: {e}\n")
        sys.exit(2)


def _check_config_path(argv: Sequence[str]) -> None:
    """A clear error for a --config file that does not exist."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if not os.path.isfile(path.split(":", 1)[0]):
            raise config_base.ConfigError(
                f"--config {path}: no such file; expected a config file such as "
                "configs/lenet_bn.py."
            )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from train.data import DataFormatError, SourceUnavailableError
    from train.loop import train_and_evaluate

    config = _CONFIG.value
    config_base.none_literals(config)
    try:
        metrics = train_and_evaluate(config, _WORKDIR.value)
    except (config_base.ConfigError, DataFormatError, SourceUnavailableError) as e:
        sys.stderr.write(f"jaxbn-train: error: {e}\n")
        sys.exit(2)
    print(json.dumps(metrics, indent=2, sort_keys=True))


def run() -> None:
    """Entry point of ``python -m train`` and the jaxbn-train script."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
