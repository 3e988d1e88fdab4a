"""Strided convolution whose CPU gradients skip the zeros autodiff inserts (a re-export).

The implementation, the polyphase formula and its measurements are in `kd_jax.backends.cpu`
(`conv_general_dilated`), the module of every XLA:CPU-only code path; off CPU it is XLA's own
convolution and gradients. It is a `jax.custom_jvp`, so forward mode (`jax.jvp`), reverse mode
and Hessian-vector products all work through it. tests/models/test_strided_conv.py checks it
against autodiff of `jax.lax.conv_general_dilated` in float64.
"""

from __future__ import annotations

from kd_jax.backends.cpu import conv_general_dilated

__all__ = ["conv_general_dilated"]
