"""Converts RepDistiller PyTorch state dicts into kd_jax model variables (no torch needed).

The one idea: our modules carry the PyTorch attribute names, so a `state_dict` key maps to a
variable path by splitting on dots (plus a few renames where PyTorch `Sequential` indices count
ReLUs), and every tensor is re-laid-out: conv weights OIHW -> HWIO, linear weights [out, in] ->
[in, out], BN weight/bias/running_mean/running_var -> scale/bias/mean/var
(`num_batches_tracked` is dropped). Any unknown key, missing variable or shape mismatch raises
a ValueError naming the key and both shapes.

RepDistiller teacher files (`ckpt_epoch_240.pth`) hold the state dict under "model":
`kd_jax.models.torch_file.state_dict(torch_file.load(path))` reads it without torch, and
`python -m kd_jax.convert_teacher` turns the file into an Orbax teacher in one command.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from kd_jax.models._registry import available, create

_SKIP = ("num_batches_tracked",)
_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _seq_pair(match, names=("conv", "bn")):
  """Index n of a PyTorch Sequential(conv, bn, relu, conv, bn, relu, ...) -> (n // 3, conv|bn)."""
  n = int(match.group(2))
  if n % 3 == 2:
    raise ValueError(f"index {n} is a ReLU position and cannot hold weights")
  return f"{match.group(1)}.{n // 3}.{names[n % 3]}."


def _rename_vgg(key):
  return re.sub(r"^(block\d)\.(\d+)\.", _seq_pair, key)


def _rename_mobilenetv2(key):
  key = re.sub(r"^(conv[12])\.([01])\.",
               lambda m: f"{m.group(1)}.{('conv', 'bn')[int(m.group(2))]}.", key)
  key = re.sub(r"^(blocks\.\d+\.\d+\.conv)\.(\d+)\.", _seq_pair, key)
  return re.sub(r"^classifier\.0\.", "classifier.", key)


def _rename_wrn(key):
  return key.replace("convShortcut", "conv_shortcut")


def _rename_for(name):
  if name.startswith("vgg"):
    return _rename_vgg
  if name == "MobileNetV2":
    return _rename_mobilenetv2
  if name.startswith("wrn_"):
    return _rename_wrn
  return lambda key: key


def _module_at(model, path, key):
  obj = model
  for seg in path:
    try:
      obj = obj[int(seg)] if seg.isdigit() else getattr(obj, seg)
    except (AttributeError, IndexError, TypeError, KeyError):
      raise ValueError(f"state_dict key {key!r}: the model has no submodule "
                       f"{'.'.join(path)!r}") from None
    if obj is None:
      raise ValueError(f"state_dict key {key!r}: submodule {'.'.join(path)!r} does not exist in "
                       "this model (wrong architecture?)")
  return obj


def _target(module, leaf, key):
  """(attribute name, layout function) for PyTorch leaf `leaf` of `module`."""
  if isinstance(module, nnx.BatchNorm):
    if leaf not in _BN_LEAVES:
      raise ValueError(f"state_dict key {key!r}: unexpected batch-norm entry {leaf!r}")
    return _BN_LEAVES[leaf], lambda a: a
  if isinstance(module, nnx.Conv):
    if leaf == "weight":
      return "kernel", lambda a: np.transpose(a, (2, 3, 1, 0)) if a.ndim == 4 else a
    if leaf == "bias":
      return "bias", lambda a: a
  if isinstance(module, nnx.Linear):
    if leaf == "weight":
      return "kernel", lambda a: a.T if a.ndim == 2 else a
    if leaf == "bias":
      return "bias", lambda a: a
  raise ValueError(f"state_dict key {key!r}: entry {leaf!r} has no counterpart in "
                   f"{type(module).__name__}")


def load_torch_state_dict(model: nnx.Module, name: str, state_dict: Mapping) -> nnx.Module:
  """Writes a RepDistiller `state_dict` into `model` (built by `create(name, ...)`) in place.

  Args:
    model: the kd_jax model to fill; its parameters and batch statistics are all overwritten.
    name: the model's registry name (selects the key renames).
    state_dict: mapping PyTorch key -> array (numpy or anything `np.asarray` accepts). A
      DataParallel "module." prefix is stripped.

  Returns:
    `model`, for chaining.

  Raises:
    ValueError: unknown key, a key whose tensor shape differs from ours (both shapes named),
      or model variables the state dict does not provide.
  """
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):
    state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
  rename = _rename_for(name)
  filled = set()
  for key, value in state_dict.items():
    *mod_path, leaf = key.split(".")
    if leaf in _SKIP:
      continue
    renamed = rename(key)
    *mod_path, leaf = renamed.split(".")
    module = _module_at(model, mod_path, key)
    attr, layout = _target(module, leaf, key)
    var = getattr(module, attr, None)
    if var is None:
      raise ValueError(f"state_dict key {key!r}: {'.'.join(mod_path)} has no {attr!r} "
                       "(e.g. a bias where our layer has none)")
    arr = np.asarray(value)
    new = layout(arr)
    if new.shape != var.shape:
      raise ValueError(f"shape mismatch for state_dict key {key!r}: PyTorch shape "
                       f"{tuple(arr.shape)} (-> {tuple(new.shape)} after re-layout), ours "
                       f"{'.'.join(mod_path + [attr])} has {tuple(var.shape)}")
    var.value = jax.numpy.asarray(new, dtype=var.dtype)
    filled.add(tuple(str(s) for s in mod_path) + (attr,))
  wanted = {tuple(str(s) for s in path)
            for path, _ in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}
  missing = sorted(".".join(p) for p in wanted - filled)
  if missing:
    shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
    raise ValueError(f"state_dict for {name!r} lacks {len(missing)} model variable(s): {shown}")
  return model


