"""The XLA options kd_jax compiles its steps with, and `jit`, which applies them.

The one idea: on CPU, jaxlib 0.10's XLA hands every convolution to YNNPACK by default
(`xla_cpu_experimental_ynn_fusion_type` contains `individual_convolution`). YNNPACK runs a
convolution with 64 or fewer output channels on a single thread, so on a 2-core AVX2 machine a
CIFAR stage-1 3x3 convolution (batch 64, 32x32, 64 -> 64) takes 63 ms at 76 GFLOP/s, where
XLA's own (Eigen) convolution takes 34 ms at 141 GFLOP/s on both cores; the filter gradients
gain even more (measurements: docs/performance.md, "Compile options"). `CPU_COMPILER_OPTIONS`
keeps YNNPACK for what it does well (matrix products, reductions) and gives convolutions back to
XLA.
The options and their check live in `kd_jax.backends.cpu` with the library's other XLA:CPU-only
code; a jaxlib that rejects them (a renamed experimental flag or value) gets no options and one
warning, not a failing compilation at every step.

They are passed per computation (`jax.jit(..., compiler_options=...)`), never through the
process-wide `XLA_FLAGS`, so importing kd_jax changes nothing in the user's own programs. The
library's train loop, data-parallel mapping, evaluation and teacher forward use them; to get the
same in your own jitted step:

    step = kd_jax.compile_options.jit(kd_jax.train.make_train_step(...), donate_argnums=(0,))

or, for everything in the process (set before JAX starts):

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution

On GPU and TPU the options are empty: nothing changes there.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from kd_jax.backends import cpu as _cpu
from kd_jax.backends.cpu import CPU_COMPILER_OPTIONS

__all__ = ["CPU_COMPILER_OPTIONS", "compiler_options", "jit"]


def compiler_options(platform: str | None = None) -> dict[str, str]:
  """The options for `platform` ("cpu", "gpu", "tpu"; default: JAX's default backend).

  On CPU `CPU_COMPILER_OPTIONS` if this jaxlib accepts them (checked once, see
  `kd_jax.backends.cpu.compiler_options`), else `{}` with a warning; `{}` elsewhere. Returns a
  fresh dict.
  """
  platform = platform or jax.default_backend()
  return _cpu.compiler_options() if platform == "cpu" else {}


def jit(fun: Callable[..., Any], **jit_kwargs) -> Callable[..., Any]:
  """`jax.jit(fun, **jit_kwargs)` with `compiler_options()` added.

  Options the caller passes in `compiler_options=` win over the library's.
  """
  options = compiler_options()
  options.update(jit_kwargs.pop("compiler_options", None) or {})
  return jax.jit(fun, compiler_options=options or None, **jit_kwargs)
