"""A run's working directory: one run at a time, one configuration, movable.

`open_workdir(path, config, overwrite=...)` is what the entry points call first:

- a lock file, `<workdir>/kd_jax.lock`, holds the owner's host and PID; a second run started in
  the same workdir while the first is alive is refused, and a lock left by a process that is gone
  (killed, crashed) is detected as stale and taken over with a warning;
- the configuration is recorded in `<workdir>/config.json`; a later run with another
  configuration (the teacher's included) is refused with the differing keys named, unless
  `overwrite=True`, which empties the workdir first. Keys that only change how a run is executed
  (`RUNTIME_KEYS`: progress bars, logging, device counts...) may change between runs;
- paths inside the workdir are stored relative to it (`relative_path`), so a workdir can be
  moved or copied and resumed there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

LOCK_FILE = "kd_jax.lock"
CONFIG_FILE = "config.json"
# Config keys that do not change what a run computes (they may differ on resume).
RUNTIME_KEYS = frozenset({"progress", "log_every", "checkpoint_every", "num_devices",
                          "parallel", "distributed", "eval_batch_size", "nonfinite"})


class WorkdirError(ValueError):
  """A workdir in use by another run, or holding another configuration."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read_lock(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # vanished, or torn by a kill while it was written: stale


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[str]:
  """Holds `<workdir>/kd_jax.lock` for the duration of the `with` block.

  Raises:
    WorkdirError: another live process (same host) holds the lock, or a lock from another host
      exists (it cannot be checked from here), naming the owner.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      owner = _read_lock(path)
      if owner is not None and owner.get("host") != me["host"]:
        raise WorkdirError(
            f"workdir {workdir} is locked by process {owner.get('pid')} on host "
            f"{owner.get('host')!r} ({path}); if that run is gone, delete the lock file.")
      if owner is not None and owner.get("pid") != me["pid"] and _alive(int(owner["pid"])):
        since = time.strftime("%Y-%m-%d %H:%M:%S",
                              time.localtime(float(owner.get("started", 0))))
        raise WorkdirError(
            f"workdir {workdir} is in use by a running process (PID {owner['pid']}, since "
            f"{since}); refusing a second concurrent run in it (use another --workdir).")
      warnings.warn(f"workdir {workdir}: removing the stale lock of process "
                    f"{(owner or {}).get('pid', '?')}, which is no longer running.",
                    stacklevel=3)
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    break
  else:
    raise WorkdirError(f"workdir {workdir}: could not take the lock {path}.")
  try:
    yield path
  finally:
    owner = _read_lock(path)
    if owner is not None and owner.get("pid") == me["pid"]:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_dict(config) -> dict[str, Any]:
  """A JSON-able plain dict of an `ml_collections.ConfigDict` (or mapping), tuples as lists."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(tree, default=str))


def check_config(workdir: str, config, *, overwrite: bool = False) -> bool:
  """Records `config` in `<workdir>/config.json`, or compares it with the recorded one.

  Returns:
    True when the workdir already held a run of this configuration (it is resumed).

  Raises:
    WorkdirError: the recorded configuration differs (naming the keys and both values) and
      `overwrite` is False.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  now = config_dict(config)
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except ValueError as e:
      raise WorkdirError(f"{path} is not valid JSON ({e}); pass --overwrite to start afresh "
                         "in this workdir.") from None
    a, b = _flat(old), _flat(now)
    diff = sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and k.split(".")[0] not in RUNTIME_KEYS)
    if not diff:
      return True
    if not overwrite:
      shown = "; ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
                        for k in diff[:6])
      raise WorkdirError(
          f"workdir {workdir} holds a run of another configuration ({shown}"
          f"{' ...' if len(diff) > 6 else ''}); use another --workdir, or pass --overwrite to "
          "delete that run and start afresh here.")
    clear(workdir)
  elif overwrite and any(e != LOCK_FILE for e in os.listdir(workdir)):
    # Never empty a directory that kd_jax did not record as its own.
    raise WorkdirError(f"--overwrite: {workdir} holds files but no {CONFIG_FILE}, so it is not "
                       "recognisably a kd_jax workdir; delete what you want gone by hand.")
  _write_json(path, now)
  return False


def clear(workdir: str) -> None:
  """Deletes everything in `workdir` but its lock (what `--overwrite` does)."""
  for entry in os.listdir(workdir):
    if entry == LOCK_FILE:
      continue
    full = os.path.join(workdir, entry)
    if os.path.isdir(full) and not os.path.islink(full):
      shutil.rmtree(full)
    else:
      os.remove(full)


@contextlib.contextmanager
def open_workdir(workdir: str, config, *, overwrite: bool = False,
                 primary: bool = True) -> Iterator[bool]:
  """Locks `workdir` and checks `config` against it (`lock`, `check_config`); yields whether
  a run of the same configuration is resumed. `primary=False` (other hosts of a multi-host
  run) only waits for nothing and checks nothing: process 0 owns the workdir."""
  if not primary:
    yield os.path.exists(os.path.join(workdir, CONFIG_FILE))
    return
  with lock(workdir):
    yield check_config(workdir, config, overwrite=overwrite)


def relative_path(path: str | None, base: str) -> str | None:
  """`path` relative to `base` when it lies inside it (so a moved workdir still resolves it),
  else `path` unchanged."""
  if path is None:
    return None
  path, base = os.path.abspath(path), os.path.abspath(base)
  if os.path.commonpath([path, base]) == base:
    return os.path.relpath(path, base)
  return path


def _write_json(path: str, value) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)