def model_from_torch_state_dict(name: str, state_dict: Mapping, *, num_classes: int,
                                **options) -> nnx.Module:
  """`create(name, num_classes=..., **options)` with its variables taken from `state_dict`."""
  if name not in available() or name.endswith("_digits"):
    raise ValueError(f"no PyTorch conversion for model {name!r}; convertible names: "
                     f"{', '.join(n for n in available() if not n.endswith('_digits'))}")
  # Build the model abstractly (no random initialisation to compile and run); every parameter
  # and statistic is overwritten from `state_dict`. Models that hold other state (dropout RNG
  # streams) are built concretely.
  model = nnx.eval_shape(lambda: create(name, num_classes=num_classes, **options))
  others = nnx.state(model, nnx.Not((nnx.Param, nnx.BatchStat)))
  if jax.tree.leaves(others):
    model = create(name, num_classes=num_classes, **options)
  return load_torch_state_dict(model, name, state_dict)


def from_torch_state_dict(name: str, state_dict: Mapping, *, num_classes: int,
                          **options) -> nnx.State:
  """Converts a RepDistiller PyTorch `state_dict` into the nnx state of model `name`.

  The result is `nnx.state(model)` of `create(name, num_classes=num_classes, **options)` with
  parameters and batch-norm running statistics from PyTorch: use it with
  `nnx.update(model, state)` or `nnx.merge(graphdef, state)`. Eval-mode logits then match
  PyTorch's `model.eval()(x)` for x transposed NCHW -> NHWC.

  Args:
    name: registry name, e.g. "resnet32x4" (RepDistiller's `model_dict` name).
    state_dict: mapping PyTorch key -> array (numpy; torch is not needed here).
    num_classes: classifier size of the PyTorch model.
    **options: passed to `create` (e.g. `dtype`).

  Raises:
    ValueError: unknown model name, or any key/shape mismatch (the key and both shapes named).
  """
  return nnx.state(model_from_torch_state_dict(name, state_dict, num_classes=num_classes,
                                               **options))
