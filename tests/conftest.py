"""Test-suite set-up: 8 simulated CPU devices, so multi-device code runs on every test run.

The flag must be set before JAX touches a device; pytest imports this file before any test module.
A persistent compilation cache in a per-run temporary folder lets the subprocess tests (the main
job, the notebooks) reuse programs the in-process tests already compiled.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="kd_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
