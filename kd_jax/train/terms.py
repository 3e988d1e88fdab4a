"""Loss terms: a registry of adapters from model outputs to scalar losses, and their config syntax.

A distillation objective is a weighted sum of terms, written as a string such as
`"ce:0.1,kd:0.9"` (RepDistiller KD) or `"ce:1,sp:3000"` (RepDistiller SP). Each term may carry
options in parentheses, `"ce:1,dkd:1(beta=8,warmup_steps=4000)"`, or in a separate mapping
(`options={"kd": {"temperature": 4.0}}`). Every term's weight can warm up linearly over
`warmup_steps` (DKD's 20-epoch warm-up).

An adapter maps a `TermContext` (student and teacher outputs, the batch, the student parameters,
the data-parallel axis) plus its options to one scalar, calling the pure functions of
`kd_jax.losses`. Per-example losses are averaged over the valid rows of the (per-device) batch;
batch-relational losses (SP, RKD, PKT, CC) see the per-device batch as the PyTorch anchors do, or
the global batch with the option `all_gather=true` (features all-gathered over the batch axis).
New terms: `@register_term("name")`.

Stateful terms (CRD, `kd_jax.train.crd`) read their trainable parameters from `ctx.aux_params`,
their non-trained state from `ctx.extra` and a per-step key from `ctx.rng`, and return
`(value, updates)`: `updates` ({key of `extra`: new value}, no gradient) is written into the
state's `extra` by the step after the optimizer update.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kd_jax import losses
from kd_jax.losses._numerics import masked_count
from kd_jax.train import crd as _crd


@dataclasses.dataclass(frozen=True)
class Outputs:
  """What a classifier returns: logits [b, classes] and its named features."""

  logits: jax.Array
  features: Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TermContext:
  """Everything a term may read inside the (per-device) train step.

  Attributes:
    student: the student's outputs (differentiated).
    teacher: the teacher's outputs (under stop_gradient), or None when training without one.
    batch: the per-device batch dict ("image", "label", optional boolean "mask").
    params: the student's parameters (for terms with their own learned connectors).
    axis_name: the data-parallel axis name inside a mapped step, None on a single device.
    step: the current step (int32 scalar).
    aux_params: the loss terms' own trainable parameters ({term name: pytree}, differentiated).
    extra: the state's non-trained loss state (`TrainState.extra`, read-only here).
    rng: a PRNG key for this step (the same on every device), or None.
  """

  student: Outputs
  teacher: Outputs | None
  batch: Mapping[str, jax.Array]
  params: Any
  axis_name: str | None
  step: jax.Array
  aux_params: Any = None
  extra: Any = None
  rng: jax.Array | None = None

  @property
  def where(self):
    """Boolean [b] mask of valid rows (None: every row is valid)."""
    return self.batch.get("mask")

  @property
  def labels(self):
    return self.batch["label"]


@dataclasses.dataclass(frozen=True)
class Term:
  """One weighted loss term. `options` are (key, value) pairs passed to the adapter."""

  name: str
  weight: float
  warmup_steps: int = 0
  options: tuple[tuple[str, Any], ...] = ()

  def weight_at(self, step) -> jax.Array:
    """`weight * min((step + 1) / warmup_steps, 1)`: linear warm-up, 1/warmup at step 0 and the
    full weight from step `warmup_steps - 1` on (mdistiller's `min(epoch / warmup, 1)` with a
    1-based epoch, per step). No warm-up when `warmup_steps <= 0`."""
    if self.warmup_steps <= 0:
      return jnp.asarray(self.weight, jnp.float32)
    frac = (jnp.asarray(step, jnp.float32) + 1.0) / float(self.warmup_steps)
    return self.weight * jnp.minimum(frac, 1.0)

  def __str__(self):
    opts = [f"{k}={v}" for k, v in self.options]
    if self.warmup_steps:
      opts.append(f"warmup_steps={self.warmup_steps}")
    return f"{self.name}:{self.weight:g}" + (f"({','.join(opts)})" if opts else "")


_TERMS: dict[str, Callable[..., jax.Array]] = {}
_NEEDS_TEACHER: set[str] = set()


def register_term(name: str, *, needs_teacher: bool = True):
  """Decorator registering `adapter(ctx: TermContext, **options)` under `name`; the adapter
  returns a scalar, or `(scalar, updates)` with `updates` a dict merged into `TrainState.extra`."""

  def wrap(fn):
    if name in _TERMS:
      raise ValueError(f"loss term {name!r} registered twice")
    _TERMS[name] = fn
    if needs_teacher:
      _NEEDS_TEACHER.add(name)
    return fn

  return wrap


def known_terms() -> list[str]:
  """Sorted names accepted in a loss spec."""
  return sorted(_TERMS)


def needs_teacher(terms: Sequence[Term]) -> bool:
  """True when any term reads the teacher's outputs."""
  return any(t.name in _NEEDS_TEACHER for t in terms)


