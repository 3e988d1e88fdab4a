"""Converts a RepDistiller / mdistiller PyTorch teacher checkpoint into an Orbax kd_jax teacher.

    python -m kd_jax.convert_teacher --pth=ckpt_epoch_240.pth --arch=resnet32x4 \\
        --num_classes=100 --out=teachers/resnet32x4

reads the `.pth` file without torch (`kd_jax.models.torch_file`; the state dict under "model",
as RepDistiller's `train_teacher.py` saves it, or a bare state dict), converts it with
`kd_jax.models.torch_convert`, writes it with `kd_jax.teachers.save_teacher`, restores it with
`kd_jax.teachers.restore_teacher` and compares the restored teacher's logits with the PyTorch
model's on a few random inputs (`--num_inputs`). Nothing is written at `--out` unless the
comparison passes. The PyTorch side is `kd_jax.models.torch_reference` (RepDistiller's
architectures restated) or, with `--torch_model=module:function`, your own constructor, called
as `function(num_classes=...)`; e.g. `--torch_model=models:model_dict.resnet32x4` from a
RepDistiller checkout on `PYTHONPATH` (a dotted path after the colon indexes attributes and
dict entries). The comparison needs torch; `--no-check` converts
without it.

Use the teacher in an experiment with `--config.teacher.checkpoint=<out>` (the config's
`teacher.model` must be `--arch`), e.g.

    python -m experiments.main --config=experiments/configs/cifar100.py:resnet32x4-resnet8x4 \\
        --config.teacher.checkpoint=teachers/resnet32x4
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TORCH_MISSING = (
    "the check against PyTorch needs torch, which kd_jax does not depend on: install it "
    "(`pip install torch --index-url https://download.pytorch.org/whl/cpu`) or pass --no-check "
    "to convert without comparing the logits.")


def convert(state_dict: Mapping[str, Any], arch: str, *, num_classes: int, **options):
  """The kd_jax model `arch` with its variables taken from a RepDistiller `state_dict`.

  `kd_jax.models.torch_convert.model_from_torch_state_dict`; raises ValueError naming any key
  or shape that does not fit `arch` at `num_classes` classes.
  """
  from kd_jax.models import torch_convert  # pylint: disable=g-import-not-at-top
  return torch_convert.model_from_torch_state_dict(arch, state_dict, num_classes=num_classes,
                                                   **options)


def random_inputs(num: int, *, seed: int = 0, size: int = 32) -> np.ndarray:
  """`num` standard-normal NCHW images [num, 3, size, size] (float32), PyTorch's layout."""
  return np.random.default_rng(seed).standard_normal((num, 3, size, size)).astype(np.float32)


def teacher_logits(teacher, x_nchw: np.ndarray) -> np.ndarray:
  """Inference-mode logits of a `FrozenTeacher` for NCHW inputs (transposed to NHWC)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from kd_jax import compile_options  # pylint: disable=g-import-not-at-top

  def apply(v, x):
    model = nnx.merge(teacher.graphdef, v["params"], v["batch_stats"])
    return model(x, train=False)[0]

  return np.asarray(compile_options.jit(apply)(dict(teacher.variables),
                                               np.transpose(x_nchw, (0, 2, 3, 1))))


def torch_module(arch: str, num_classes: int, torch_model: str | None = None):
  """The PyTorch model of `arch`: `torch_reference.build`, or `module:function(num_classes=)`.

  Raises:
    RuntimeError: torch is not installed (`TORCH_MISSING`).
    ValueError: `torch_model` is not `module:function`.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise RuntimeError(TORCH_MISSING) from None
  del torch  # imported only to fail early and clearly
  if not torch_model:
    from kd_jax.models import torch_reference  # pylint: disable=g-import-not-at-top
    if arch not in torch_reference.NAMES:
      raise ValueError(f"no PyTorch reference for {arch!r} (known: "
                       f"{', '.join(torch_reference.NAMES)}); pass --torch_model=module:function")
    return torch_reference.build(arch, num_classes)
  module_name, sep, attr = torch_model.partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"--torch_model must be 'module:function', got {torch_model!r}")
  fn = importlib.import_module(module_name)
  for part in attr.split("."):
    fn = fn[part] if isinstance(fn, Mapping) else getattr(fn, part)
  return fn(num_classes=num_classes)


