"""jaxbn: batch normalization for JAX and Flax, exact across devices and hosts."""

from jaxbn._ops import batch_norm as batch_norm
from jaxbn._ops import normalize as normalize
from jaxbn._running import update_running_stats as update_running_stats
from jaxbn._stats import Moments as Moments
from jaxbn._stats import moments as moments
from jaxbn.linen import BatchNorm as BatchNorm

__version__ = "0.1.0"