def _parse_value(text: str):
  text = text.strip()
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  if low in ("none", "null"):
    return None
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  if "|" in text:  # a list of layer names: "stage2|pre_pool"
    return tuple(_parse_value(v) for v in text.split("|"))
  return text


def _freeze(value):
  """Lists become tuples so that options are hashable (the step is traced once per spec)."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  return value


_TERM_RE = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(?::\s*([^()]+?))?\s*(?:\((.*)\))?\s*$")


def _split_top_level(spec: str) -> list[str]:
  parts, depth, cur = [], 0, []
  for ch in spec:
    if ch == "(":
      depth += 1
    elif ch == ")":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  parts.append("".join(cur))
  return [p for p in parts if p.strip()]


def parse_terms(spec: str | Sequence[Term],
                options: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Term, ...]:
  """Parses `"name:weight(opt=value,...),..."` into terms (weight defaults to 1).

  Args:
    spec: e.g. `"ce:0.1,kd:0.9"`, `"ce:1,sp:3000(all_gather=true)"`,
      `"ce:1,dkd:1(beta=8,warmup_steps=4000)"`; or already parsed terms.
    options: per-term options merged over the inline ones, e.g. `{"kd": {"temperature": 4}}`;
      the key `warmup_steps` sets the warm-up.

  Raises:
    ValueError: an unknown term name (the message lists the known ones), a malformed term, a
      repeated term, an option the adapter does not take, or an empty spec.
  """
  options = dict(options or {})
  if isinstance(spec, str):
    raw = []
    for part in _split_top_level(spec):
      m = _TERM_RE.match(part)
      if not m:
        raise ValueError(f"malformed loss term {part.strip()!r} in {spec!r}; expected "
                         "'name:weight' or 'name:weight(key=value,...)'.")
      name, weight, inline = m.group(1), m.group(2), m.group(3)
      try:
        weight = 1.0 if weight is None else float(weight)
      except ValueError:
        raise ValueError(f"loss term {part.strip()!r}: weight {weight!r} is not a number.") from None
      opts = {}
      for kv in _split_top_level(inline or ""):
        if "=" not in kv:
          raise ValueError(f"loss term {part.strip()!r}: option {kv.strip()!r} is not key=value.")
        k, v = kv.split("=", 1)
        opts[k.strip()] = _parse_value(v)
      raw.append((name, weight, opts))
  else:
    raw = [(t.name, t.weight, dict(t.options, warmup_steps=t.warmup_steps)) for t in spec]
  if not raw:
    raise ValueError(f"empty loss spec {spec!r}; known terms: {', '.join(known_terms())}.")
  unknown_opts = sorted(set(options) - {name for name, _, _ in raw})
  if unknown_opts:
    raise ValueError(f"options given for term(s) {unknown_opts} that are not in the loss spec "
                     f"{spec!r}.")
  terms, seen = [], set()
  for name, weight, opts in raw:
    if name not in _TERMS:
      raise ValueError(f"unknown loss term {name!r} in {spec!r}; known terms: "
                       f"{', '.join(known_terms())}.")
    if name in seen:
      raise ValueError(f"loss term {name!r} appears twice in {spec!r}.")
    seen.add(name)
    opts = {**opts, **dict(options.get(name, {}))}
    warmup = int(opts.pop("warmup_steps", 0) or 0)
    _check_options(name, opts)
    terms.append(Term(name, weight, warmup, tuple(sorted((k, _freeze(v))
                                                         for k, v in opts.items()))))
  return tuple(terms)


def _check_options(name: str, opts: Mapping[str, Any]) -> None:
  import inspect
  params = inspect.signature(_TERMS[name]).parameters
  accepted = [p for p in params if p != "ctx"]
  unknown = sorted(set(opts) - set(accepted))
  if unknown:
    raise ValueError(f"loss term {name!r} does not take option(s) {unknown}; it accepts "
                     f"{accepted + ['warmup_steps']}.")


def run_terms(terms: Sequence[Term], ctx: TermContext
              ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """The unweighted value of every term, {name: float32 scalar}, and the state updates the
  stateful terms return, {key of `extra`: new value} (under stop_gradient).

  Raises:
    ValueError: a term needs a teacher and none is given, or two terms update the same key.
  """
  out, updates = {}, {}
  for term in terms:
    if ctx.teacher is None and term.name in _NEEDS_TEACHER:
      raise ValueError(f"loss term {term.name!r} needs a teacher, but none was given.")
    value = _TERMS[term.name](ctx, **dict(term.options))
    if isinstance(value, tuple):
      value, new = value
      clash = sorted(set(new) & set(updates))
      if clash:
        raise ValueError(f"loss term {term.name!r} updates state {clash} that another term "
                         "also updates.")
      updates.update(jax.lax.stop_gradient(dict(new)))
    out[term.name] = jnp.asarray(value, jnp.float32)
  return out, updates


def evaluate_terms(terms: Sequence[Term], ctx: TermContext) -> dict[str, jax.Array]:
  """The unweighted value of every term: {name: float32 scalar} (state updates dropped)."""
  return run_terms(terms, ctx)[0]


# ------------------------------------------------------------------------------------ helpers


def masked_mean(values, where) -> jax.Array:
  """Mean of a per-example loss over the valid rows: sum(where * l) / max(#valid, 1)."""
  values = jnp.asarray(values, jnp.float32)
  if where is not None:
    values = jnp.where(where, values, 0.0)
  return jnp.sum(values) / masked_count(where, values.shape[0])


def _feature(outputs: Outputs, key, who: str):
  if isinstance(key, (tuple, list)):
    return [_feature(outputs, k, who) for k in key]
  if key not in outputs.features:
    raise ValueError(f"{who} has no feature {key!r}; it returns {sorted(outputs.features)}.")
  return outputs.features[key]


def _pair(ctx: TermContext, feature, teacher_feature=None):
  s = _feature(ctx.student, feature, "the student")
  t = _feature(ctx.teacher, feature if teacher_feature is None else teacher_feature, "the teacher")
  return s, jax.tree.map(jax.lax.stop_gradient, t)


def _gather(ctx: TermContext, tree, all_gather: bool):
  """All-gathers the batch axis of every array over the data-parallel axis when asked."""
  if not all_gather or ctx.axis_name is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.all_gather(x, ctx.axis_name, axis=0, tiled=True), tree)