def torch_logits(module, state_dict: Mapping[str, Any], x_nchw: np.ndarray) -> np.ndarray:
  """Eval-mode logits of the PyTorch `module` loaded (strictly) with `state_dict`."""
  import torch  # pylint: disable=g-import-not-at-top
  sd = dict(state_dict)
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  module.eval()
  with torch.no_grad():
    out = module(torch.from_numpy(x_nchw))
  if isinstance(out, (tuple, list)):
    out = out[0]
  return out.double().numpy()


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
  """How closely two [N, K] logit arrays agree.

  `max_abs_diff = max |ours - theirs|`; `max_logit = max |theirs|`; `scale = max(1, max_logit)`;
  `relative = max_abs_diff / scale`; `top1` = fraction of rows whose argmax is the same.
  """
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  if ours.shape != theirs.shape:
    raise ValueError(f"logit shapes differ: kd_jax {ours.shape}, PyTorch {theirs.shape}")
  diff = float(np.max(np.abs(ours - theirs)))
  max_logit = float(np.max(np.abs(theirs)))
  scale = max(1.0, max_logit)
  return {"max_abs_diff": diff, "max_logit": max_logit, "scale": scale, "relative": diff / scale,
          "top1": float(np.mean(np.argmax(ours, -1) == np.argmax(theirs, -1))),
          "num_inputs": int(ours.shape[0])}


def _parser():
  p = argparse.ArgumentParser(prog="python -m kd_jax.convert_teacher",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--pth", required=True, help="the PyTorch checkpoint (torch.save file)")
  p.add_argument("--arch", required=True, help="kd_jax model name (RepDistiller's model_dict "
                 "name), e.g. resnet32x4")
  p.add_argument("--num_classes", type=int, required=True, help="the teacher's classifier size")
  p.add_argument("--out", required=True, help="the Orbax teacher directory to write")
  p.add_argument("--key", default="model", help="the checkpoint entry holding the state dict "
                 "('' for a bare state dict); default: model")
  p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                 help="compare the restored teacher's logits with PyTorch's (needs torch)")
  p.add_argument("--torch_model", default="", help="module:function building the PyTorch model "
                 "(default: kd_jax.models.torch_reference)")
  p.add_argument("--num_inputs", type=int, default=8, help="random inputs for the check")
  p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted "
                 "max|logit difference| / max(1, max|PyTorch logit|)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return p


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Converts, saves, restores and checks; returns what it printed as a dict."""
  from kd_jax import teachers  # pylint: disable=g-import-not-at-top
  from kd_jax.models import torch_file  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(args.out)
  if os.path.exists(out) and not args.overwrite:
    raise ValueError(f"{out} exists; pass --overwrite to replace it")
  module = torch_module(args.arch, args.num_classes, args.torch_model) if args.check else None
  checkpoint = torch_file.load(args.pth)
  sd = torch_file.state_dict(checkpoint, key=args.key or None)
  info = {"pth": os.path.abspath(args.pth), "arch": args.arch, "num_classes": args.num_classes,
          "tensors": len(sd), "out": out}
  extra = {k: checkpoint[k] for k in ("epoch", "accuracy", "best_acc")
           if isinstance(checkpoint, Mapping) and k in checkpoint}
  extra = {k: float(v) if np.ndim(v) == 0 and not isinstance(v, str) else v
           for k, v in extra.items()}
  described = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in extra.items())
  print(f"read {len(sd)} tensors from {args.pth}" + (f" ({described})" if described else ""))
  model = convert(sd, args.arch, num_classes=args.num_classes)
  staging = out + ".converting"
  if os.path.exists(staging):
    shutil.rmtree(staging)
  teachers.save_teacher(staging, model)
  try:
    teacher = teachers.restore_teacher(staging, args.arch, num_classes=args.num_classes)
    x = random_inputs(args.num_inputs)
    ours = teacher_logits(teacher, x)
    if not np.all(np.isfinite(ours)):
      raise ValueError("the converted teacher gives non-finite logits on random inputs")
    if module is not None:
      agree = agreement(ours, torch_logits(module, sd, x))
      info["agreement"] = agree
      print(f"logits against PyTorch on {agree['num_inputs']} random inputs: max |difference| "
            f"{agree['max_abs_diff']:.3g} (largest |logit| {agree['max_logit']:.3g}, relative "
            f"{agree['relative']:.3g}); top-1 agreement {100 * agree['top1']:.1f} %")
      if not agree["relative"] <= args.tolerance:
        raise ValueError(f"the converted teacher disagrees with PyTorch: relative logit "
                         f"difference {agree['relative']:.3g} > --tolerance={args.tolerance:g} "
                         "(a different architecture or a broken checkpoint?); nothing written")
    else:
      print("no comparison with PyTorch (--no-check)")
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if os.path.exists(out):
    shutil.rmtree(out)
  os.replace(staging, out)
  print(f"wrote the teacher to {out}\n  restore: kd_jax.teachers.restore_teacher({out!r}, "
        f"{args.arch!r}, num_classes={args.num_classes})\n  in an experiment: "
        f"--config.teacher.checkpoint={out}")
  return info


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (1 with a one-line error message)."""
  args = _parser().parse_args(argv)
  try:
    run(args)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
