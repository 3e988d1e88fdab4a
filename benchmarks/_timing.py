"""Shared timing helpers for the benchmark scripts: interleaved medians under a shared load.

The one idea: on a machine whose load changes from second to second, two numbers are only
comparable when they were measured under the same load. So every benchmark that compares
contestants (kd_jax vs PyTorch, KD step vs student step) runs them in *rounds*: each round runs
every contestant for a few steps, in alternating order, and the reported number is the median
over all rounds of each contestant's per-step time. Ratios are taken of those medians and, more
robustly, as the median of the per-round ratios.

PyTorch is never imported into a process that runs JAX (both keep spinning thread pools); it
runs in a separate interpreter (`torch_baseline.py --serve`) driven over a JSON-lines pipe by
`TorchWorker`. That interpreter is `$KD_JAX_TORCH_PYTHON` or `--torch-python`; if neither is set
and the current interpreter has torch, it is used.

This module imports neither jax nor torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_ENV = "KD_JAX_TORCH_PYTHON"
NO_TORCH_MESSAGE = (
    "PyTorch baseline skipped: no interpreter with torch. torch is not a dependency of kd_jax; "
    "install it in a separate environment, e.g.\n"
    "    python3 -m venv ~/torchvenv && ~/torchvenv/bin/pip install torch numpy\n"
    f"and point the benchmark at it with  {TORCH_ENV}=~/torchvenv/bin/python  "
    "(or --torch-python).")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def loadavg() -> str:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def machine_line() -> str:
  """One line naming the machine and its current load, for the head of every benchmark."""
  return (f"machine: {cpu_model()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load average {loadavg()}")


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs)) if xs else float("nan")


class Samples(list):
  """Wall-clock seconds per step, with `.cpu`: this process's CPU seconds per step (all threads).

  Under a shared load the wall time measures the CPU share a process gets as much as its own
  work; CPU time is far less sensitive to the load (though spin-waiting thread pools count in it).
  """

  def __init__(self, wall=(), cpu=()):
    super().__init__(wall)
    self.cpu = list(cpu)


def time_steps(step: Callable[[], None], n: int) -> Samples:
  """Wall and CPU seconds of each of `n` calls of `step` (which must block until done)."""
  out = Samples()
  for _ in range(n):
    c0, t0 = time.process_time(), time.perf_counter()
    step()
    out.append(time.perf_counter() - t0)
    out.cpu.append(time.process_time() - c0)
  return out


@dataclasses.dataclass
class Contestant:
  """A named thing to time: `run(n)` performs n steps and returns their seconds."""
  name: str
  run: Callable[[int], list[float]]
  samples: list[float] = dataclasses.field(default_factory=list)
  round_medians: list[float] = dataclasses.field(default_factory=list)
  cpu_samples: list[float] = dataclasses.field(default_factory=list)
  cpu_round_medians: list[float] = dataclasses.field(default_factory=list)

  @property
  def median_s(self) -> float:
    return median(self.samples)

  @property
  def cpu_median_s(self) -> float:
    return median(self.cpu_samples)


def interleave(contestants: Sequence[Contestant], rounds: int, steps: int, warmup: int = 2,
               verbose: bool = True) -> None:
  """Runs `rounds` rounds of `steps` steps per contestant; odd rounds in reverse order.

  Every contestant first runs `warmup` untimed steps (compilation, allocator warm-up). Samples
  accumulate in each contestant's `samples`; `round_medians` keeps one median per round so that
  per-round ratios can be formed (see `paired_ratio`).
  """
  for c in contestants:
    if warmup:
      c.run(warmup)
  for r in range(rounds):
    order = list(contestants) if r % 2 == 0 else list(reversed(contestants))
    for c in order:
      ts = c.run(steps)
      c.samples.extend(ts)
      c.round_medians.append(median(ts))
      cpu = getattr(ts, "cpu", [])
      c.cpu_samples.extend(cpu)
      c.cpu_round_medians.append(median(cpu))
    if verbose:
      parts = ", ".join(f"{c.name} {1e3 * c.round_medians[-1]:.0f} ms" for c in contestants)
      print(f"  round {r + 1}/{rounds} (load {loadavg()}): {parts}", flush=True)


def paired_ratio(num: Contestant, den: Contestant, cpu: bool = False) -> float:
  """Median over rounds of num_time / den_time (both measured in the same round).

  With `cpu=True` the ratio of CPU times per step instead of wall times.
  """
  a_s, b_s = ((num.cpu_round_medians, den.cpu_round_medians) if cpu
              else (num.round_medians, den.round_medians))
  return median([a / b for a, b in zip(a_s, b_s)])


def find_torch_python(explicit: str | None = None) -> str | None:
  """The interpreter that runs the PyTorch side, or None when there is none."""
  cand = explicit or os.environ.get(TORCH_ENV)
  if cand:
    cand = os.path.expanduser(cand)
    return cand if os.path.exists(cand) else None
  if importlib.util.find_spec("torch") is not None:
    return sys.executable
  return None


class TorchWorker:
  """A `torch_baseline.py --serve` subprocess that times PyTorch steps on request.

  Protocol (JSON lines): {"cmd": "setup", ...} -> {"ok": true, "info": ...};
  {"cmd": "run", "n": k} -> {"times": [...]}; {"cmd": "quit"}.
  """

  def __init__(self, python: str, threads: int | None = None):
    cmd = [python, os.path.join(HERE, "torch_baseline.py"), "--serve"]
    if threads:
      cmd += ["--threads", str(threads)]
    self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  bufsize=1)
    self.info = self._call({"cmd": "hello"})["info"]

  def _call(self, msg: dict) -> dict:
    self._proc.stdin.write(json.dumps(msg) + "\n")
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"torch worker died (exit code {self._proc.poll()})")
    reply = json.loads(line)
    if "error" in reply:
      raise RuntimeError(f"torch worker: {reply['error']}")
    return reply

  def setup(self, **kwargs) -> dict:
    return self._call({"cmd": "setup", **kwargs})

  def run(self, n: int) -> Samples:
    reply = self._call({"cmd": "run", "n": int(n)})
    return Samples(reply["times"], reply.get("cpu", ()))

  def close(self):
    if self._proc.poll() is None:
      try:
        self._proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self._proc.stdin.flush()
        self._proc.wait(timeout=10)
      except (OSError, subprocess.TimeoutExpired):
        self._proc.kill()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
