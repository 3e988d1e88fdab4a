"""Pure, jit-compiled distillation losses.

Conventions (as optax): student before teacher, hyperparameters keyword-only, classes on the last
axis, a boolean `where=` mask instead of dynamic shapes. Per-example losses return `[batch]`;
batch-relational losses (SP, RKD, ReFilled stage 1, ...) return a scalar.
"""

# Each family lives in its own private module and declares its public names in `__all__`.
from kd_jax.losses._contrastive import *  # noqa: F401,F403
from kd_jax.losses._feature import *  # noqa: F401,F403
from kd_jax.losses._logit import *  # noqa: F401,F403
from kd_jax.losses._ptloss import *  # noqa: F401,F403
from kd_jax.losses._refilled import *  # noqa: F401,F403
from kd_jax.losses._relational import *  # noqa: F401,F403
