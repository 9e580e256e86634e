"""MLP without batch norm: configs/mlp_bn.py with norm="none".

Published Keras result: 94.49% test accuracy.

    python -m train --config configs/mlp_nobn.py --workdir runs/mlp_nobn
"""

from train.config_base import base_config


def get_config():
    config = base_config()
    config.model = "mlp"
    config.norm = "none"
    config.activation = "relu"
    config.dense_features = (32, 32)
    config.optimizer = "adam"
    config.learning_rate = 0.01
    config.batch_size = 32
    config.num_epochs = 10
    config.validation_fraction = 0.2
    return config