def _relational(ctx, fn, feature, teacher_feature, all_gather, **kw):
  s, t = _pair(ctx, feature, teacher_feature)
  where = ctx.where
  s, t, where = _gather(ctx, (s, t, where), all_gather)
  return fn(s, t, where=where, **kw)


# ------------------------------------------------------------------------------------ terms


@register_term("ce", needs_teacher=False)
def _ce(ctx: TermContext, label_smoothing: float = 0.0):
  """Cross-entropy with the labels (optionally label-smoothed), mean over valid rows."""
  logits = jnp.asarray(ctx.student.logits, jnp.float32)
  num_classes = logits.shape[-1]
  onehot = jax.nn.one_hot(ctx.labels, num_classes)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return masked_mean(optax.softmax_cross_entropy(logits, onehot), ctx.where)


@register_term("kd")
def _kd(ctx: TermContext, temperature: float = 4.0):
  """Hinton KD, `losses.kd` (T^2 KL per example), mean over valid rows."""
  return masked_mean(losses.kd(ctx.student.logits, _t_logits(ctx), temperature=temperature,
                               where=ctx.where), ctx.where)


@register_term("dkd")
def _dkd(ctx: TermContext, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0):
  """Decoupled KD, `losses.dkd`, mean over valid rows (warm it up with `warmup_steps`)."""
  return masked_mean(losses.dkd(ctx.student.logits, _t_logits(ctx), ctx.labels, alpha=alpha,
                                beta=beta, temperature=temperature, where=ctx.where), ctx.where)


