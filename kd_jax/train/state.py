"""The student's train state: one pytree holding everything a step reads and writes.

`TrainState` carries the student's parameters and batch statistics as `nnx.State` pytrees (split
from an NNX module at the boundary), the optax optimizer state, the step counter, a PRNG key,
and what the loss terms own (`kd_jax.train.terms`): `term_params`, {term name: trainable
parameters} (FitNet's connector, CC's and CRD's heads), and `term_state`, {term name: non-trained
state} (CRD's memory banks, the connector's batch statistics). The optimizer updates
`trainable()`: the student's parameters alone when no term has parameters, else
`{"student": params, "terms": term_params}`. The graph
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
  term_params and term_state (empty unless a loss term owns parameters or state)."""

  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState
  rng: jax.Array
  term_params: Any
  term_state: Any
  graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, model: nnx.Module, tx: optax.GradientTransformation, *, rng: jax.Array,
             term_params: Any = None, term_state: Any = None) -> "TrainState":
    """Splits `model` into graph definition, `nnx.Param` state and the rest (`batch_stats`:
    BatchNorm statistics and any other non-trainable variable).

    Args:
      model: the student NNX module (freshly initialised or pretrained).
      tx: the optax optimizer; its state is initialised on the parameters.
      rng: a `jax.random.key` carried in the state (split at every step).
      term_params: {term name: trainable parameters} of the loss terms, or None (usually filled
        by `step.init`, see `kd_jax.train.make_train_step`).
      term_state: {term name: non-trained state} of the loss terms, or None.
    """
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    term_params = {} if term_params is None else dict(term_params)
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(join_trainable(params, term_params)), rng=rng,
               term_params=term_params, term_state={} if term_state is None else dict(term_state),
               graphdef=graphdef, tx=tx)

  def trainable(self):
    """What the optimizer updates: `params`, or {"student": params, "terms": term_params}."""
    return join_trainable(self.params, self.term_params)

  def with_terms(self, *, params: Any = None, state: Any = None) -> "TrainState":
    """Adds loss terms' trainable parameters and state ({term name: pytree} each, merged over
    what is there); the optimizer state is re-initialised on the joint trainable tree, so call
    it before training starts."""
    term_params = {**self.term_params, **(params or {})}
    term_state = {**self.term_state, **(state or {})}
    return self.replace(term_params=term_params, term_state=term_state,
                        opt_state=self.tx.init(join_trainable(self.params, term_params)))

  def model(self) -> nnx.Module:
    """The student as an NNX module (for evaluation or export)."""
    return nnx.merge(self.graphdef, self.params, self.batch_stats)

  def variables(self) -> dict[str, nnx.State]:
    """{"params", "batch_stats"}: what an evaluation needs."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def join_trainable(params, term_params):
  """The optimizer's tree: the student's `params` alone when `term_params` is empty (so plain
  runs keep their optimizer state layout), else {"student": params, "terms": term_params}."""
  if not term_params:
    return params
  return {"student": params, "terms": term_params}


def split_trainable(trainable, term_params):
  """Inverse of `join_trainable` (`term_params` only tells which layout is used)."""
  if not term_params:
    return trainable, term_params
  return trainable["student"], trainable["terms"]


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
