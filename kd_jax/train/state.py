"""The student's train state: one pytree holding everything a step reads and writes.

`TrainState` carries the student's parameters and batch statistics as `nnx.State` pytrees (split
from an NNX module at the boundary), the optax optimizer state, the step counter, a PRNG key,
`extra`: any further explicit, non-trained state a loss needs (for example CRD's memory banks),
and `aux_params`: trainable parameters that belong to a loss rather than to the student (CRD's
embedding heads). The optimizer updates `trainable()`: the student's parameters alone when
`aux_params` is empty, else `{"student": params, "aux": aux_params}`. The graph
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
  extra, aux_params (empty unless a loss term trains its own parameters)."""

  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState
  rng: jax.Array
  extra: Any
  aux_params: Any
  graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, model: nnx.Module, tx: optax.GradientTransformation, *, rng: jax.Array,
             extra: Any = None, aux_params: Any = None) -> "TrainState":
    """Splits `model` into graph definition, `nnx.Param` state and the rest (`batch_stats`:
    BatchNorm statistics and any other non-trainable variable).

    Args:
      model: the student NNX module (freshly initialised or pretrained).
      tx: the optax optimizer; its state is initialised on the parameters.
      rng: a `jax.random.key` carried in the state (split at every step).
      extra: further state (pytree of arrays) the loss terms read and update, or None.
      aux_params: trainable parameters of loss terms ({term name: pytree}), or None.
    """
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    aux_params = {} if aux_params is None else aux_params
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(join_trainable(params, aux_params)), rng=rng,
               extra={} if extra is None else extra, aux_params=aux_params,
               graphdef=graphdef, tx=tx)

  def trainable(self):
    """What the optimizer updates: `params`, or {"student": params, "aux": aux_params}."""
    return join_trainable(self.params, self.aux_params)

  def with_aux(self, *, aux_params: Any = None, extra: Any = None) -> "TrainState":
    """Adds a loss term's trainable parameters and state; the optimizer state is re-initialised
    on the joint trainable tree (call before training starts).

    Args:
      aux_params: {term name: pytree} merged into `aux_params`.
      extra: {key: pytree} merged into `extra`.
    """
    aux = {**self.aux_params, **(aux_params or {})}
    new_extra = {**self.extra, **(extra or {})}
    return self.replace(aux_params=aux, extra=new_extra,
                        opt_state=self.tx.init(join_trainable(self.params, aux)))

  def model(self) -> nnx.Module:
    """The student as an NNX module (for evaluation or export)."""
    return nnx.merge(self.graphdef, self.params, self.batch_stats)

  def variables(self) -> dict[str, nnx.State]:
    """{"params", "batch_stats"}: what an evaluation needs."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def join_trainable(params, aux_params):
  """The optimizer's tree: the student's `params` alone when `aux_params` is empty (so plain runs
  keep their optimizer state layout), else {"student": params, "aux": aux_params}."""
  if not aux_params:
    return params
  return {"student": params, "aux": aux_params}


def split_trainable(trainable, aux_params):
  """Inverse of `join_trainable` (`aux_params` only tells which layout is used)."""
  if not aux_params:
    return trainable, aux_params
  return trainable["student"], trainable["aux"]


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