@register_term("ptloss")
def _ptloss(ctx: TermContext, epsilon=(0.0,), temperature: float = 1.0):
  """PTLoss, `losses.ptloss` with coefficients `epsilon` ([M] or [K, M]; a scalar is [1]),
  mean over valid rows. Choose epsilon with `kd_jax.ptloss.select_coefficients`."""
  eps = jnp.atleast_1d(jnp.asarray(epsilon, jnp.float32))
  return masked_mean(losses.ptloss(ctx.student.logits, _t_logits(ctx), eps,
                                   temperature=temperature, where=ctx.where), ctx.where)


@register_term("sp")
def _sp(ctx: TermContext, feature="pre_pool", teacher_feature=None, all_gather: bool = False):
  """Similarity-preserving KD, `losses.sp`, on `feature` (a name or a tuple of names)."""
  return _relational(ctx, losses.sp, feature, teacher_feature, all_gather)


@register_term("rkd")
def _rkd(ctx: TermContext, feature="embedding", teacher_feature=None, all_gather: bool = False,
         distance_weight: float = 25.0, angle_weight: float = 50.0):
  """Relational KD, `losses.rkd`, on the pooled embeddings."""
  return _relational(ctx, losses.rkd, feature, teacher_feature, all_gather,
                     distance_weight=distance_weight, angle_weight=angle_weight)


@register_term("pkt")
def _pkt(ctx: TermContext, feature="embedding", teacher_feature=None, all_gather: bool = False):
  """Probabilistic knowledge transfer, `losses.pkt`, on the pooled embeddings."""
  return _relational(ctx, losses.pkt, feature, teacher_feature, all_gather)


@register_term("cc")
def _cc(ctx: TermContext, feature="embedding", teacher_feature=None, all_gather: bool = False):
  """Correlation congruence, `losses.cc`, on the pooled embeddings."""
  return _relational(ctx, losses.cc, feature, teacher_feature, all_gather)


@register_term("fitnet")
def _fitnet(ctx: TermContext, feature="stage2", teacher_feature=None):
  """FitNet hint loss, `losses.fitnet`, between same-shaped features, mean over valid rows."""
  s, t = _pair(ctx, feature, teacher_feature)
  return masked_mean(losses.fitnet(s, t, where=ctx.where), ctx.where)


@register_term("at")
def _at(ctx: TermContext, feature=("stage1", "stage2", "stage3"), teacher_feature=None,
        p: int = 2):
  """Attention transfer, `losses.attention_transfer`, summed over the listed stages."""
  s, t = _pair(ctx, feature, teacher_feature)
  if not isinstance(s, list):
    s, t = [s], [t]
  return sum(masked_mean(losses.attention_transfer(a, b, p=p, where=ctx.where), ctx.where)
             for a, b in zip(s, t))


@register_term("nst")
def _nst(ctx: TermContext, feature="pre_pool", teacher_feature=None):
  """Neuron selectivity transfer, `losses.nst`."""
  s, t = _pair(ctx, feature, teacher_feature)
  value = losses.nst(s, t, where=ctx.where)
  return masked_mean(value, ctx.where) if jnp.ndim(value) else value


register_term("crd")(_crd.crd_term)  # trainable heads + memory banks: see kd_jax.train.crd


def _t_logits(ctx: TermContext):
  return jax.lax.stop_gradient(ctx.teacher.logits)
