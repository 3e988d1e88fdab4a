"""The loss-term contract: `LossTerm` objects, the weighted `Term` of a loss spec, the registry.

A term is an object with two methods:

    init(rng, student, teacher, *, num_data) -> (params, state)
        its own trainable parameters (connectors, heads) and its non-trained state (memory banks,
        running statistics), each a pytree or None. `student` and `teacher` are the models'
        `Outputs` with `jax.ShapeDtypeStruct` leaves (shapes only); `num_data` is the training-set
        size, or None when unknown. Default: `(None, None)`, a term without parameters or state.
    __call__(ctx) -> loss, or (loss, new_state)
        a float32 scalar from a `TermContext`; a term with state returns its new state too (no
        gradient flows through it; the step stores it after the optimizer update).

The step keeps `params` in `TrainState.term_params[name]` (differentiated and updated by the
optimizer with the student) and `state` in `TrainState.term_state[name]`; inside `__call__`
they are `ctx.params` and `ctx.state`. A term's options are its dataclass fields, so
`"kd:0.9(temperature=4)"` builds `KD(temperature=4.0)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kd_jax.losses._numerics import masked_count


@dataclasses.dataclass(frozen=True)
class Outputs:
  """What a classifier returns: logits [b, classes] and its named features."""

  logits: jax.Array
  features: Mapping[str, jax.Array]


jax.tree_util.register_dataclass(Outputs, data_fields=["logits", "features"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class TermContext:
  """Everything a term may read inside the (per-device) train step.

  Attributes:
    student: the student's outputs (differentiated).
    teacher: the teacher's outputs (already under `stop_gradient`), or None without a teacher.
    batch: the per-device batch dict ("image", "label", optional boolean "mask", ...).
    student_params: the student's parameters (differentiated).
    axis_name: the data-parallel axis name inside a mapped step, None on a single device.
    step: the current step (int32 scalar).
    params: this term's own trainable parameters (differentiated), or None.
    state: this term's own non-trained state (read-only here), or None.
    rng: a PRNG key for this step (the same on every device and for every term), or None.
  """

  student: Outputs
  teacher: Outputs | None
  batch: Mapping[str, jax.Array]
  student_params: Any
  axis_name: str | None
  step: jax.Array
  params: Any = None
  state: Any = None
  rng: jax.Array | None = None

  @property
  def where(self):
    """Boolean [b] mask of valid rows (None: every row is valid)."""
    return self.batch.get("mask")

  @property
  def labels(self):
    return self.batch["label"]

  @property
  def labeled_where(self):
    """`where` restricted to the rows that carry a label: a batch entry "labeled" (bool [b])
    marks a transfer set's rows False (only the distillation terms read those)."""
    labeled = self.batch.get("labeled")
    if labeled is None:
      return self.where
    labeled = jnp.asarray(labeled, bool)
    return labeled if self.where is None else self.where & labeled


class LossTerm:
  """Base class of loss terms (see the module docstring). Subclass as a frozen dataclass whose
  fields are the term's options; set `needs_teacher = False` for terms that never read one, and
  `batch_keys` to the extra batch entries the term reads (the data pipeline then provides them)."""

  needs_teacher: ClassVar[bool] = True
  # Batch entries the term reads besides the input and labels (CRD: the dataset "index").
  batch_keys: ClassVar[tuple[str, ...]] = ()

  def init(self, rng, student: Outputs, teacher: Outputs | None, *,
           num_data: int | None = None) -> tuple[Any, Any]:
    """(params, state) of the term; `(None, None)` unless overridden."""
    del rng, student, teacher, num_data
    return None, None

  def __call__(self, ctx: TermContext):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class FunctionTerm(LossTerm):
  """A plain function `fn(ctx, **options) -> scalar` as a stateless term."""

  fn: Callable[..., Any]
  options: tuple[tuple[str, Any], ...] = ()
  reads_teacher: bool = True

  @property
  def needs_teacher(self):  # type: ignore[override]
    return self.reads_teacher

  def __call__(self, ctx):
    return self.fn(ctx, **dict(self.options))


# ------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Callable[..., LossTerm]] = {}
_OPTIONS: dict[str, list[str]] = {}


