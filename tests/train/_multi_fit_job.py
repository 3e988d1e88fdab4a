"""A multi-student `fit` run for the kill-and-restart tests (tests/train/test_kill_resume.py).

    python tests/_kill.py tests.train._multi_fit_job WORKDIR

Two methods x two seeds of a toy student against a toy teacher, one program over 2 simulated
CPU devices (`shard_map`), checkpoints every 3 of 10 steps. Writes `WORKDIR/final.npz` (every
leaf of the final stacked states, by key path) when the run ends.
"""

import os
import sys

import jax
import numpy as np
import optax
from flax import nnx

from kd_jax import data
from kd_jax import parallel
from kd_jax.train import loop
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_multi_student_step, stack_states
from tests.train._toy import ToyNet, toy_batch

METHODS = {"kd": "ce:0.1,kd:0.9(temperature=2)", "sp": "ce:1,sp:30"}
SEEDS, STEPS, EVERY = (0, 1), 10, 3


def leaves(tree) -> dict[str, np.ndarray]:
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out[jax.tree_util.keystr(path)] = np.asarray(x)
  return out


def main(workdir: str) -> None:
  arrays = toy_batch(48, seed=3)
  teacher = ToyNet(width=8, batch_norm=True, rngs=nnx.Rngs(7))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  states = {m: stack_states([TrainState.create(ToyNet(width=4, batch_norm=True,
                                                      rngs=nnx.Rngs(s)),
                                               optax.sgd(0.1, momentum=0.9),
                                               rng=jax.random.key(s)) for s in SEEDS])
            for m in METHODS}
  step = make_multi_student_step(METHODS, teacher_graphdef=t_graph)
  final, _ = loop.fit(
      states, step, lambda s: data.batches(arrays, batch_size=8, seed=0, start_step=s),
      num_steps=STEPS, teacher_variables={"params": t_params, "batch_stats": t_rest},
      mesh=parallel.make_mesh(2), workdir=workdir, name="students", checkpoint_every=EVERY,
      log_every=1, progress=True, run_info={"methods": METHODS, "steps": STEPS})
  np.savez(os.path.join(workdir, "final.npz"), **leaves(final))


if __name__ == "__main__":
  # Only in the child process: the test that imports this module for its constants runs in a
  # process whose JAX backends (8 simulated devices, tests/conftest.py) may already be up.
  jax.config.update("jax_num_cpu_devices", 2)
  main(sys.argv[1])
