"""kd_jax: knowledge distillation in JAX and Flax."""

__version__ = "0.1.0"
