"""One host of the two-process run of tests/test_multihost.py (run as `python -m`).

  python -m tests.multihost_worker --port=P --process_id=I --workdir=W

Process I of 2 on localhost, with 4 CPU devices of its own: `jax.distributed.initialize` against
the coordinator at 127.0.0.1:P, then the library's multi-host path as in docs/training.md:
teacher and initial student restored with Orbax by both processes, each host reading only its
block of every global batch (`kd_jax.data.batches(..., num_shards=2, shard_index=I)`),
`kd_jax.train.fit` over the 8-device mesh (host blocks assembled with
`jax.make_array_from_process_local_data`), stopped after STOP steps with a checkpoint, and
resumed from that checkpoint to STEPS, then evaluated over the mesh. Writes `W/host<I>.npz`:
the final state's arrays, the last metrics, the evaluation, and per step the host's own example indices and the global batch's indices
gathered from both hosts.
"""

from __future__ import annotations

import argparse
import os

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
NUM_EXAMPLES = 48            # 3 steps per epoch: the run crosses an epoch boundary
GLOBAL_BATCH = 16            # 8 rows per host, 2 per device
STEPS, STOP = 4, 2
LOSS = "ce:0.1,kd:0.9"
TEACHER = ("cnn_digits", {"width": 8, "in_channels": 3})
STUDENT = ("cnn_digits", {"width": 4, "in_channels": 3})


def dataset():
  """The examples every host can read (a random-access source): images, labels, indices."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(NUM_EXAMPLES, 8, 8, 3)).astype(np.float32),
          "label": rng.integers(0, 10, size=NUM_EXAMPLES).astype(np.int32),
          "index": np.arange(NUM_EXAMPLES, dtype=np.int32)}


def train_batches(start_step: int, *, num_shards: int = 1, shard_index: int = 0):
  from kd_jax import data  # pylint: disable=g-import-not-at-top
  return data.batches(dataset(), batch_size=GLOBAL_BATCH, seed=0, start_step=start_step,
                      num_shards=num_shards, shard_index=shard_index, prefetch=0)


def make_state_and_step(teacher_path: str, student_path: str):
  """(initial TrainState, per-device step, teacher variables) from the two checkpoints."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from kd_jax import teachers  # pylint: disable=g-import-not-at-top
  from kd_jax.train.state import TrainState, sgd  # pylint: disable=g-import-not-at-top
  from kd_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  teacher = teachers.restore_teacher(teacher_path, TEACHER[0], num_classes=10, **TEACHER[1])
  init = teachers.restore_teacher(student_path, STUDENT[0], num_classes=10, **STUDENT[1])
  student = nnx.merge(init.graphdef, init.variables["params"], init.variables["batch_stats"])
  state = TrainState.create(student, sgd(0.1, momentum=0.9, weight_decay=5e-4),
                            rng=jax.random.key(0))
  return state, make_train_step(LOSS, teacher_graphdef=teacher.graphdef), teacher.variables


def evaluate_state(state, mesh):
  """Accuracy and loss of `state` over every example (each host reads every batch and keeps its
  block of rows, `kd_jax.parallel.host_block`)."""
  from kd_jax import data  # pylint: disable=g-import-not-at-top
  from kd_jax.train.evaluate import evaluate, make_eval_step  # pylint: disable=g-import-not-at-top
  from kd_jax import parallel  # pylint: disable=g-import-not-at-top
  batches = data.eval_batches(dataset(), batch_size=GLOBAL_BATCH, prefetch=0)
  return evaluate(make_eval_step(state.graphdef, mesh),
                  parallel.replicate(state.variables(), mesh), batches, mesh=mesh)


def _loopback_collectives():
  """CPU collectives (gloo) over 127.0.0.1 only, whatever the host name resolves to."""
  from jax._src import distributed, xla_bridge  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top

  def factory():
    collectives = _jax.make_gloo_tcp_collectives(
        distributed_client=distributed.global_state.client, hostname="127.0.0.1")
    return xla_bridge.make_cpu_client(collectives=collectives)

  xla_bridge.register_backend_factory("cpu", factory, priority=0, fail_quietly=False)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()

  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
  _loopback_collectives()
  from kd_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(coordinator_address=f"127.0.0.1:{args.port}",
                                  num_processes=NUM_PROCESSES, process_id=args.process_id,
                                  initialization_timeout=60)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from kd_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from kd_jax.train import loop  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == NUM_PROCESSES and jax.process_index() == args.process_id
  assert jax.local_device_count() == DEVICES_PER_PROCESS
  assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS
  state, step, teacher_vars = make_state_and_step(os.path.join(args.workdir, "teacher"),
                                                  os.path.join(args.workdir, "student_init"))
  mesh = parallel.make_mesh()
  seen = {}  # step -> this host's example indices
  starts = []  # the first step of every data stream fit asked for

  def host_batches(start):
    starts.append(start)
    shards = dict(num_shards=jax.process_count(), shard_index=jax.process_index())
    for s, b in enumerate(train_batches(start, **shards), start=start):
      seen[s] = b["index"]
      yield b

  run = dict(num_steps=STEPS, teacher_variables=teacher_vars, mesh=mesh,
             workdir=os.path.join(args.workdir, "run"), checkpoint_every=STOP, log_every=1,
             progress=False)
  try:
    loop.fit(state, step, host_batches, hooks=[loop.stop_after(STOP)], **run)
    raise AssertionError("stop_after did not stop the first run")
  except loop.StopTraining:
    pass
  final, history = loop.fit(state, step, host_batches, **run)  # resumes at step STOP
  assert starts == [0, STOP], starts  # the second run restored the checkpoint of step STOP

  gathered = []
  for s in range(STEPS):
    global_index = parallel.shard_batch({"index": seen[s]}, mesh)["index"]
    gathered.append(np.asarray(multihost_utils.process_allgather(global_index, tiled=True)))
  arrays = {f"state/{k}": np.asarray(v)
            for k, v in checkpoint.flat_paths(checkpoint.to_saveable(final)).items()}
  ev = evaluate_state(final, mesh)
  last = [h for h in history if h["split"] == "train"][-1]
  np.savez(os.path.join(args.workdir, f"host{args.process_id}.npz"), **arrays,
           **{f"metric/{k}": v for k, v in last.items() if k not in ("split", "steps_per_sec")},
           **{f"eval/{k}": v for k, v in ev.items()},
           local_index=np.stack([seen[s] for s in range(STEPS)]),
           global_index=np.stack(gathered))


if __name__ == "__main__":
  main()
