"""Name -> constructor registry behind `kd_jax.models.create`."""

from __future__ import annotations

import inspect
from typing import Callable

from flax import nnx

_BUILDERS: dict[str, Callable[..., nnx.Module]] = {}


def register(name: str):
  """Decorator registering `builder(*, num_classes, rngs, **options)` under `name`."""

  def wrap(builder):
    if name in _BUILDERS:
      raise ValueError(f"model name {name!r} registered twice")
    _BUILDERS[name] = builder
    return builder

  return wrap


def available() -> list[str]:
  """Sorted names accepted by `create`."""
  return sorted(_BUILDERS)


def create(name: str, *, num_classes: int, rngs: nnx.Rngs | None = None,
           **options) -> nnx.Module:
  """Builds the model registered as `name`.

  Every model is called as `model(x, *, train)` on NHWC float input and returns
  `(logits, features)`; see the `kd_jax.models` docstring for the feature dictionary.

  Args:
    name: a name from `available()` (RepDistiller's `model_dict` names for the CIFAR zoo).
    num_classes: size of the classifier output.
    rngs: parameter (and dropout) streams; None means `nnx.Rngs(0)`.
    **options: model-specific keywords, e.g. `dtype` (compute dtype) for every model,
      `dropout_rate` for the wide ResNets.

  Raises:
    ValueError: unknown name, bad `num_classes` or an option the model does not take.
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model name {name!r}; known names: {', '.join(available())}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  builder = _BUILDERS[name]
  accepted = {p for p in inspect.signature(builder).parameters if p not in ("num_classes", "rngs")}
  unknown = sorted(set(options) - accepted)
  if unknown:
    raise ValueError(f"model {name!r} does not take option(s) {unknown}; "
                     f"it accepts {sorted(accepted)}")
  if rngs is None:
    rngs = nnx.Rngs(0)
  return builder(num_classes=num_classes, rngs=rngs, **options)


def create_compiled(name: str, *, num_classes: int, seed: int = 0, **options) -> nnx.Module:
  """`create(name, num_classes=..., rngs=nnx.Rngs(seed), **options)` with its initialisers
  compiled as one program.

  Eager initialisation dispatches (and on a fresh process compiles) every initialiser op one by
  one; under `nnx.jit` the whole initialisation is one compilation, which is much faster for the
  large zoo models. The parameters are the same as `create`'s with the same seed.
  """
  return nnx.jit(lambda: create(name, num_classes=num_classes, rngs=nnx.Rngs(seed),
                                **options))()
