"""``python -m train``: see train.main."""

from train.main import run

run()
