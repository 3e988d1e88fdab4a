"""Mixed precision from a model's config: `cfg.dtype` (compute) and `cfg.param_dtype`.

Every experiment config gives its teacher and student a compute `dtype` ("float32", the
default, or "bfloat16" / "float16": convolutions, matrix products and activations in that type)
and a `param_dtype`, which stays "float32": the zoo keeps parameters, batch-norm statistics and
so the optimizer state in float32, and every model returns float32 logits, so the losses run in
float32 (`kd_jax.losses` also computes softmaxes, KLs and Gram matrices in float32 from bfloat16
features). Over five KD + SP steps on digits, the bfloat16 losses stay within 1% of the float32
ones and the parameter update within 5% (tests/train/test_mixed_precision.py).

  python -m experiments.main --config=experiments/configs/digits.py \\
      --config.teacher.dtype=bfloat16 --config.student.dtype=bfloat16
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32",)


def check(cfg, who: str) -> None:
  """Raises ValueError for an unknown `cfg.dtype` or a `cfg.param_dtype` other than float32."""
  dtype = str(cfg.get("dtype", "float32") or "float32")
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"{who}.dtype={dtype!r}; expected one of {COMPUTE_DTYPES}.")
  param_dtype = str(cfg.get("param_dtype", "float32") or "float32")
  if param_dtype not in PARAM_DTYPES:
    raise ValueError(f"{who}.param_dtype={param_dtype!r}: the zoo models keep their parameters "
                     "(and so the optimizer state) in float32; set only the compute dtype, "
                     f"{who}.dtype.")


def model_options(cfg) -> dict[str, Any]:
  """`cfg.options` plus `dtype=` (a numpy dtype) when `cfg.dtype` is not float32, for
  `kd_jax.models.create` / `teachers.restore_teacher`."""
  options = dict(cfg.get("options", {}) or {})
  dtype = str(cfg.get("dtype", "float32") or "float32")
  if dtype != "float32":
    options["dtype"] = jnp.dtype(dtype)
  return options


def describe(cfg) -> dict[str, Any]:
  """`model_options` as JSON (the dtype by name), for a run's `run.json`."""
  return {k: (str(v) if k == "dtype" else v) for k, v in model_options(cfg).items()}
