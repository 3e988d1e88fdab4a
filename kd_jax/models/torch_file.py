"""Reads files written by `torch.save` into numpy arrays, without torch.

The one idea: a `.pth` file is a pickle whose tensors point, by persistent id, at raw storage
bytes. Unpickling it with a restricted `pickle.Unpickler` that rebuilds each tensor as a numpy
view of its storage gives the checkpoint's Python structure (dicts, lists, numbers) with numpy
arrays in place of tensors, whatever device the tensors were saved from. Two layouts exist:

  zip (torch >= 1.6, the default): `<name>/data.pkl` plus one `<name>/data/<key>` entry of raw
    bytes per storage (and `<name>/byteorder`);
  legacy (`_use_new_zipfile_serialization=False`, every file of torch < 1.6, e.g. RepDistiller's
    released teachers): magic number, protocol version and system-info pickles, the object
    pickle, a pickle of the storage keys, then per key an int64 element count and the bytes.

Only the globals a checkpoint needs are resolved (`torch._utils._rebuild_tensor_v2`, storage
types, `collections.OrderedDict`, numpy scalars); any other global (an `argparse.Namespace` of
options, a custom class) becomes an `Opaque` placeholder, so reading never runs code from the
file.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class Opaque:
  """Stands in for an object of a class the reader does not rebuild.

  `name` is the class's qualified name; `args`, `kwargs` and `state` are what the pickle passed
  to its constructor and `__setstate__`.
  """

  name, args, kwargs, state = "?", (), {}, None  # NEWOBJ builds it without __init__

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state = args, kwargs, None

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"Opaque({self.name})"


def _opaque(name: str) -> type:
  return type("Opaque", (Opaque,), {"name": name})


class _Storage:
  """A storage's dtype (from its storage type) and, once read, its flat numpy array."""

  def __init__(self, dtype, key: str, numel: int):
    self.dtype, self.key, self.numel, self.array = np.dtype(dtype), key, int(numel), None


class _StorageType:

  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES:
      raise ValueError(f"unsupported torch storage type {name!r}")
    self.name, self.dtype = name, _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """numpy counterpart of `torch._utils._rebuild_tensor_v2`: a strided view, copied."""
  del unused
  flat = storage.array
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not size:
    return flat[storage_offset].copy()
  if any(s == 0 for s in size):
    return np.zeros(size, flat.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or last >= flat.size:
    raise ValueError(f"corrupt tensor record: size {size}, stride {stride} and offset "
                     f"{storage_offset} exceed its storage of {flat.size} elements")
  view = np.lib.stride_tricks.as_strided(flat[storage_offset:], shape=size,
                                         strides=tuple(s * flat.itemsize for s in stride))
  return np.array(view)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype,
                       *unused):
  del requires_grad, hooks, unused
  if storage.array.dtype != np.dtype(dtype):
    storage.array = storage.array.view(dtype)
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _Unpickler(pickle.Unpickler):
  """Resolves only checkpoint globals; tensors come back as numpy arrays."""

  def __init__(self, file, read_storage):
    super().__init__(file, encoding="utf-8")
    self._read_storage = read_storage
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    if module == "torch._utils":
      if name == "_rebuild_tensor_v2":
        return _rebuild_tensor
      if name == "_rebuild_tensor_v3":
        return _rebuild_tensor_v3
      if name == "_rebuild_parameter":
        return _rebuild_parameter
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    if module in ("torch.storage", "torch") and name in ("UntypedStorage", "TypedStorage"):
      return _StorageType("UntypedStorage")
    if module == "torch" and name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) in (("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray",
                                                                "scalar")):
      return np._core.multiarray.scalar  # pylint: disable=protected-access
    if (module, name) == ("numpy", "dtype"):
      return np.dtype
    if (module, name) == ("_codecs", "encode"):
      return lambda s, enc="utf-8": s.encode(enc)
    if module == "builtins" and name in ("set", "frozenset", "slice", "complex", "tuple",
                                         "list", "dict", "bytearray"):
      return getattr(__import__("builtins"), name)
    return _opaque(f"{module}.{name}")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise ValueError(f"unsupported persistent id in the pickle: {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    numel = pid[4]
    if len(pid) > 5 and pid[5] is not None:
      raise ValueError("storage views (torch < 1.0 checkpoints) are not supported")
    if key not in self._storages:
      dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else storage_type
      storage = _Storage(dtype, key, numel)
      self._storages[key] = storage
      arr = self._read_storage(storage)
      if arr is not None:
        storage.array = arr
    return self._storages[key]


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise ValueError(f"{path}: a torch zip checkpoint holds one data.pkl, found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
      big_endian = zf.read(prefix + "byteorder").decode().strip() == "big"

    def read_storage(storage):
      name = f"{prefix}data/{storage.key}"
      if name not in names:
        raise ValueError(f"{path}: storage {storage.key!r} is missing (truncated file?)")
      dtype = storage.dtype.newbyteorder(">") if big_endian else storage.dtype
      return np.frombuffer(zf.read(name), dtype).astype(storage.dtype)

    return _Unpickler(io.BytesIO(zf.read(pkl[0])), read_storage).load()


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    head = pickle.Unpickler(f)
    try:
      magic = head.load()
    except Exception as e:  # noqa: BLE001 - any failure means: not a legacy torch file
      raise ValueError(f"{path} is neither a torch zip checkpoint nor a legacy torch file "
                       f"({type(e).__name__}: {e})") from None
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path} is neither a torch zip checkpoint nor a legacy torch file "
                       "(wrong magic number; a torch < 0.4 tar file?)")
    head.load()  # protocol version
    sys_info = head.load()
    if not sys_info.get("little_endian", True):
      raise ValueError(f"{path} was written on a big-endian machine (not supported)")
    unpickler = _LegacyUnpickler(f, lambda storage: None)
    obj = unpickler.load()
    keys = pickle.Unpickler(f).load()
    for key in keys:
      storage = unpickler._storages.get(str(key))  # pylint: disable=protected-access
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{path}: truncated at storage {key!r}")
      (numel,) = struct.unpack("<q", raw)
      dtype = storage.dtype if storage is not None else np.dtype(np.uint8)
      data = f.read(numel * dtype.itemsize)
      if len(data) != numel * dtype.itemsize:
        raise ValueError(f"{path}: truncated in storage {key!r}")
      if storage is not None:
        storage.array = np.frombuffer(data, dtype).copy()
  # Tensors were recorded before their bytes were read: rebuild them now.
  return _resolve(obj)


