"""Two processes on localhost, 4 CPU devices each, against one process over 8 devices.

The workers (tests/multihost_worker.py) run the library's multi-host path: `jax.distributed`
over 127.0.0.1, teacher and student restored with Orbax in both processes, each host reading
its own block of every global batch through the Grain pipeline, the data-parallel KD step on a
zoo model with batch norm (cnn_digits), an Orbax checkpoint written by both processes, the run
stopped and resumed from it, then an evaluation over both hosts. The final state must equal (float tolerance: gloo sums in another
order) a single-process run over this process's 8 simulated devices on the same global batches,
and the global batches the hosts assembled must be exactly the single-process batches: no row
read by both hosts, none missing.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from kd_jax import checkpoint
from kd_jax import models
from kd_jax import parallel
from kd_jax import teachers
from tests import multihost_worker as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # both workers together; about 30 s on an idle 2-core machine
TOL = 1e-5


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_workers(workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  port = _free_port()
  procs = []
  for i in range(W.NUM_PROCESSES):
    log = open(os.path.join(workdir, f"host{i}.log"), "w")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "tests.multihost_worker", f"--port={port}", f"--process_id={i}",
         f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    log.close()
  return procs


def _wait(procs, workdir, deadline):
  """Waits for every worker; on a failure or at the deadline kills the others (always)."""
  try:
    while True:
      codes = [p.poll() for p in procs]
      if all(c == 0 for c in codes):
        return
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      late = time.monotonic() > deadline
      if failed or late:
        logs = "\n".join(f"--- host{i} ---\n" + open(os.path.join(workdir, f"host{i}.log")).read()
                         [-3000:] for i in range(len(procs)))
        what = f"host(s) {failed} failed" if failed else f"timed out after {TIMEOUT_S} s"
        pytest.fail(f"multi-host workers: {what}\n{logs}")
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def check_global_batches(local_index, global_index, expected):
  """Every step's global batch is the expected one, made of the hosts' disjoint blocks.

  local_index: per host [steps, rows per host]; global_index: [steps, global batch] as the hosts
  assembled it; expected: [steps, global batch] of a single-process run.
  """
  for s, want in enumerate(expected):
    got = np.asarray(global_index[s])
    assert got.shape == want.shape, f"step {s}: global batch of {got.shape} rows, want {want.shape}"
    assert len(set(got.tolist())) == got.size, f"step {s}: rows read by two hosts: {got}"
    np.testing.assert_array_equal(got, want, err_msg=f"step {s}")
    blocks = [np.asarray(host[s]) for host in local_index]
    assert not set(blocks[0].tolist()) & set(blocks[1].tolist()), f"step {s}: overlapping blocks"
    np.testing.assert_array_equal(np.concatenate(blocks), want, err_msg=f"step {s}: blocks")


def _single_process(run, state, teacher_vars, mesh, batches):
  state, teacher_vars = parallel.replicate((state, teacher_vars), mesh)
  for _, b in zip(range(W.STEPS), batches):
    state, metrics = run(state, parallel.shard_batch(b, mesh), teacher_vars)
  return state, metrics


def _flat(state):
  return checkpoint.flat_paths(checkpoint.to_saveable(jax.device_get(state)))


def _expected_indices():
  return np.stack([b["index"] for _, b in zip(range(W.STEPS), W.train_batches(0))])


def test_two_hosts_equal_one_host_over_eight_devices(tmp_path):
  workdir = str(tmp_path)
  for path, (name, options), seed in ((tmp_path / "teacher", W.TEACHER, 1),
                                      (tmp_path / "student_init", W.STUDENT, 2)):
    # rbg keys: the initialisers compile in a fraction of threefry's time.
    model = nnx.jit(lambda: models.create(
        name, num_classes=10, rngs=nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg")),
        **options))()
    teachers.save_teacher(path, model)
  procs = _start_workers(workdir)
  try:
    # The reference, computed while the workers run: one process, 8 devices, full batches.
    state, step, teacher_vars = W.make_state_and_step(str(tmp_path / "teacher"),
                                                      str(tmp_path / "student_init"))
    mesh = parallel.make_mesh(W.NUM_PROCESSES * W.DEVICES_PER_PROCESS)
    run = parallel.data_parallel(step, mesh)
    ref_state, ref_metrics = _single_process(run, state, teacher_vars, mesh,
                                             W.train_batches(0))
    ref_eval = W.evaluate_state(ref_state, mesh)
    ref = _flat(ref_state)
    # Hosts that both read block 0 would train on other batches: far outside the tolerance.
    overlap = ({k: np.concatenate([v, v]) for k, v in b.items()}
               for b in W.train_batches(0, num_shards=2, shard_index=0))
    wrong = _flat(_single_process(run, state, teacher_vars, mesh, overlap)[0])
  finally:
    _wait(procs, workdir, time.monotonic() + TIMEOUT_S)

  hosts = [np.load(tmp_path / f"host{i}.npz") for i in range(W.NUM_PROCESSES)]
  check_global_batches([h["local_index"] for h in hosts], hosts[0]["global_index"],
                       _expected_indices())
  np.testing.assert_array_equal(hosts[1]["global_index"], hosts[0]["global_index"])
  assert {k[len("state/"):] for k in hosts[0].files if k.startswith("state/")} == set(ref)
  for k, want in ref.items():
    for h in hosts:
      np.testing.assert_allclose(h[f"state/{k}"], np.asarray(want), rtol=TOL, atol=TOL,
                                 err_msg=k)
  assert int(hosts[0]["state/step"]) == W.STEPS
  for k in ("loss", "loss/ce", "loss/kd", "accuracy"):
    np.testing.assert_allclose(hosts[0][f"metric/{k}"], ref_metrics[k], rtol=TOL, err_msg=k)
  for h in hosts:  # every example evaluated once, over both hosts' devices
    assert int(h["eval/count"]) == W.NUM_EXAMPLES
    np.testing.assert_allclose(h["eval/accuracy"], ref_eval["accuracy"], rtol=TOL)
    np.testing.assert_allclose(h["eval/loss"], ref_eval["loss"], rtol=TOL)
  moved = max(float(np.max(np.abs(np.asarray(ref[k]) - np.asarray(wrong[k])))) for k in ref)
  assert moved > 100 * TOL


def test_the_batch_check_catches_overlapping_and_dropped_hosts():
  expected = _expected_indices()
  blocks = [np.stack([b["index"] for _, b in zip(range(W.STEPS),
                                                 W.train_batches(0, num_shards=2, shard_index=i))])
            for i in range(2)]
  check_global_batches(blocks, np.concatenate(blocks, axis=1), expected)
  # Both hosts read block 0.
  with pytest.raises(AssertionError, match="two hosts"):
    check_global_batches([blocks[0], blocks[0]], np.concatenate([blocks[0]] * 2, 1), expected)
  # Host 1's rows never reach the global batch.
  with pytest.raises(AssertionError, match="global batch of"):
    check_global_batches(blocks, blocks[0], expected)
