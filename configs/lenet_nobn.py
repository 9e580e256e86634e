"""LeNet without batch norm: configs/lenet_bn.py with norm="none".

    python -m train --config configs/lenet_nobn.py --workdir runs/lenet_nobn
"""

from train.config_base import base_config


def get_config():
    config = base_config()
    config.model = "lenet"
    config.norm = "none"
    config.activation = "sigmoid"
    config.conv_features = (6, 16)
    config.dense_features = (120, 84)
    config.optimizer = "rmsprop"
    config.learning_rate = 1e-3
    config.batch_size = 64
    config.num_epochs = 5
    config.validation_fraction = 0.2
    return config
