"""Token-level LM terms: numpy float64 values with token and row masks, both reductions, the spec
options, and a train step on a toy causal LM."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax.train import TermContext, TrainState, make_train_step
from kd_jax.train import terms as terms_lib
from kd_jax.train.terms import Outputs

B, T, V = 4, 6, 11


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_per_token(name, s, t, temperature=1.0, beta=0.5):
  ls, lt = _np_log_softmax(s / temperature), _np_log_softmax(t / temperature)
  ps, pt = np.exp(ls), np.exp(lt)
  log_m = np.log(beta * pt + (1 - beta) * ps)
  return {"forward_kl": (pt * (lt - ls)).sum(-1), "reverse_kl": (ps * (ls - lt)).sum(-1),
          "jsd": (beta * pt * (lt - log_m) + (1 - beta) * ps * (ls - log_m)).sum(-1),
          "tv": 0.5 * np.abs(ps - pt).sum(-1)}[name]


def _data(seed=0):
  rng = np.random.default_rng(seed)
  s = (2 * rng.standard_normal((B, T, V))).astype(np.float32)
  t = (2 * rng.standard_normal((B, T, V))).astype(np.float32)
  token_mask = rng.random((B, T)) > 0.3
  token_mask[1] = False  # a sequence without valid tokens
  row_mask = np.array([True, True, False, True])  # a padded row
  labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
  return s, t, token_mask, row_mask, labels


def _ctx(s, t, batch):
  teacher = None if t is None else Outputs(jnp.asarray(t), {})
  return TermContext(student=Outputs(jnp.asarray(s), {}), teacher=teacher,
                     batch=batch, student_params=None, axis_name=None,
                     step=jnp.zeros((), jnp.int32))


@pytest.mark.parametrize("spec,name,kw", [
    ("forward_kl:1(temperature=2)", "forward_kl", dict(temperature=2.0)),
    ("reverse_kl:1", "reverse_kl", {}),
    ("jsd:1(beta=0.2,temperature=0.5)", "jsd", dict(beta=0.2, temperature=0.5)),
    ("tv:1(reduction=sequence)", "tv", {}),
])
def test_token_term_is_the_masked_token_mean(spec, name, kw):
  s, t, token_mask, row_mask, labels = _data()
  term, = terms_lib.parse_terms(spec)
  per_token = _np_per_token(name, s.astype(np.float64), t.astype(np.float64), **kw)
  valid = token_mask & row_mask[:, None]
  if "sequence" in spec:
    has = valid.any(-1)
    seq = (per_token * valid).sum(-1) / np.maximum(valid.sum(-1), 1)
    want = seq[has].mean()
  else:
    want = per_token[valid].mean()
  batch = {"label": labels, "token_mask": token_mask, "mask": row_mask}
  np.testing.assert_allclose(term.term(_ctx(s, t, batch)), want, rtol=1e-5)
  # Without masks every token counts; with only the row mask, every token of the valid rows.
  np.testing.assert_allclose(term.term(_ctx(s, t, {"label": labels})),
                             per_token.mean(), rtol=1e-5)
  want_rows = (per_token[row_mask].mean() if "sequence" not in spec
               else per_token[row_mask].mean(-1).mean())
  np.testing.assert_allclose(term.term(_ctx(s, t, {"label": labels, "mask": row_mask})),
                             want_rows, rtol=1e-5)


def test_token_ce_and_a_custom_mask_key():
  s, _, token_mask, row_mask, labels = _data(1)
  term, = terms_lib.parse_terms("token_ce:1(token_mask=completion)")
  log_p = _np_log_softmax(s.astype(np.float64))
  ce = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
  valid = token_mask & row_mask[:, None]
  labels = np.where(valid, labels, -7)  # labels of masked tokens are never read
  batch = {"label": labels, "completion": token_mask, "mask": row_mask}
  np.testing.assert_allclose(term.term(_ctx(s, None, batch)), ce[valid].mean(), rtol=1e-5)
  # Rows marked labeled=False (a transfer set) are left out of the cross-entropy.
  labeled = np.array([True, False, True, False])
  batch["labeled"] = labeled
  np.testing.assert_allclose(term.term(_ctx(s, None, batch)),
                             ce[valid & labeled[:, None]].mean(), rtol=1e-5)
  assert not term.needs_teacher


def test_options_are_checked():
  jsd, = terms_lib.parse_terms("jsd:0.5(beta=0.9,reduction=sequence)")
  assert (jsd.term.beta, jsd.term.reduction, jsd.term.temperature) == (0.9, "sequence", 1.0)
  for spec, match in (("jsd:1(beta=1.5)", r"beta must lie in \[0, 1\]"),
                      ("reverse_kl:1(temperature=0)", "temperature must be > 0"),
                      ("tv:1(reduction=none)", "reduction must be one of"),
                      ("token_ce:1(beta=0.5)", "does not take")):
    with pytest.raises(ValueError, match=match):
      terms_lib.parse_terms(spec)
  with pytest.raises(ValueError, match="labels must have the logits' token shape"):
    terms_lib.parse_terms("token_ce:1")[0].term(
        _ctx(np.zeros((B, T, V), np.float32), None, {"label": np.zeros((B,), np.int32)}))


class TinyLM(nnx.Module):
  """tokens [b, T] -> logits [b, T, V]: embedding, one causal mixing step (the previous token's
  embedding added), a linear read-out."""

  def __init__(self, width, rngs):
    self.embed = nnx.Embed(V, width, rngs=rngs)
    self.out = nnx.Linear(width, V, rngs=rngs)

  def __call__(self, tokens, *, train):
    del train
    h = self.embed(tokens)
    h = h + jnp.pad(h, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    return self.out(jnp.tanh(h)), {"embedding": h}


def test_train_step_with_a_toy_causal_lm():
  teacher = TinyLM(8, nnx.Rngs(1))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
  mask = np.ones((B, T), bool)
  mask[:, :2] = False  # a 2-token prompt
  batch = {"tokens": tokens[:, :-1], "label": tokens[:, 1:], "token_mask": mask}
  step = make_train_step("token_ce:0.5,jsd:1(beta=0.5)", teacher_graphdef=t_graph,
                         axis_name=None, input_key="tokens")
  lr = 0.5
  state = TrainState.create(TinyLM(4, nnx.Rngs(2)), optax.sgd(lr), rng=jax.random.key(0))
  new_state, metrics = jax.jit(step)(state, batch, {"params": t_params, "batch_stats": t_rest})
  s = np.asarray(nnx.merge(state.graphdef, state.params, state.batch_stats)(
      batch["tokens"], train=True)[0], np.float64)
  t = np.asarray(teacher(batch["tokens"], train=False)[0], np.float64)
  np.testing.assert_allclose(metrics["loss/jsd"], _np_per_token("jsd", s, t)[mask].mean(),
                             rtol=1e-5)
  ce = -np.take_along_axis(_np_log_softmax(s), batch["label"][..., None], -1)[..., 0]
  np.testing.assert_allclose(metrics["loss/token_ce"], ce[mask].mean(), rtol=1e-5)
  # The update is SGD on the weighted sum (checked on the read-out bias: d/db of the mean).
  def total(params):
    logits = nnx.merge(state.graphdef, params, state.batch_stats)(batch["tokens"], train=True)[0]
    ctx = _ctx(logits, t.astype(np.float32), batch)
    return (0.5 * terms_lib.parse_terms("token_ce:1")[0].term(ctx)
            + terms_lib.parse_terms("jsd:1")[0].term(ctx))
  g = jax.jit(jax.grad(total))(state.params)
  np.testing.assert_allclose(new_state.params["out"]["bias"][...],
                             state.params["out"]["bias"][...] - lr * g["out"]["bias"][...],
                             rtol=1e-5, atol=1e-7)
