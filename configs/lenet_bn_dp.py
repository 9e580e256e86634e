"""LeNet + batch norm, data parallel over all devices (and processes).

configs/lenet_bn.py with data_parallel=True: every global batch of 64 is split
over a 1-D "batch" mesh of all devices with jax.shard_map; BN statistics are
pooled over the mesh (axis_name="batch") and gradients averaged, so the result
matches one device with the same global batch. Across processes, set
--config.coordinator_address / num_processes / process_id or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables.

    python -m train --config configs/lenet_bn_dp.py --workdir runs/lenet_bn_dp
"""

from train.config_base import base_config


def get_config():
    config = base_config()
    config.model = "lenet"
    config.norm = "jaxbn"
    config.activation = "sigmoid"
    config.conv_features = (6, 16)
    config.dense_features = (120, 84)
    config.bn_momentum = 0.99
    config.bn_epsilon = 1e-3
    config.optimizer = "rmsprop"
    config.learning_rate = 1e-3
    config.batch_size = 64
    config.num_epochs = 5
    config.validation_fraction = 0.2
    config.data_parallel = True
    return config
