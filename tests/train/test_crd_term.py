"""The "crd" term: value vs `losses.crd`, memory momentum update vs numpy, fixed normalisers,
trained heads, and shard_map == pmap == one device for the banks and parameters."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import losses
from kd_jax import parallel
from kd_jax.train.terms import crd as crd_lib
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_train_step
from tests.train._toy import ToyNet, toy_batch

NUM_DATA, FEAT, K, B, N_DEV, STEPS = 64, 8, 16, 32, 8, 3
LOSS = f"ce:1,crd:0.8(num_negatives={K},feat_dim={FEAT})"


def _setup():
  teacher = ToyNet(width=16, rngs=nnx.Rngs(1))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  state = TrainState.create(student, optax.sgd(0.1, momentum=0.9), rng=jax.random.key(0))
  perm = np.random.default_rng(0).permutation(NUM_DATA).astype(np.int32)
  batches = []
  for s in range(STEPS):
    b = toy_batch(B, seed=s)
    b["index"] = perm[(s * B) % NUM_DATA:(s * B) % NUM_DATA + B]
    batches.append(b)
  t_vars = {"params": t_params, "batch_stats": t_rest}
  # The term owns its heads and banks: step.init builds them from the output shapes.
  state = make_train_step(LOSS, teacher_graphdef=t_graph, axis_name=None).init(
      state, batches[0], t_vars, num_data=NUM_DATA)
  return teacher, t_graph, t_vars, state, batches


def _np_embed(head, x):
  y = np.asarray(x, np.float64) @ np.asarray(head["kernel"], np.float64) + np.asarray(
      head["bias"], np.float64)
  return y / np.linalg.norm(y, axis=-1, keepdims=True)


def _np_momentum(memory, embeds, index, where, m=0.5):
  out = np.array(memory, np.float64)
  for i, e, w in zip(index, np.asarray(embeds, np.float64), where):
    if w:
      v = m * out[i] + (1 - m) * e
      out[i] = v / np.linalg.norm(v)
  return out


@pytest.mark.parametrize("scoring", ["bank", "gather"])
def test_term_value_memory_update_and_fixed_normalizers(scoring):
  teacher, t_graph, t_vars, state, batches = _setup()
  batch = dict(batches[0], mask=np.arange(B) != 3)  # row 3 is padding
  loss = LOSS.replace(")", f",scoring={scoring})")
  step = jax.jit(make_train_step(loss, teacher_graphdef=t_graph, axis_name=None))
  new_state, metrics = step(state, batch, t_vars)

  # Independent quantities: heads in float64, the step's negatives (its key), old memory rows.
  _, fs = state.model()(batch["image"], train=True)
  _, ft = teacher(batch["image"], train=False)
  heads, mem = state.term_params["crd"], state.term_state["crd"]
  s, t = _np_embed(heads["student"], fs["embedding"]), _np_embed(heads["teacher"],
                                                                 ft["embedding"])
  idx = batch["index"]
  neg = np.asarray(crd_lib.sample_negatives(jax.random.split(state.rng)[1], idx,
                                            num_data=NUM_DATA, num_negatives=K))
  assert neg.shape == (B, K) and neg.min() >= 0 and neg.max() < NUM_DATA
  assert not np.any(neg == idx[:, None])  # the positive is never a negative
  ms, mt = np.asarray(mem["memory_s"]), np.asarray(mem["memory_t"])
  args = (s.astype(np.float32), t.astype(np.float32), ms[neg], mt[neg])
  kw = dict(num_data=NUM_DATA, temperature=0.07, student_positive=ms[idx],
            teacher_positive=mt[idx], where=batch["mask"])
  # First step: Z estimated from this batch, exactly as `losses.crd` does with normalizers=None.
  expected = np.sum(np.asarray(losses.crd(*args, **kw))) / (B - 1)
  np.testing.assert_allclose(metrics["loss/crd"], expected, rtol=2e-4)
  z = losses.crd_normalizers(*args, **kw)
  got = new_state.term_state["crd"]
  np.testing.assert_allclose([got["z_s"], got["z_t"]], z, rtol=2e-4)
  assert bool(got["z_set"])

  # Memory: momentum 0.5 and renormalise at the batch's rows, the padded row and others untouched.
  np.testing.assert_allclose(got["memory_s"], _np_momentum(ms, s, idx, batch["mask"]),
                             atol=1e-5)
  np.testing.assert_allclose(got["memory_t"], _np_momentum(mt, t, idx, batch["mask"]),
                             atol=1e-5)
  np.testing.assert_array_equal(got["memory_s"][idx[3]], ms[idx[3]])

  # Both heads and the student were trained; the student's params alone still make a model.
  for who in ("student", "teacher"):
    assert np.max(np.abs(new_state.term_params["crd"][who]["kernel"] - heads[who]["kernel"])) > 0
  logits, _ = new_state.model()(batch["image"], train=False)
  assert logits.shape == (B, 10)

  # Second step: Z stays fixed.
  newer, _ = step(new_state, batches[1], t_vars)
  np.testing.assert_array_equal(newer.term_state["crd"]["z_s"], got["z_s"])
  np.testing.assert_array_equal(newer.term_state["crd"]["z_t"], got["z_t"])


def test_missing_state_or_index_is_a_clear_error():
  _, t_graph, t_vars, state, batches = _setup()
  plain = TrainState.create(ToyNet(width=8, rngs=nnx.Rngs(2)), optax.sgd(0.1),
                            rng=jax.random.key(0))
  step = make_train_step(LOSS, teacher_graphdef=t_graph, axis_name=None)
  with pytest.raises(ValueError, match="step.init"):
    jax.eval_shape(step, plain, batches[0], t_vars)
  no_index = {k: v for k, v in batches[0].items() if k != "index"}
  with pytest.raises(ValueError, match="index"):
    jax.eval_shape(step, state, no_index, t_vars)
  with pytest.raises(ValueError, match="feat_dim"):
    jax.eval_shape(make_train_step("crd:1(feat_dim=128)", teacher_graphdef=t_graph,
                                   axis_name=None), state, batches[0], t_vars)
  with pytest.raises(ValueError, match="num_data"):
    make_train_step(LOSS, teacher_graphdef=t_graph, axis_name=None).init(plain, batches[0], t_vars)


def _run_single(t_graph, t_vars, state, batches):
  step = jax.jit(make_train_step(LOSS, teacher_graphdef=t_graph, axis_name=None))
  for b in batches:
    state, metrics = step(state, b, t_vars)
  return state, metrics


def _run_shard_map(t_graph, t_vars, state, batches):
  mesh = parallel.make_mesh(N_DEV)
  step = parallel.data_parallel(make_train_step(LOSS, teacher_graphdef=t_graph), mesh)
  state, t_vars = parallel.replicate((state, t_vars), mesh)
  for b in batches:
    state, metrics = step(state, parallel.shard_batch(b, mesh), t_vars)
  return state, metrics


def _run_pmap(t_graph, t_vars, state, batches):
  step = parallel.pmap_parallel(make_train_step(LOSS, teacher_graphdef=t_graph),
                                devices=jax.devices()[:N_DEV])
  state = parallel.stack_for_pmap(state, N_DEV)
  t_vars = parallel.stack_for_pmap(t_vars, N_DEV)
  for b in batches:
    state, metrics = step(state, parallel.split_for_pmap(b, N_DEV), t_vars)
  # Every replica holds the same bank.
  for x in jax.tree.leaves(state.term_state):
    x = np.asarray(x)
    assert all(np.array_equal(x[0], x[i]) for i in range(1, N_DEV))
  return parallel.unstack_from_pmap(state), parallel.unstack_from_pmap(metrics)


def _assert_close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_shard_map_pmap_and_single_device_hold_the_same_bank():
  assert jax.device_count() >= N_DEV
  _, t_graph, t_vars, state0, batches = _setup()
  single, m1 = _run_single(t_graph, t_vars, state0, batches)
  sharded, m2 = _run_shard_map(*_setup()[1:])
  pmapped, m3 = _run_pmap(*_setup()[1:])
  # The banks moved (otherwise agreement would be vacuous).
  assert np.max(np.abs(np.asarray(single.term_state["crd"]["memory_s"])
                       - np.asarray(state0.term_state["crd"]["memory_s"]))) > 1e-2
  for other in (sharded, pmapped):
    _assert_close(other.term_state, single.term_state, 2e-5)
    _assert_close(other.params, single.params, 2e-5)
    _assert_close(other.term_params, single.term_params, 2e-5)
    _assert_close(other.opt_state, single.opt_state, 2e-5)
  for k in ("loss", "loss/ce", "loss/crd"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5)
    np.testing.assert_allclose(m3[k], m1[k], rtol=2e-5)


def test_bank_scores_equal_gathered_rows_and_their_gradient():
  rng = np.random.default_rng(5)
  n, b, k, d = 40, 6, 9, 5
  memory = rng.normal(size=(n, d)).astype(np.float32)
  anchor = rng.normal(size=(b, d)).astype(np.float32)
  positive = rng.normal(size=(b, d)).astype(np.float32)
  neg = rng.integers(0, n, size=(b, k)).astype(np.int32)
  where = np.arange(b) != 2
  rows = np.concatenate([positive[:, None], memory[neg]], 1).astype(np.float64)
  expected = np.einsum("bkd,bd->bk", rows, anchor.astype(np.float64)) / 0.07
  expected[~where] = 0.0
  got = crd_lib.bank_scores(anchor, positive, memory, neg, temperature=0.07, where=where)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # d/d anchor of sum(c * scores) = sum_k c_bk rows_bk / T (zero in the masked row).
  c = rng.normal(size=(b, k + 1))
  grad = jax.grad(lambda a: (crd_lib.bank_scores(a, positive, memory, neg, temperature=0.07,
                                                 where=where) * c).sum())(anchor)
  expected_grad = np.einsum("bk,bkd->bd", c, rows) / 0.07
  expected_grad[~where] = 0.0
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-4)
