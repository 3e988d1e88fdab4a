"""DOT (`kd_jax.train.dot`) against a numpy restatement of mdistiller's
`DistillationOrientedTrainer` (`mdistiller/engine/dot.py`), and its wiring into the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import losses
from kd_jax.train import dot
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_train_step
from tests.train._toy import ToyNet, toy_batch


class NumpyDOT:
  """mdistiller's DistillationOrientedTrainer restated in float64 numpy: `step_kd(grads)` records
  the distillation gradients of the parameters that have one, `step(grads, lr)` applies the task
  gradients and then the recorded distillation gradients (momentum_kd = m + delta for the
  distillation buffer, momentum = m - delta for the task buffer, their mean for a parameter
  that only one of the losses reaches; weight decay once)."""

  def __init__(self, params, *, momentum, momentum_kd, weight_decay):
    self.params = {k: np.array(v, np.float64) for k, v in params.items()}
    self.state = {k: {} for k in params}
    self.m, self.m_kd, self.wd = momentum, momentum_kd, weight_decay
    self.kd = []

  def step_kd(self, grads):
    self.kd = [(k, np.asarray(grads[k], np.float64), self.state[k].get("kd"))
               for k in self.params if k in grads]

  def step(self, grads, lr):
    task = [k for k in self.params if k in grads]
    kd_names = [k for k, _, _ in self.kd]
    mid = (self.m + self.m_kd) / 2
    for k in task:
      p = self.params[k]
      d = np.asarray(grads[k], np.float64) + self.wd * p
      buf = self.state[k].get("task")
      if buf is None:
        buf = d.copy()
      elif k in kd_names:
        buf = self.m * buf + d
      else:
        buf = mid * buf + d
      self.state[k]["task"] = buf
      self.params[k] = p - lr * buf
    for k, d, buf in self.kd:
      p = self.params[k]
      if buf is None:
        buf = d.copy()
      elif k in task:
        buf = self.m_kd * buf + d
      else:
        buf = mid * buf + (d + self.wd * p)
      self.state[k]["kd"] = buf
      self.params[k] = p - lr * buf
    self.kd = []


# A toy problem: w is reached by both losses, v by the task loss only, h by distillation only.
A, B, C, D = (np.array([1.0, -2.0, 0.5]), np.array([0.3, 0.7]), np.array([-1.0, 0.0, 2.0]),
              np.array([1.5, -0.5]))


def _task_grads(p):
  return {"w": (p["w"] - A) * (1 + np.sum(p["v"] ** 2)), "v": 2 * (p["v"] - B)}


def _kd_grads(p):
  return {"w": 3 * (p["w"] - C) * np.tanh(p["w"]), "h": p["h"] - D}


def _run_jax(tx, params, steps):
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  state = tx.init(params)
  for _ in range(steps):
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    gt, gk = _task_grads(p64), _kd_grads(p64)
    full = lambda g: {k: jnp.asarray(g.get(k, np.zeros_like(p64[k])), jnp.float32) for k in p64}
    updates, state = tx.update({"task": full(gt), "kd": full(gk)}, state, params)
    params = optax.apply_updates(params, updates)
  return {k: np.asarray(v) for k, v in params.items()}


def _run_numpy(params, steps, lr_of, *, momentum, delta, weight_decay):
  ref = NumpyDOT(params, momentum=momentum - delta, momentum_kd=momentum + delta,
                 weight_decay=weight_decay)
  for i in range(steps):
    ref.step_kd(_kd_grads(ref.params))
    ref.step(_task_grads(ref.params), lr_of(i))
  return ref.params


P0 = {"w": np.array([0.2, 0.1, -0.4]), "v": np.array([0.5, -1.0]), "h": np.array([0.0, 2.0])}
TASK = {"w": True, "v": True, "h": False}
KD = {"w": True, "v": False, "h": True}


def test_dot_matches_mdistiller_restatement_and_fails_with_swapped_delta():
  schedule = optax.piecewise_constant_schedule(0.1, {3: 0.5})
  kw = dict(momentum=0.9, delta=0.075, weight_decay=5e-2)
  want = _run_numpy(P0, 6, lambda i: float(schedule(i)), **kw)
  got = _run_jax(dot(schedule, task_mask=TASK, kd_mask=KD, **kw), P0, 6)
  for k in P0:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
  # The same run with the two momenta swapped (m + delta for the task gradient) is far off.
  swapped = _run_jax(dot(schedule, task_mask=TASK, kd_mask=KD, **{**kw, "delta": -0.075}),
                     P0, 6)
  assert max(np.abs(swapped[k] - want[k]).max() for k in P0) > 1e-2
  # And plain SGD momentum on the summed gradient (delta = 0, both in every parameter) is too.
  assert not np.allclose(_run_jax(dot(schedule, **{**kw, "delta": 0.0}), P0, 6)["w"],
                         want["w"], rtol=1e-3)


def test_dot_rejects_a_single_gradient_tree():
  tx = dot(0.1)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="'task'"):
    tx.update({"w": jnp.ones(2)}, tx.init(params), params)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_step_with_dot_differentiates_task_and_distillation_losses_separately():
  teacher = ToyNet(width=16, rngs=nnx.Rngs(1))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  t_vars = {"params": t_params, "batch_stats": t_rest}
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  graphdef, params0, rest = nnx.split(student, nnx.Param, ...)
  batches = [toy_batch(16, seed=s) for s in (0, 1, 2)]
  kw = dict(momentum=0.9, delta=0.075, weight_decay=5e-4)
  state = TrainState.create(student, dot(0.2, **kw), rng=jax.random.key(0))
  step = jax.jit(make_train_step("ce:0.1,kd:0.9(temperature=4)", teacher_graphdef=t_graph,
                                 axis_name=None))
  for b in batches:
    state, _ = step(state, b, t_vars)

  # By hand: each loss's gradient on its own (jax.grad of the written-out losses), then DOT.
  def losses_of(p, b):
    s = nnx.merge(graphdef, p, rest)(jnp.asarray(b["image"]), train=True)[0]
    t = teacher(jnp.asarray(b["image"]), train=False)[0]
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(s), b["label"][:, None], 1))
    return 0.1 * ce, 0.9 * jnp.mean(losses.kd(s, t, temperature=4.0))

  grads_of = jax.jit(lambda p, b: tuple(jax.tree.leaves(jax.grad(lambda p: losses_of(p, b)[i])(p))
                                        for i in (0, 1)))
  leaves, treedef = jax.tree.flatten(params0)
  ref = NumpyDOT({str(i): np.asarray(x) for i, x in enumerate(leaves)},
                 momentum=0.9 - 0.075, momentum_kd=0.9 + 0.075, weight_decay=5e-4)
  for b in batches:
    p = jax.tree.unflatten(treedef, [jnp.asarray(ref.params[str(i)], jnp.float32)
                                     for i in range(len(leaves))])
    g_task, g_kd = grads_of(p, b)
    ref.step_kd({str(i): np.asarray(g) for i, g in enumerate(g_kd)})
    ref.step({str(i): np.asarray(g) for i, g in enumerate(g_task)}, 0.2)
  for i, x in enumerate(jax.tree.leaves(state.params)):
    np.testing.assert_allclose(x, ref.params[str(i)], rtol=1e-4, atol=1e-6)