class _Pending:
  """A tensor of the legacy format, rebuilt once its storage has been read."""

  def __init__(self, args):
    self.args = args


def _resolve(obj):
  if isinstance(obj, _Pending):
    return _rebuild_tensor(*obj.args)
  if isinstance(obj, collections.OrderedDict):
    out = collections.OrderedDict((k, _resolve(v)) for k, v in obj.items())
    out.__dict__.update(obj.__dict__)
    return out
  if isinstance(obj, dict):
    return {k: _resolve(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_resolve(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v) for v in obj)
  if isinstance(obj, Opaque):
    obj.args, obj.kwargs, obj.state = (_resolve(obj.args), _resolve(obj.kwargs),
                                       _resolve(obj.state))
  return obj


class _LegacyUnpickler(_Unpickler):
  """Defers tensors: in the legacy layout storages follow the object pickle."""

  def find_class(self, module, name):
    found = super().find_class(module, name)
    if found is _rebuild_tensor:
      return lambda *args: _Pending(args)
    return found


def load(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` file (zip or legacy layout) with tensors as numpy arrays.

  Args:
    path: the file, e.g. RepDistiller's `ckpt_epoch_240.pth`.

  Returns:
    The saved object: dicts, lists and numbers as saved, every tensor (or `nn.Parameter`) a
    numpy array of its dtype (bfloat16 as `ml_dtypes.bfloat16`), classes the reader does not
    rebuild as `Opaque` placeholders.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file is not a torch checkpoint, or it is truncated or corrupt.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"PyTorch checkpoint {path} does not exist.")
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)


def state_dict(checkpoint: Any, *, key: str | None = "model") -> dict[str, np.ndarray]:
  """The model `state_dict` of a loaded checkpoint, as `{name: numpy array}`.

  RepDistiller and mdistiller save `{"model": state_dict, "epoch": ..., ...}`; a bare state dict
  (every value an array) is accepted as is. A DataParallel "module." prefix is kept (the
  converter strips it).

  Args:
    checkpoint: what `load` returned.
    key: the entry that holds the state dict (None: `checkpoint` is the state dict).

  Raises:
    ValueError: the entry is missing or is not a mapping of arrays (names the keys found).
  """
  sd = checkpoint
  if key is not None and not _is_state_dict(checkpoint):
    if not isinstance(checkpoint, Mapping) or key not in checkpoint:
      found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(
          checkpoint).__name__
      raise ValueError(f"the checkpoint has no {key!r} entry holding the state dict; "
                       f"found {found}")
    sd = checkpoint[key]
  if not _is_state_dict(sd):
    raise ValueError("the checkpoint's state dict must map parameter names to tensors; got "
                     f"{type(sd).__name__}")
  return {str(k): v for k, v in sd.items()}


def _is_state_dict(obj) -> bool:
  return (isinstance(obj, Mapping) and bool(obj)
          and all(isinstance(v, np.ndarray | np.generic) for v in obj.values()))
