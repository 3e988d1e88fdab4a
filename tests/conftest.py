"""Test-suite set-up: 8 simulated CPU devices, so multi-device code runs on every test run.

The flag must be set before JAX touches a device; pytest imports this file before any test module.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
