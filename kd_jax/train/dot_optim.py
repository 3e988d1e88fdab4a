"""DOT, the distillation-oriented trainer: separate momentum for the task and distillation gradients.

Zhao, Cui, Song and Liang, "DOT: A Distillation-Oriented Trainer" (ICCV 2023); reference
implementation `DistillationOrientedTrainer` in megvii-research/mdistiller
`mdistiller/engine/dot.py` (built by `mdistiller/engine/trainer.py: DOT` with
`momentum = m - delta` for the task loss and `momentum_kd = m + delta` for the distillation loss,
m = 0.9, delta = 0.075, lr 0.05, weight decay 5e-4 on CIFAR-100).

`dot(...)` is an optax `GradientTransformation` whose `update` takes the two gradients of one
step as `{"task": g_task, "kd": g_kd}` (pytrees shaped like the parameters) and returns one
update of the parameters' shape. `kd_jax.train.make_train_step` passes them whenever the state's
optimizer is a `dot(...)`: one forward, `jax.vjp`, and two cotangents, the task loss being the
weighted sum of the terms that read no teacher ("ce") and the distillation loss the weighted
sum of the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

GROUPS = ("task", "kd")


class DotState(NamedTuple):
  """The step count and one momentum buffer per gradient (shaped like the parameters)."""

  count: jax.Array
  task_momentum: Any
  kd_momentum: Any


class DotTransformation(optax.GradientTransformation):
  """An optax `GradientTransformation` that takes `{"task": g, "kd": g}` as its updates (see
  `dot`); the train step recognises it and computes the two gradients separately."""

  __slots__ = ()


def is_dot(tx) -> bool:
  """Whether `tx` is a `dot(...)` transformation (the step then passes two gradients)."""
  return isinstance(tx, DotTransformation)


def is_task_term(term) -> bool:
  """DOT's split of a loss spec: terms that read no teacher ("ce") make the task loss, every
  other term the distillation loss (mdistiller: `loss_ce` and `loss_kd`)."""
  return not term.needs_teacher


def _default_task_mask(params):
  """Every parameter receives the task gradient, except the loss terms' own parameters (the
  `"terms"` half of the step's `{"student": ..., "terms": ...}` tree: connectors and heads that
  only the distillation loss reaches)."""
  if isinstance(params, Mapping) and set(params) == {"student", "terms"}:
    return {"student": jax.tree.map(lambda _: True, params["student"]),
            "terms": jax.tree.map(lambda _: False, params["terms"])}
  return jax.tree.map(lambda _: True, params)


def _resolve(mask, params, default):
  if mask is None:
    return default(params)
  if callable(mask):
    return mask(params)
  return mask


def dot(learning_rate: float | optax.Schedule, *, momentum: float = 0.9, delta: float = 0.075,
        weight_decay: float = 0.0, task_mask: Any = None, kd_mask: Any = None
        ) -> DotTransformation:
  r"""SGD with separate momentum buffers for the task and the distillation gradient (DOT).

  Zhao et al., "DOT: A Distillation-Oriented Trainer" (ICCV 2023), as mdistiller's
  `DistillationOrientedTrainer` (`mdistiller/engine/dot.py`) with `momentum = m - delta` and
  `momentum_kd = m + delta` (`mdistiller/engine/trainer.py: DOT`), no dampening. Per parameter
  `p`, with task gradient `g_t`, distillation gradient `g_k`, weight decay `wd`, learning rate
  `lr` and `m_t = m - delta`, `m_k = m + delta`, `\bar m = (m_t + m_k) / 2`:

  * task buffer (a parameter the task loss reaches): `d = g_t + wd p`;
    `b_t = d` on the first step, else `b_t = m_t b_t + d` if the distillation loss also reaches
    `p`, else `\bar m b_t + d`;
  * distillation buffer (a parameter the distillation loss reaches): on the first step
    `b_k = g_k`; else `b_k = m_k b_k + g_k` if the task loss also reaches `p` (weight decay is
    applied once, with the task gradient), else `b_k = \bar m b_k + g_k + wd p`;
  * `p <- p - lr (b_t + b_k)` (each buffer only where its loss reaches `p`).

  Which loss reaches which parameter is static (mdistiller reads whether `p.grad` is set):
  `task_mask` and `kd_mask` are pytrees of Python bools shaped like the parameters, or
  callables `params -> mask`, as in `optax.masked`.

  Args:
    learning_rate: a float or an optax schedule (evaluated at the step count, 0 first).
    momentum: the base momentum `m`.
    delta: the momentum split; the distillation gradient gets the larger momentum `m + delta`.
    weight_decay: torch-style L2 weight decay (added to the gradient).
    task_mask: parameters the task loss reaches. Default: all, except the `"terms"` half of the
      step's joint tree (the loss terms' connectors and heads, reached only by distillation).
    kd_mask: parameters the distillation loss reaches. Default: all.

  Returns:
    A `DotTransformation`. Its `update(updates, state, params)` takes
    `updates = {"task": g_t, "kd": g_k}` and needs `params`.
  """
  m_task, m_kd = momentum - delta, momentum + delta
  m_mid = (m_task + m_kd) / 2.0
  if m_task < 0:
    raise ValueError(f"dot: momentum - delta must be >= 0, got {momentum} - {delta}.")

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return DotState(count=jnp.zeros((), jnp.int32), task_momentum=zeros,
                    kd_momentum=jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    if not (isinstance(updates, Mapping) and set(updates) == set(GROUPS)):
      raise ValueError("dot() takes the two gradients of a step as {'task': g_task, 'kd': g_kd} "
                       f"(got {type(updates).__name__}"
                       f"{' with keys ' + str(sorted(updates)) if isinstance(updates, Mapping) else ''}"
                       "); kd_jax.train.make_train_step passes them when the state's optimizer "
                       "is dot(...).")
    if params is None:
      raise ValueError("dot() needs params in update (weight decay and the masks).")
    in_task = _resolve(task_mask, params, _default_task_mask)
    in_kd = _resolve(kd_mask, params, lambda p: jax.tree.map(lambda _: True, p))
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    first = state.count == 0

    def one(p, g_t, g_k, b_t, b_k, t_on, k_on):
      t_on, k_on = bool(t_on), bool(k_on)
      step = jnp.zeros_like(p)
      if t_on:
        d = g_t + weight_decay * p
        b_t = jnp.where(first, d, (m_task if k_on else m_mid) * b_t + d)
        step = step + b_t
      if k_on:
        d = g_k if t_on else g_k + weight_decay * p
        b_k = jnp.where(first, g_k, (m_kd if t_on else m_mid) * b_k + d)
        step = step + b_k
      return (-lr * step).astype(p.dtype), b_t, b_k

    out = jax.tree.map(one, params, updates["task"], updates["kd"], state.task_momentum,
                       state.kd_momentum, in_task, in_kd)
    treedef = jax.tree.structure(params)
    leaves = treedef.flatten_up_to(out)
    new_updates, b_t, b_k = (treedef.unflatten([x[i] for x in leaves]) for i in range(3))
    return new_updates, DotState(count=optax.safe_increment(state.count), task_momentum=b_t,
                                 kd_momentum=b_k)

  return DotTransformation(init, update)


def group_totals(terms, values: Mapping[str, jax.Array], weights: Mapping[str, jax.Array]
                 ) -> dict[str, jax.Array]:
  """{"task": weighted sum of the task terms, "kd": weighted sum of the others} (float32)."""
  totals = {g: jnp.zeros((), jnp.float32) for g in GROUPS}
  for t in terms:
    group = "task" if is_task_term(t) else "kd"
    totals[group] = totals[group] + weights[t.name] * values[t.name]
  return totals


def two_gradients(loss_fn: Callable, trainable) -> tuple[dict[str, Any], Any]:
  """`({"task": g_task, "kd": g_kd}, aux)` of `loss_fn(trainable) -> (group_totals, aux)`: one
  forward pass (`jax.vjp`) pulled back with the two unit cotangents."""
  totals, vjp_fn, aux = jax.vjp(loss_fn, trainable, has_aux=True)
  grads = {g: vjp_fn({h: jnp.asarray(h == g, totals[h].dtype) for h in totals})[0]
           for g in GROUPS}
  return grads, aux
