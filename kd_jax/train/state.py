"""The student's train state: one pytree holding everything a step reads and writes.

`TrainState` carries the student's parameters and batch statistics as `nnx.State` pytrees (split
from an NNX module at the boundary), the optax optimizer state, the step counter, a PRNG key and
`extra`: any further explicit state a loss needs (for example CRD's memory bank). The graph
definition and the optax transformation are static (not leaves), so the state goes through
`jax.jit`, `jax.shard_map`, `jax.pmap` and Orbax as a plain pytree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import struct


@struct.dataclass
class TrainState:
  """Student state. Leaves: step, params, batch_stats (all non-Param variables), opt_state, rng,
  extra."""

  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState
  rng: jax.Array
  extra: Any
  graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, model: nnx.Module, tx: optax.GradientTransformation, *, rng: jax.Array,
             extra: Any = None) -> "TrainState":
    """Splits `model` into graph definition, `nnx.Param` state and the rest (`batch_stats`:
    BatchNorm statistics and any other non-trainable variable).

    Args:
      model: the student NNX module (freshly initialised or pretrained).
      tx: the optax optimizer; its state is initialised on the parameters.
      rng: a `jax.random.key` carried in the state (split at every step).
      extra: further state (pytree of arrays) the loss terms read and update, or None.
    """
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), rng=rng, extra={} if extra is None else extra,
               graphdef=graphdef, tx=tx)

  def model(self) -> nnx.Module:
    """The student as an NNX module (for evaluation or export)."""
    return nnx.merge(self.graphdef, self.params, self.batch_stats)

  def variables(self) -> dict[str, nnx.State]:
    """{"params", "batch_stats"}: what an evaluation needs."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def sgd(learning_rate: float | optax.Schedule, *, momentum: float = 0.9,
        weight_decay: float = 0.0, nesterov: bool = False) -> optax.GradientTransformation:
  """SGD as `torch.optim.SGD`: the L2 term `weight_decay * w` is added to the gradient before
  momentum (RepDistiller's optimizer: lr 0.05, momentum 0.9, weight_decay 5e-4)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def step_decay_schedule(base_lr: float, *, steps_per_epoch: int,
                        decay_epochs: Sequence[int] = (), decay_rate: float = 0.1
                        ) -> optax.Schedule:
  """Piecewise-constant learning rate: `base_lr * decay_rate ** (#decay_epochs passed)`.

  RepDistiller's `adjust_learning_rate`: 0.05, x0.1 at epochs 150, 180 and 210.
  """
  boundaries = {int(e) * int(steps_per_epoch): decay_rate for e in decay_epochs}
  return optax.piecewise_constant_schedule(base_lr, boundaries)
