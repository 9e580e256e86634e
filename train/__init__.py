"""MNIST experiments for jaxbn: configs, data, models, training loop, reports.

`train.train_and_evaluate(config, workdir)` is the importable entry point; it is
loaded lazily so that `import train.data` stays light.
"""


def __getattr__(name):
    if name == "train_and_evaluate":
        from train.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module 'train' has no attribute {name!r}")
