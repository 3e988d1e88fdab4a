"""Command-line plumbing shared by the entry points: config checks, one-line errors, --verbose.

Every entry point (`experiments.main`, `.refilled`, `.hetcomp`, `.ptloss_digits`,
`.ptloss_glue`) runs through `run(main, default_config)`:

- before absl parses anything, `check_config_args` loads the `--config` file itself and checks
  every `--config.<key>=<value>` override against it, so a missing config file or an unknown
  key is one line naming the file or the key and the keys allowed there;
- any exception from the run is printed as one line, `error: <message>`, with exit status 1;
  `--verbose` prints the traceback as well;
- result files are written with `write_json` (a temporary file, then `os.replace`), so a
  killed run leaves the previous file or none.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

VERBOSE_HELP = "Print the full traceback of an error (by default errors are one line)."


class UsageError(ValueError):
  """A bad command line (missing config file, unknown config key), reported in one line."""


def _config_arg(argv: Sequence[str]) -> str | None:
  """The value of the last --config flag in `argv`, or None."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      value = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """(key path, original argument) of every --config.<key> override in `argv`."""
  out = []
  for a in argv:
    if a.startswith("--config."):
      key = a[len("--config."):].split("=", 1)[0]
      out.append((key, a))
  return out


def load_config(spec: str):
  """The ConfigDict of a config-file spec "path.py" or "path.py:arg" (what `--config` takes)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    known = sorted(f for f in os.listdir(here) if f.endswith(".py") and f != "__init__.py")
    raise UsageError(f"--config file {path!r} does not exist (relative to {os.getcwd()}); the "
                     f"configs are experiments/configs/{{{','.join(known)}}}.")
  spec_ = importlib.util.spec_from_file_location("_kd_jax_cli_config", path)
  module = importlib.util.module_from_spec(spec_)
  try:
    spec_.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001 - a config file's own error, named with its file
    raise UsageError(f"--config {spec!r} cannot be loaded: {type(e).__name__}: {e}") from e


def check_config_args(argv: Sequence[str], default_config: str) -> None:
  """Raises `UsageError` for a missing --config file or an unknown --config.<key> override.

  The message names the key and the keys allowed at the level where it is not found.
  """
  overrides = _overrides(argv)
  spec = _config_arg(argv) or default_config
  config = load_config(spec)
  for key, arg in overrides:
    node, seen = config, "config"
    for part in key.split("."):
      keys = _keys(node)
      if keys is None:
        raise UsageError(f"unknown config key 'config.{key}' (in {arg!r}): {seen} is a value, "
                         "not a group of keys.")
      if part not in keys:
        raise UsageError(f"unknown config key 'config.{key}' (in {arg!r}); the keys of {seen} "
                         f"are: {', '.join(sorted(keys))}.")
      node, seen = node[part], f"{seen}.{part}"


def _keys(node):
  if hasattr(node, "keys") and callable(node.keys):
    return list(node.keys())
  return None


def one_line(e: BaseException) -> str:
  """`error: <message>` on one line (the message's lines joined with "; ")."""
  text = str(e) or type(e).__name__
  if isinstance(e, (KeyError,)) or type(e).__name__ in ("AttributeError", "TypeError",
                                                         "ZeroDivisionError", "IndexError"):
    text = f"{type(e).__name__}: {text}"  # a programming error: keep its kind
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return "error: " + "; ".join(lines)


def _verbose(argv: Sequence[str]) -> bool:
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
             for a in argv)


def report(e: BaseException, argv: Sequence[str] | None = None) -> int:
  """Prints `e` as one line on stderr (and its traceback first under --verbose); returns 1."""
  argv = sys.argv if argv is None else argv
  if _verbose(argv):
    traceback.print_exception(e, file=sys.stderr)
  print(one_line(e), file=sys.stderr)
  return 1


def guarded(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int]:
  """`main` with every exception (but SystemExit/KeyboardInterrupt) reported by `report`."""

  def wrapped(argv):
    try:
      return main(argv) or 0
    except Exception as e:  # noqa: BLE001 - the command line reports every failure in one line
      return report(e)

  return wrapped


def precheck(default_config: str, argv: Sequence[str] | None = None) -> None:
  """`check_config_args` on the command line; exits with a one-line error on failure.

  Call it before `config_flags.DEFINE_config_file`: with the default config (no --config
  argument) that definition already applies the overrides and fails with a traceback.
  """
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("--help", "--helpfull", "-h", "--helpshort") for a in argv):
    return
  try:
    check_config_args(argv[1:], default_config)
  except UsageError as e:
    sys.exit(report(e, argv))


def run(main: Callable[[list[str]], int | None], default_config: str,
        argv: Sequence[str] | None = None) -> None:
  """Checks the config arguments, then `absl.app.run(guarded(main))`; exits 1 on an error."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
  precheck(default_config, argv)
  app.run(guarded(main), argv=argv)


def write_json(path: str | os.PathLike, value, *, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> None:
  """Writes `value` as JSON to `path` atomically: to `path.tmp`, then `os.replace`, so a kill
  leaves the previous file or none, never a truncated one. `default` as `json.dump`'s."""
  path = os.fspath(path)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=indent, default=default)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
