"""jaxbn: batch normalization for JAX and Flax, exact across devices and hosts."""

from jaxbn import nnx as nnx
from jaxbn._diagnostics import StaleBatchStatsWarning as StaleBatchStatsWarning
from jaxbn._diagnostics import find_stale_batch_stats as find_stale_batch_stats
from jaxbn._diagnostics import warn_if_stale as warn_if_stale
from jaxbn._diagnostics import weight_decay_mask as weight_decay_mask
from jaxbn._fold import FoldedModel as FoldedModel
from jaxbn._fold import fold_batch_norm as fold_batch_norm
from jaxbn._ops import batch_norm as batch_norm
from jaxbn._ops import normalize as normalize
from jaxbn._precise import recompute_batch_stats as recompute_batch_stats
from jaxbn._running import update_running_stats as update_running_stats
from jaxbn._stats import Moments as Moments
from jaxbn._stats import moments as moments
from jaxbn.linen import BatchNorm as BatchNorm

__version__ = "0.1.0"
