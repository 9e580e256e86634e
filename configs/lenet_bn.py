"""LeNet + batch norm, the classic Keras recipe.

Conv(6, 5x5) -> BN -> sigmoid -> maxpool 2 -> Conv(16, 5x5) -> BN -> sigmoid ->
maxpool 2 -> Dense 120 -> BN -> sigmoid -> Dense 84 -> BN -> sigmoid -> Dense 10;
RMSprop lr 1e-3, batch 64, 5 epochs, 20% of the training set held out for
validation, BN momentum 0.99 and epsilon 1e-3 (Keras defaults).
Published Keras result: 95.38% test accuracy.

    python -m train --config configs/lenet_bn.py --workdir runs/lenet_bn
"""

from train.config_base import base_config


def get_config():
    config = base_config()
    config.model = "lenet"
    config.norm = "jaxbn"
    config.activation = "sigmoid"
    config.conv_features = (6, 16)
    config.conv_kernel = 5
    config.conv_padding = "VALID"
    config.dense_features = (120, 84)
    config.bn_momentum = 0.99
    config.bn_epsilon = 1e-3
    config.optimizer = "rmsprop"
    config.learning_rate = 1e-3
    config.batch_size = 64
    config.num_epochs = 5
    config.validation_fraction = 0.2
    return config
