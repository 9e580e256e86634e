"""Command line: ``python -m train --config configs/NAME.py --workdir DIR [--config.key=value ...]``.

Also installed as the ``jaxbn-train`` console script. All logic lives in
`train.train_and_evaluate`; this module only parses flags.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from train import config_base

USAGE = """Train one MNIST experiment and print its final metrics as JSON.

USAGE: python -m train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]
       (also: jaxbn-train ...)

Running the same command again resumes from the last epoch checkpoint in DIR.
--config.KEY=VALUE overrides a key of the config file (--config.KEY=None resets
an optional key). Keys:

"""

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
        argv, _NONE_KEYS[:] = config_base.split_none_overrides(argv)
        return flags.FLAGS(list(argv))
    except (config_base.ConfigError, flags.Error) as e:
        sys.stderr.write(f"jaxbn-train: error: {e}\n")
        sys.exit(2)


# Optional keys given as --config.KEY=None: absl's parsers of int and float
# fields cannot read None, so they are taken out of argv and applied in main.
_NONE_KEYS: list[str] = []


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
        config_base.config_module(path.split(":", 1)[0])  # no get_config()?


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from train.data import DataFormatError, SourceUnavailableError
    from train.loop import (
        CheckpointError,
        json_line,
        stop_on_sigterm,
        train_and_evaluate,
    )

    config = _CONFIG.value
    for key in _NONE_KEYS:
        config[key] = None
    try:
        with stop_on_sigterm("jaxbn-train"):
            metrics = train_and_evaluate(config, _WORKDIR.value)
    except (config_base.ConfigError, DataFormatError, SourceUnavailableError, CheckpointError) as e:
        sys.stderr.write(f"jaxbn-train: error: {e}\n")
        sys.exit(2)
    print(json_line(metrics, indent=2, sort_keys=True))


def run() -> None:
    """Entry point of ``python -m train`` and the jaxbn-train script."""
    # --help shows this usage and the flags above (absl lists the key flags of
    # the program it was started as, which is __main__ or the console script).
    sys.modules["__main__"].__doc__ = USAGE + config_base.describe_keys() + "\n"
    for name in ("config", "workdir"):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
