"""The `kd_topk` term: reading the teacher's top-k from a (epoch, index) cache beside augmented,
mixed images trains exactly as the teacher in the step; with k = K it is the `kd` term; `ce`
uses the mixed labels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import data
from kd_jax.data import augment as aug
from kd_jax.data import topk_cache
from kd_jax.train import TrainState, make_multi_student_step, make_train_step, stack_states
from kd_jax.train import unstack_state
from kd_jax.train.step import teacher_outputs
from kd_jax.train.terms import Outputs, TermContext, build_term
from tests.train._toy import ToyNet, toy_batch

N, B, EPOCHS, SEED = 24, 8, 2, 5
SPEC = "ce:0.1,kd_topk:0.9(k=4,temperature=2.0)"


def _close(a, b, tol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _state(seed):
  return TrainState.create(ToyNet(width=8, rngs=nnx.Rngs(seed)), optax.sgd(0.1, momentum=0.9),
                           rng=jax.random.key(seed))


def test_cached_topk_step_equals_teacher_in_the_step(tmp_path):
  teacher = ToyNet(width=16, batch_norm=True, rngs=nnx.Rngs(100))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  t_vars = {"params": t_params, "batch_stats": t_rest}
  arrays = toy_batch(N, seed=1)
  base = aug.compose(lambda x, rng: aug.random_crop(x, rng, padding=1), aug.random_flip)
  augment = aug.mix(base, arrays, mode="cutmix", prob=0.8)
  spec = topk_cache.make_spec(arrays, teacher_name="toy", teacher_variables=t_vars,
                              augment=augment, augment_config={"crop": 1, "cutmix": 0.8},
                              seed=SEED, num_epochs=EPOCHS, k=4, temperatures=(2.0,))
  forward = jax.jit(lambda x: teacher_outputs(t_graph, t_vars, x).logits)
  topk_cache.write(tmp_path, spec, forward, arrays, augment=augment, batch_size=16)
  cache = topk_cache.load(tmp_path, expect=spec)

  live = jax.jit(make_train_step(SPEC, teacher_graphdef=t_graph, axis_name=None))
  cached = jax.jit(make_train_step(SPEC, axis_name=None))  # no teacher at all
  methods = {"a": SPEC, "b": "ce:0.5,kd_topk:0.5(k=4,temperature=2.0)"}
  multi = jax.jit(make_multi_student_step(methods, axis_name=None))
  live_state = cached_state = _state(0)
  states = {m: stack_states([_state(0), _state(1)]) for m in methods}
  batches = data.batches(arrays, batch_size=B, seed=SEED, augment=augment, num_epochs=EPOCHS,
                         extras=cache.lookup, prefetch=0)
  mixed = 0
  for batch in batches:
    mixed += int(np.sum(batch["mix_lambda"] < 1))
    plain = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    live_state, live_m = live(live_state, plain, t_vars)
    cached_state, cached_m = cached(cached_state, batch)
    states, multi_m = multi(states, batch)
    np.testing.assert_allclose(cached_m["loss/kd_topk"], live_m["loss/kd_topk"], rtol=1e-5)
  assert float(live_m["loss/kd_topk"]) > 0 and mixed > 0
  _close(cached_state.params, live_state.params)
  _close(unstack_state(states["a"], 0).params, cached_state.params)
  with pytest.raises(ValueError, match="needs the teacher"):
    jax.jit(make_train_step(SPEC, axis_name=None))(_state(0), plain)


def test_kd_topk_at_k_equal_classes_is_kd_and_errors_are_clear():
  rng = np.random.default_rng(0)
  s, t = (jnp.asarray(rng.normal(size=(6, 10)), jnp.float32) for _ in range(2))
  where = jnp.array([True] * 5 + [False])

  def ctx(batch, teacher):
    return TermContext(student=Outputs(s, {}), teacher=teacher, batch={"mask": where, **batch},
                       student_params=None, axis_name=None, step=jnp.int32(0))

  dense = Outputs(t, {})
  got = build_term("kd_topk", k=10, temperature=4.0)(ctx({}, dense))
  want = build_term("kd", temperature=4.0)(ctx({}, dense))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  cols = {"teacher_topk_logits": jnp.zeros((6, 3)),
          "teacher_topk_indices": jnp.zeros((6, 3), jnp.int32),
          "teacher_topk_tail_t1": jnp.zeros(6)}
  with pytest.raises(ValueError, match="teacher_topk_tail_t4.*'teacher_topk_tail_t1'"):
    build_term("kd_topk", k=3, temperature=4.0)(ctx(cols, None))
  with pytest.raises(ValueError, match="k=16, the cached top-k has k=3"):
    build_term("kd_topk", temperature=1.0)(ctx(cols, None))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    build_term("kd_topk", temperature=0.0)


def test_ce_with_mixed_labels():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  batch = {"label": np.array([0, 1, 2, 3], np.int32), "mix_label": np.array([4, 1, 0, 2], np.int32),
           "mix_lambda": np.array([0.25, 1.0, 0.6, 0.0], np.float32)}
  ctx = TermContext(student=Outputs(jnp.asarray(logits), {}), teacher=None, batch=batch,
                    student_params=None, axis_name=None, step=jnp.int32(0))
  logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1,
                                                                                  keepdims=True))
  rows = np.arange(4)
  lam = batch["mix_lambda"]
  want = np.mean(-(lam * logp[rows, batch["label"]] + (1 - lam) * logp[rows, batch["mix_label"]]))
  np.testing.assert_allclose(build_term("ce")(ctx), want, rtol=1e-6)
