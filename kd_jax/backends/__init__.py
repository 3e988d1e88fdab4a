"""Platform-specific code paths: the one place where kd_jax departs from plain XLA ops.

`kd_jax.backends.cpu` holds every XLA:CPU-only path of the library: the polyphase gradient of
strided convolutions, the GEMV row sum of the losses, the ReLU form and the XLA:CPU compiler
options. The choice is made by the platform a program is lowered for (`jax.lax.platform_dependent`
inside a traced function, `jax.default_backend()` for compiler options), so a program lowered for
GPU or TPU, also from a CPU host (`jax.export`), contains XLA's own operations only. Values are
the same on every platform up to the order of floating-point sums.
"""
