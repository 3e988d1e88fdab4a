"""Pure, jit-compiled distillation losses.

The contract every loss here keeps:

- Shapes: student before teacher, hyperparameters keyword-only, classes on the last axis (as
  optax). Per-example losses return `[batch]` and the caller reduces; batch-relational losses
  (`sp`, `rkd`, `pkt`, `cc`, `refilled_relationship`) return a scalar. Token-level LM losses
  (`forward_kl`, `reverse_kl`, `generalized_jsd`, `total_variation`) take `[batch, tokens,
  vocab]` logits and a `[batch, tokens]` token mask, and reduce per token, per sequence or over
  the batch (`reduction=`).
- Masks, not dynamic shapes: a boolean `where=` row mask excludes padded rows from every sum and
  every normaliser (`max(count, 1)`); an all-False mask gives 0 with zero gradients.
- Gradients: a loss never stops the gradient of its inputs. Freezing the teacher is the train
  step's job: `kd_jax.train.make_train_step` applies `jax.lax.stop_gradient` to the teacher's
  outputs once, so each loss stays a plain differentiable function of both arguments (test a
  loss's teacher gradient as you would any other). The only constants inside a loss are the ones
  its method defines as constants: CRD's memory-bank rows and its NCE normalisers (`crd`).
- Devices: a batch-relational loss takes `axis_name=None`; inside `jax.shard_map` or `jax.pmap`
  it all-gathers its rows and mask over that axis first (`gather_batch`), so its [b, b]
  structure covers the global batch. A token loss (and `ptloss`) takes `vocab_axis=None`: with
  the class axis sharded over that mesh axis, it combines per-shard statistics with
  `pmax`/`psum` and never gathers the logits.
- Numerics: float32 arithmetic under bfloat16 inputs; finite values and gradients for logits up
  to +-1e4, zero feature rows and all-False masks.
"""

# Each family lives in its own private module and declares its public names in `__all__`.
from kd_jax.losses._batch import *  # noqa: F401,F403
from kd_jax.losses._contrastive import *  # noqa: F401,F403
from kd_jax.losses._feature import *  # noqa: F401,F403
from kd_jax.losses._logit import *  # noqa: F401,F403
from kd_jax.losses._ptloss import *  # noqa: F401,F403
from kd_jax.losses._refilled import *  # noqa: F401,F403
from kd_jax.losses._relational import *  # noqa: F401,F403
from kd_jax.losses._token import *  # noqa: F401,F403
from kd_jax.losses._topk import *  # noqa: F401,F403
