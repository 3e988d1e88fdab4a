"""Kill-and-restart machinery of the resume tests: run a module in a child Python that SIGKILLs
itself at a chosen point, then restart it and compare with an uninterrupted run.

    proc = _kill.run("experiments.main", "--workdir=W", kill=_kill.at_step("students", 7))
    _kill.assert_killed(proc)          # exit status -9: the kill really landed mid-run
    proc = _kill.run("experiments.main", "--workdir=W")   # the restart

The child is this file run as a script (`python tests/_kill.py MODULE ARGS...`): it reads the
kill point from the environment variable `KD_JAX_TEST_KILL`, installs the hook by monkeypatching,
then runs MODULE as `__main__` (`runpy`). Kill points (strings, built by the functions below):

- `fit:<name>:<N>`: in `kd_jax.train.loop.fit` of the run named `name`, once the state reaches
  step N (after that step was dispatched, before anything is saved for it);
- `call:<module>:<qualname>:<N>[:after][@<module>:<qualname>:<K>]`: at the N-th call of that
  function or method, before it runs (or right after it returns, with `:after`); with `@...`,
  counting only the calls made during the K-th call of the second function;
- `save:<N>`: inside Orbax's N-th atomic save of this process (a train checkpoint or a teacher),
  after its files are written and before the final rename of its temporary directory
  (`AtomicRenameTemporaryPath.finalize`).
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import signal
import subprocess
import sys

ENV = "KD_JAX_TEST_KILL"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_SUFFIX = ".orbax-checkpoint-tmp"
ORBAX_FINALIZE = "orbax.checkpoint._src.path.atomicity:AtomicRenameTemporaryPath.finalize"


def at_step(name: str, step: int) -> str:
  """Kill once the `fit` run named `name` reaches `step`."""
  return f"fit:{name}:{int(step)}"


def at_call(target: str, n: int = 1, *, after: bool = False, within: str | None = None,
            within_call: int = 1) -> str:
  """Kill at the `n`-th call of `target` ("module:Qual.name"), before it runs or after; with
  `within` ("module:Qual.name"), the `n`-th call made during the `within_call`-th call of that
  function (e.g. the 3rd batch of the 2nd distillation)."""
  return (f"call:{target}:{int(n)}" + (":after" if after else "") +
          (f"@{within}:{int(within_call)}" if within else ""))


def in_save(n: int) -> str:
  """Kill inside Orbax's `n`-th save, before the rename that makes it final."""
  return f"save:{int(n)}"


def run(module: str, *args: str, kill: str | None = None, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `python -m module args...` through this file (with the kill point `kill`, or none)."""
  full = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  full["PYTHONPATH"] = os.pathsep.join([ROOT, full.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  full.pop(ENV, None)
  if kill:
    full[ENV] = kill
  return subprocess.run([sys.executable, os.path.abspath(__file__), module, *args], cwd=ROOT,
                        env=full, capture_output=True, text=True, timeout=timeout)


def assert_killed(proc: subprocess.CompletedProcess) -> None:
  """The child died of SIGKILL (not a clean exit or an error before the kill point)."""
  assert proc.returncode == -signal.SIGKILL, (
      f"expected the child to be killed (-9), got {proc.returncode}: {proc.stderr[-3000:]}")


def assert_ok(proc: subprocess.CompletedProcess) -> None:
  assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-3000:]}"


def _die():
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _resolve(target: str):
  module, qualname = target.split(":")
  owner = importlib.import_module(module)
  parts = qualname.split(".")
  for p in parts[:-1]:
    owner = getattr(owner, p)
  return owner, parts[-1]


def _patch_call(target: str, n: int, after: bool, within: str | None = None) -> None:
  active = [within is None]
  if within is not None:  # count only during the k-th call of `within`
    outer_target, k = within.rsplit(":", 1)
    o_owner, o_attr = _resolve(outer_target)
    o_original, o_calls = getattr(o_owner, o_attr), [0]

    @functools.wraps(o_original)
    def outer(*args, **kwargs):
      o_calls[0] += 1
      active[0] = o_calls[0] == int(k)
      try:
        return o_original(*args, **kwargs)
      finally:
        active[0] = False

    setattr(o_owner, o_attr, outer)
  owner, attr = _resolve(target)
  original = getattr(owner, attr)
  calls = [0]

  @functools.wraps(original)
  def wrapper(*args, **kwargs):
    if not active[0]:
      return original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == n and not after:
      _die()
    out = original(*args, **kwargs)
    if calls[0] == n and after:
      _die()
    return out

  setattr(owner, attr, wrapper)


def _patch_save(n: int) -> None:
  """Counts only the outer renames: Orbax finalizes each item directory ("default") inside the
  step's temporary directory first, then the step's directory itself."""
  owner, attr = _resolve(ORBAX_FINALIZE)
  original = getattr(owner, attr)
  calls = [0]

  @functools.wraps(original)
  def finalize(self, *args, **kwargs):
    if TMP_SUFFIX not in str(getattr(self, "_final_path", "")).rsplit("/", 1)[0]:
      calls[0] += 1
      if calls[0] == n:
        _die()
    return original(self, *args, **kwargs)

  setattr(owner, attr, finalize)


def _patch_fit(name: str, step: int) -> None:
  from kd_jax.train import loop  # pylint: disable=g-import-not-at-top
  original = loop.fit

  def hook(s, state, metrics):
    del state, metrics
    if s >= step:
      _die()

  @functools.wraps(original)
  def fit(*args, **kwargs):
    if kwargs.get("name", "train") == name:
      kwargs["hooks"] = [*kwargs.get("hooks", ()), hook]
    return original(*args, **kwargs)

  loop.fit = fit


def install(spec: str | None) -> None:
  """Installs the kill hook described by `spec` (see the module docstring)."""
  if not spec:
    return
  kind, _, rest = spec.partition(":")
  if kind == "fit":
    name, step = rest.rsplit(":", 1)
    _patch_fit(name, int(step))
  elif kind == "save":
    _patch_save(int(rest))
  elif kind == "call":
    rest, _, within = rest.partition("@")
    parts = rest.split(":")
    after = parts[-1] == "after"
    if after:
      parts = parts[:-1]
    _patch_call(f"{parts[0]}:{parts[1]}", int(parts[2]), after, within or None)
  else:
    raise ValueError(f"{ENV}: unknown kill point {spec!r}")


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  if sys.path[1] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[1]  # tests/ itself is not a package root
  install(os.environ.get(ENV))
  module = sys.argv[1]
  sys.argv = [module, *sys.argv[2:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