def register_term(name: str, *, needs_teacher: bool = True):
  """Decorator registering a loss term under `name`.

  Decorate a `LossTerm` subclass (a frozen dataclass; its fields are the options) or a function
  `fn(ctx: TermContext, **options) -> scalar` (a stateless term; `needs_teacher` tells whether
  it reads the teacher). Registering a name again replaces the old term with a warning, so a
  notebook cell that defines a term can be re-run.
  """

  def wrap(obj):
    if name in _REGISTRY:
      warnings.warn(f"loss term {name!r} is registered again: the new definition replaces the "
                    "old one.", stacklevel=2)
    if isinstance(obj, type) and issubclass(obj, LossTerm):
      _REGISTRY[name] = obj
      _OPTIONS[name] = ([f.name for f in dataclasses.fields(obj)]
                        if dataclasses.is_dataclass(obj) else [])
    elif callable(obj):
      _REGISTRY[name] = lambda **opts: FunctionTerm(
          obj, tuple(sorted(opts.items())), needs_teacher)
      _OPTIONS[name] = [p for p in inspect.signature(obj).parameters][1:]
    else:
      raise TypeError(f"register_term({name!r}) decorates a LossTerm subclass or a function, "
                      f"got {obj!r}.")
    return obj

  return wrap


def known_terms() -> list[str]:
  """Sorted names accepted in a loss spec."""
  return sorted(_REGISTRY)


def build_term(name: str, **options) -> LossTerm:
  """The registered term `name` with `options` (raises on unknown names or options)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown loss term {name!r}; known terms: {', '.join(known_terms())}.")
  unknown = sorted(set(options) - set(_OPTIONS[name]))
  if unknown:
    raise ValueError(f"loss term {name!r} does not take option(s) {unknown}; it accepts "
                     f"{_OPTIONS[name] + ['warmup_steps']}.")
  return _REGISTRY[name](**options)


# ------------------------------------------------------------------------------------ spec

@dataclasses.dataclass(frozen=True)
class Term:
  """One weighted term of a loss spec: its name, weight, warm-up, options and built `term`."""

  name: str
  weight: float
  warmup_steps: int = 0
  options: tuple[tuple[str, Any], ...] = ()
  term: LossTerm | None = None

  def __post_init__(self):
    if self.term is None:
      object.__setattr__(self, "term", build_term(self.name, **dict(self.options)))

  @property
  def needs_teacher(self) -> bool:
    return bool(self.term.needs_teacher)

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


def owns_variables(term: LossTerm) -> bool:
  """True when `term` overrides `LossTerm.init` (it may own parameters or state)."""
  return type(term).init is not LossTerm.init


def needs_teacher(terms: Sequence[Term]) -> bool:
  """True when any term reads the teacher's outputs."""
  return any(t.needs_teacher for t in terms)


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


def _parse_string(spec: str) -> list[tuple[str, float, dict[str, Any], None]]:
  """(name, weight, options, None) per term of a spec string (no term built yet)."""
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
    raw.append((name, weight, opts, None))
  return raw


def _term_name(obj) -> str:
  name = getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__
  return re.sub(r"\W", "_", str(name)).lower()


def parse_terms(spec, options: Mapping[str, Mapping[str, Any]] | None = None
                ) -> tuple[Term, ...]:
  """Parses a loss spec into weighted terms.

  Args:
    spec: a string `"name:weight(opt=value,...),..."` (weight defaults to 1), e.g.
      `"ce:0.1,kd:0.9"`, `"ce:1,sp:3000(all_gather=true)"`,
      `"ce:1,dkd:1(beta=8,warmup_steps=4000)"`; a sequence of `Term`s; a `LossTerm` instance or
      a plain callable `fn(ctx) -> scalar` (weight 1, named after its class or function); or a
      sequence mixing those.
    options: per-term options, e.g. `{"kd": {"temperature": 4}}`, merged over the spec's inline
      options (an inline option wins, so the spec printed is the spec run); the key
      `warmup_steps` sets the warm-up.

  Raises:
    ValueError: an unknown term name (the message lists the known ones), a malformed term, a
      repeated term, an option the term does not take, a non-finite or negative weight, or an
      empty spec.
  """
  options = dict(options or {})
  if isinstance(spec, str):
    raw = _parse_string(spec)
  elif isinstance(spec, (LossTerm, Term)) or callable(spec):
    return parse_terms([spec], options)
  else:
    raw = []
    for item in spec:
      if isinstance(item, Term):  # a registered term is rebuilt, so `options` reach it
        raw.append((item.name, item.weight, dict(item.options, warmup_steps=item.warmup_steps),
                    None if item.name in _REGISTRY else item.term))
      elif isinstance(item, str):
        raw.extend(_parse_string(item))
      elif isinstance(item, LossTerm) or callable(item):
        term = item if isinstance(item, LossTerm) else FunctionTerm(item)
        raw.append((_term_name(item), 1.0, {}, term))
      else:
        raise ValueError(f"cannot read loss term {item!r}: expected a spec string, a Term, a "
                         "LossTerm or a callable.")
  if not raw:
    raise ValueError(f"empty loss spec {spec!r}; known terms: {', '.join(known_terms())}.")
  unknown_opts = sorted(set(options) - {r[0] for r in raw})
  if unknown_opts:
    raise ValueError(f"options given for term(s) {unknown_opts} that are not in the loss spec "
                     f"{spec!r}.")
  terms, seen = [], set()
  for name, weight, opts, built in raw:
    if name in seen:
      raise ValueError(f"loss term {name!r} appears twice in {spec!r}.")
    seen.add(name)
    if not (math.isfinite(weight) and weight >= 0):
      raise ValueError(f"loss term {name!r}: weight {weight} must be finite and >= 0.")
    if built is not None and set(options.get(name, {})) - {"warmup_steps"}:
      raise ValueError(f"loss term {name!r} is a term object: set its options on the object, "
                       "not in the options mapping.")
    opts = {**dict(options.get(name, {})), **opts}
    warmup = int(opts.pop("warmup_steps", 0) or 0)
    frozen = tuple(sorted((k, _freeze(v)) for k, v in opts.items()))
    if built is None:
      if name not in _REGISTRY:
        raise ValueError(f"unknown loss term {name!r} in {spec!r}; known terms: "
                         f"{', '.join(known_terms())}.")
      built = build_term(name, **dict(frozen))
    terms.append(Term(name, float(weight), warmup, frozen, built))
  return tuple(terms)


