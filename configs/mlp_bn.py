"""MLP + batch norm: 784 -> 32 -> 32 -> 10, BN between each dense layer and its ReLU.

Adam lr 0.01, batch 32, 10 epochs, 20% held out for validation, BN momentum
0.99 and epsilon 1e-3. Published Keras result: 97.13% test accuracy.

    python -m train --config configs/mlp_bn.py --workdir runs/mlp_bn
"""

from train.config_base import base_config


def get_config():
    config = base_config()
    config.model = "mlp"
    config.norm = "jaxbn"
    config.activation = "relu"
    config.dense_features = (32, 32)
    config.bn_momentum = 0.99
    config.bn_epsilon = 1e-3
    config.optimizer = "adam"
    config.learning_rate = 0.01
    config.batch_size = 32
    config.num_epochs = 10
    config.validation_fraction = 0.2
    return config