# ------------------------------------------------------------------------------------ running

def term_key(rng: jax.Array, name: str) -> jax.Array:
  """The key a term's `init` receives: `rng` folded with a hash of the term's name."""
  return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def init_terms(terms: Sequence[Term], rng: jax.Array, student: Outputs, teacher: Outputs | None,
               *, num_data: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Runs every term's `init`; returns ({name: params}, {name: state}) without the Nones."""
  params, state = {}, {}
  for t in terms:
    p, s = t.term.init(term_key(rng, t.name), student, teacher, num_data=num_data)
    if p is not None:
      params[t.name] = p
    if s is not None:
      state[t.name] = s
  return params, state


def run_terms(terms: Sequence[Term], ctx: TermContext, term_params: Mapping[str, Any] | None = None,
              term_state: Mapping[str, Any] | None = None
              ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """The unweighted value of every term, {name: float32 scalar}, and the new states of the
  terms that return one, {name: state} (under stop_gradient).

  Raises:
    ValueError: a term needs a teacher and none is given.
  """
  term_params, term_state = dict(term_params or {}), dict(term_state or {})
  out, new_states = {}, {}
  for t in terms:
    if ctx.teacher is None and t.needs_teacher:
      raise ValueError(f"loss term {t.name!r} needs a teacher, but none was given.")
    value = t.term(dataclasses.replace(ctx, params=term_params.get(t.name),
                                       state=term_state.get(t.name)))
    if isinstance(value, tuple):
      value, new = value
      new_states[t.name] = jax.lax.stop_gradient(new)
    out[t.name] = jnp.asarray(value, jnp.float32)
  return out, new_states


def evaluate_terms(terms: Sequence[Term], ctx: TermContext, term_params=None, term_state=None
                   ) -> dict[str, jax.Array]:
  """The unweighted value of every term: {name: float32 scalar} (state updates dropped)."""
  return run_terms(terms, ctx, term_params, term_state)[0]


# ------------------------------------------------------------------------------------ helpers

def masked_mean(values, where) -> jax.Array:
  """Mean of a per-example loss over the valid rows: sum(where * l) / max(#valid, 1)."""
  values = jnp.asarray(values, jnp.float32)
  if where is not None:
    values = jnp.where(where, values, 0.0)
  return jnp.sum(values) / masked_count(where, values.shape[0])


def feature(outputs: Outputs, key, who: str):
  """`outputs.features[key]` (a list for a tuple of keys), or a ValueError naming what exists."""
  if isinstance(key, (tuple, list)):
    return [feature(outputs, k, who) for k in key]
  if key not in outputs.features:
    raise ValueError(f"{who} has no feature {key!r}; it returns {sorted(outputs.features)}.")
  return outputs.features[key]


def feature_pair(ctx: TermContext, name, teacher_name=None):
  """(student feature, teacher feature) by name (the teacher's name defaults to the student's)."""
  return (feature(ctx.student, name, "the student"),
          feature(ctx.teacher, name if teacher_name is None else teacher_name, "the teacher"))


def gather_axis(ctx: TermContext, all_gather: bool) -> str | None:
  """The axis a batch-relational loss gathers over: `ctx.axis_name` when `all_gather`."""
  return ctx.axis_name if all_gather else None
