"""Reads PyTorch `torch.save` checkpoints into numpy arrays, without importing torch.

TPU VMs and Colab TPU runtimes have no torch, yet the official VAR weights are `.pth` files. Since
torch 1.6 such a file is a zip archive laid out as

  <archive>/data.pkl          a pickle of the saved object (a state dict)
  <archive>/data/<key>        the raw bytes of one storage, referenced from the pickle
  <archive>/byteorder         "little" or "big" (absent in old files: little)
  <archive>/version, ...      format bookkeeping, not needed here

Pickles can run arbitrary code, so `data.pkl` is read with a restricted unpickler. The only globals
it hands out are the torch functions that rebuild plain dense tensors, the storage and dtype names
those functions take, and `collections.OrderedDict`. What it hands out are inert stand-ins written
here, never torch objects, and none of them accepts a pickle BUILD. Any other global (`os.system`,
`builtins.eval`, a model class, ...) raises `UnsafeCheckpointError` at the moment the pickle asks
for it, before it can be called, so loading never executes code from the file.

The tensors come back as numpy arrays built from each storage with the stored size, stride and
storage offset, so views (transposes, slices, expanded tensors) are exact. Dtypes map to numpy;
bfloat16 and the float8 types map to `ml_dtypes`.

The result is flat: nested dicts (and lists or tuples) are joined with "." into keys, e.g.
{"trainer": {"var_wo_ddp": {"head.weight": t}}} gives "trainer.var_wo_ddp.head.weight". Leaves
that are not tensors (ints, floats, strings, None, dtypes, ...) are dropped, so an optimizer's
step counts or a config stored next to the weights do not get in the way. A released state dict
has no such leaves.
"""
from __future__ import annotations

import collections
import inspect
import io
import math
import os
import pickle
import sys
import types
import zipfile
from typing import Any, BinaryIO, Callable, Union

import ml_dtypes
import numpy as np

from var_jax import errors

PathOrFile = Union[str, bytes, os.PathLike, BinaryIO]

# What `torch.save` wrote before torch 1.6: a pickle starting with this magic number (protocol 2).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")

_RESAVE_HINT = (
    "on a machine with a recent torch (>= 1.6), re-save it: "
    "`torch.save(torch.load(path, map_location='cpu'), path)`."
)

# `torch.<Name>Storage`: the typed storages that `_rebuild_tensor(_v2)` pickles.
_STORAGE_DTYPES = types.MappingProxyType({
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
})

# `torch.<name>` dtype objects, pickled by name; `_rebuild_tensor_v3` takes one (it is used for the
# dtypes that have no typed storage, such as uint16 and the float8 types).
_TORCH_DTYPES = types.MappingProxyType({
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
})

# torch names that are legitimate but have no numpy counterpart: refused with a specific message.
_UNSUPPORTED_TORCH_NAMES = types.MappingProxyType({
    **{name: "quantized tensors are not supported: save `t.dequantize()` instead"
       for name in ("QInt8Storage", "QInt32Storage", "QUInt8Storage", "QUInt4x2Storage",
                    "QUInt2x4Storage", "qint8", "qint32", "quint8", "quint4x2", "quint2x4")},
    "complex32": "torch.complex32 has no numpy equivalent: save `t.to(torch.complex64)` instead",
    "float4_e2m1fn_x2": "packed float4 (torch.float4_e2m1fn_x2) is not supported: save it unpacked",
    **{name: f"torch.{name} is a raw bit type with no numpy equivalent: save a numeric dtype instead"
       for name in ("bits1x8", "bits2x4", "bits4x2", "bits8", "bits16")},
})


def load_torch_checkpoint(path_or_file: PathOrFile) -> dict[str, np.ndarray]:
  """Reads every tensor of a `torch.save` file into numpy, without torch and without running code.

  Args:
    path_or_file: path of a `.pth` file written by `torch.save` (torch >= 1.6 zip format), or a
      seekable binary file object open on one (it is left open).

  Returns:
    {key: array}, in the order of the file. Nested dicts, lists and tuples are flattened with "."
    between the levels; leaves that are not tensors are dropped (see the module docstring).
    Arrays are C-contiguous, writable and in native byte order.

  Raises:
    UnsafeCheckpointError: the pickle asks for anything but tensors, storages, dtypes and
      OrderedDict; nothing from the file has run at that point.
    CheckpointError: the file is missing, not a torch zip checkpoint (e.g. the legacy format),
      truncated or damaged, or does not hold a dict of tensors. The message names the file.
    InputError: `path_or_file` is neither a path nor a binary file object.
  """
  source = _describe_source(path_or_file)
  try:
    with _open_archive(path_or_file) as archive:
      return _read_archive(archive)
  except errors.CheckpointError as e:
    raise type(e)(f"PyTorch checkpoint {source}: {e}") from e.__cause__


def _describe_source(path_or_file: PathOrFile) -> str:
  if isinstance(path_or_file, (str, bytes, os.PathLike)):
    return repr(os.fsdecode(path_or_file))
  name = getattr(path_or_file, "name", None)
  return repr(name) if isinstance(name, str) else f"<{type(path_or_file).__name__}>"


def _open_archive(path_or_file: PathOrFile) -> zipfile.ZipFile:
  """Checks the file's first bytes and opens it as a zip archive."""
  if isinstance(path_or_file, (str, bytes, os.PathLike)):
    path = os.fspath(path_or_file)
    try:
      with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    except FileNotFoundError as e:
      raise errors.CheckpointError(
          "no such file. Check the path (download the checkpoint first if needed).") from e
    except IsADirectoryError as e:
      raise errors.CheckpointError("is a directory; give the path of the .pth file in it.") from e
    except OSError as e:
      raise errors.CheckpointError(f"cannot be read ({e}).") from e
    _check_head(head)
    return _zip_or_error(path)
  if not (hasattr(path_or_file, "read") and hasattr(path_or_file, "seek")):
    raise errors.InputError(
        f"load_torch_checkpoint takes a path or a seekable binary file object (open(path, 'rb')), "
        f"got {type(path_or_file).__name__}.")
  try:
    start = path_or_file.tell()
    head = path_or_file.read(len(_LEGACY_MAGIC))
    path_or_file.seek(start)
  except OSError as e:
    raise errors.CheckpointError(f"the file object cannot be read and rewound ({e}); "
                                 "pass a seekable binary file such as open(path, 'rb').") from e
  if not isinstance(head, bytes):
    raise errors.InputError(
        f"the file object returned {type(head).__name__}, not bytes: open it in binary mode "
        "(open(path, 'rb')).")
  _check_head(head)
  return _zip_or_error(path_or_file)


def _check_head(head: bytes) -> None:
  """Refuses, with the reason, files that cannot be a torch zip checkpoint."""
  if not head:
    raise errors.CheckpointError("is empty (0 bytes): the download or save did not complete.")
  if head == _LEGACY_MAGIC:
    raise errors.CheckpointError(
        "is in the legacy (pre-1.6) torch.save format, which this loader does not read. To use it, "
        + _RESAVE_HINT)
  if not head.startswith(_ZIP_MAGICS) and not any(m.startswith(head) for m in _ZIP_MAGICS):
    raise errors.CheckpointError(
        f"is not a zip archive (it starts with {head[:8]!r}), so it is not a checkpoint written by "
        "torch.save in torch >= 1.6. If it is an older torch file or another format, "
        + _RESAVE_HINT)


def _zip_or_error(file: Union[str, bytes, BinaryIO]) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(file)
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise errors.CheckpointError(
        f"starts like a zip archive but cannot be opened as one ({e}): it is truncated "
        "(an interrupted download or save?) or damaged. Download or save it again.") from e


def _read_archive(archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
  prefix = _archive_prefix(archive)
  byteorder = _byteorder(archive, prefix)
  try:
    pickled = archive.read(f"{prefix}data.pkl")
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise errors.CheckpointError(f"its data.pkl record cannot be read ({e}): the file is damaged. "
                                 "Download or save it again.") from e
  unpickler = _RestrictedUnpickler(pickled, archive, prefix)
  try:
    root = unpickler.load()
  except errors.VarJaxError:
    raise
  except Exception as e:  # Only this module's functions and builtin containers run here.
    raise errors.CheckpointError(
        f"its data.pkl is not a valid torch pickle ({type(e).__name__}: {e}). The file is damaged "
        "or was not written by torch.save; download or save it again.") from e
  leaves = _flatten(root)
  return _materialize(archive, leaves, byteorder)


def _archive_prefix(archive: zipfile.ZipFile) -> str:
  """The "<archive>/" folder that holds data.pkl (torch writes everything under one folder)."""
  names = archive.namelist()
  found = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
  if not found:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise errors.CheckpointError(
        f"is a zip archive without an '<archive>/data.pkl' record (it holds: {shown or 'nothing'}), "
        "so it was not written by torch.save. Save the state dict with "
        "`torch.save(model.state_dict(), path)`.")
  if len(found) > 1:
    raise errors.CheckpointError(
        f"holds several data.pkl records ({', '.join(found)}); torch.save writes exactly one. "
        "Save the state dict again with `torch.save(model.state_dict(), path)`.")
  return found[0][:-len("data.pkl")]


def _byteorder(archive: zipfile.ZipFile, prefix: str) -> str:
  name = f"{prefix}byteorder"
  if name not in archive.NameToInfo:
    return "little"  # What torch assumes for files written before it recorded the byte order.
  try:
    value = archive.read(name).decode("ascii", errors="replace").strip()
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise errors.CheckpointError(f"its byteorder record cannot be read ({e}).") from e
  if value not in ("little", "big"):
    raise errors.CheckpointError(
        f"its byteorder record says {value!r}; torch writes 'little' or 'big'. The file is damaged.")
  return value


# ------------------------------------------------------------------------------------------------
# Inert stand-ins that the restricted unpickler hands to the pickle.


class _Sealed:
  """Base of every object handed to the pickle: it refuses the BUILD opcode.

  BUILD would otherwise let a crafted pickle set attributes (e.g. `__defaults__` of a function,
  or a tensor's shape after it was checked).
  """
  __slots__ = ()

  def __setstate__(self, state: Any) -> None:
    raise errors.UnsafeCheckpointError(
        f"its pickle tries to change {self!r} (pickle BUILD), which torch.save never writes: the "
        "file was edited or crafted. It was refused before anything from it ran.")


class _NamedTorchType(_Sealed):
  """A torch object known by its name and the numpy dtype it stands for."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype):
    self.name = name
    self.dtype = dtype

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _StorageType(_NamedTorchType):
  """Stand-in for `torch.<Name>Storage` / `torch.UntypedStorage`."""
  __slots__ = ()


class _TorchDtype(_NamedTorchType):
  """Stand-in for a `torch.<dtype>` object."""
  __slots__ = ()


class _TensorType(_Sealed):
  """Stand-in for `torch.Tensor` / `torch.nn.Parameter`, the types `_rebuild_from_type_v2` takes."""
  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return self.name


class _StorageRef(_Sealed):
  """One `<archive>/data/<key>` record, checked against the size the pickle declares."""
  __slots__ = ("key", "record", "nbytes", "dtype")

  def __init__(self, key: str, record: str, nbytes: int, dtype: np.dtype):
    self.key = key
    self.record = record
    self.nbytes = nbytes
    self.dtype = dtype

  def __repr__(self) -> str:
    return f"storage 'data/{self.key}'"


class _TensorRef(_Sealed):
  """A tensor to build: a strided view of a storage. Data is read only after unpickling."""
  __slots__ = ("storage", "offset", "size", "stride", "dtype", "conj", "neg")

  def __init__(self, storage: _StorageRef, offset: int, size: tuple[int, ...],
               stride: tuple[int, ...], dtype: np.dtype, conj: bool, neg: bool):
    self.storage = storage
    self.offset = offset
    self.size = size
    self.stride = stride
    self.dtype = dtype
    self.conj = conj
    self.neg = neg

  def __repr__(self) -> str:
    return f"tensor {self.dtype.name}{list(self.size)} in {self.storage!r}"


class _Rebuild(_Sealed):
  """Stand-in for one torch rebuild function: checks the arguments, then calls `impl`."""
  __slots__ = ("qualname", "impl", "signature")

  def __init__(self, qualname: str, impl: Callable[..., _TensorRef]):
    self.qualname = qualname
    self.impl = impl
    self.signature = inspect.signature(impl)

  def __repr__(self) -> str:
    return self.qualname

  def __call__(self, *args: Any) -> _TensorRef:
    try:
      self.signature.bind(*args)
    except TypeError as e:
      raise errors.CheckpointError(
          f"its pickle calls {self.qualname} with {len(args)} arguments, which torch never "
          f"writes ({e}): the file is damaged or crafted.") from e
    return self.impl(*args)


# ------------------------------------------------------------------------------------------------
# What the rebuild stand-ins do.


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in value):
    raise errors.CheckpointError(
        f"a tensor's {what} is {value!r:.200}, not a tuple of non-negative ints: the file is "
        "damaged.")
  return tuple(value)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype,
                metadata: Any = None) -> _TensorRef:
  """Checks a strided view of `storage` and returns it, unread."""
  if not isinstance(storage, _StorageRef):
    raise errors.CheckpointError(
        f"a tensor is rebuilt from {storage!r:.100} instead of a storage: the file is damaged.")
  if not _is_int(offset) or offset < 0:
    raise errors.CheckpointError(
        f"a tensor in {storage!r} has storage offset {offset!r:.100}, not an int >= 0: the file "
        "is damaged.")
  size = _int_tuple(size, "size")
  stride = _int_tuple(stride, "stride")
  if len(size) != len(stride):
    raise errors.CheckpointError(
        f"a tensor in {storage!r} has size {size} but stride {stride} (different lengths): the "
        "file is damaged.")
  if storage.nbytes % dtype.itemsize:
    raise errors.CheckpointError(
        f"{storage!r} holds {storage.nbytes} bytes, not a whole number of {dtype.name} elements "
        f"({dtype.itemsize} bytes each): the file is damaged.")
  if math.prod(size):
    available = storage.nbytes // dtype.itemsize
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= available:
      raise errors.CheckpointError(
          f"a {dtype.name} tensor of size {size}, stride {stride} and offset {offset} needs "
          f"{last + 1} elements of {storage!r}, which holds only {available}: the file is "
          "damaged or truncated. Download or save it again.")
  conj, neg = _tensor_flags(metadata, storage)
  return _TensorRef(storage, offset, size, stride, dtype, conj, neg)


def _tensor_flags(metadata: Any, storage: _StorageRef) -> tuple[bool, bool]:
  """The conj and neg bits torch saves as tensor metadata ({'conj': True} and so on)."""
  if metadata is None:
    return False, False
  if not isinstance(metadata, dict):
    raise errors.CheckpointError(
        f"a tensor in {storage!r} has metadata {metadata!r:.100}, not a dict: the file is "
        "damaged.")
  unknown = sorted(str(k) for k, v in metadata.items() if v and k not in ("conj", "neg"))
  if unknown:
    raise errors.CheckpointError(
        f"a tensor in {storage!r} has metadata flags {unknown} that this loader does not know "
        "(it knows 'conj' and 'neg'). Save `t.clone()` of a plain tensor instead.")
  return bool(metadata.get("conj", False)), bool(metadata.get("neg", False))


def _rebuild_tensor(storage, storage_offset, size, stride):
  """torch._utils._rebuild_tensor: a tensor of the storage's dtype (v2 without autograd state)."""
  return _rebuild_tensor_v2(storage, storage_offset, size, stride, False, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
  """torch._utils._rebuild_tensor_v2: what torch writes for every ordinary dense tensor."""
  del requires_grad, backward_hooks  # Autograd state; empty hooks in every file torch writes.
  dtype = storage.dtype if isinstance(storage, _StorageRef) else None
  return _tensor_ref(storage, storage_offset, size, stride, dtype, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  """torch._utils._rebuild_tensor_v3: a tensor whose dtype has no typed storage (uint16, float8)."""
  del requires_grad, backward_hooks
  if not isinstance(dtype, _TorchDtype):
    raise errors.CheckpointError(
        f"_rebuild_tensor_v3 got {dtype!r:.100} where torch writes a dtype: the file is damaged.")
  return _tensor_ref(storage, storage_offset, size, stride, dtype.dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  """torch._utils._rebuild_parameter: an nn.Parameter around a tensor; only the tensor matters."""
  del requires_grad, backward_hooks
  return _expect_tensor(data, "_rebuild_parameter")


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  """torch._utils._rebuild_parameter_with_state: as above, plus Python attributes, dropped."""
  del requires_grad, backward_hooks, state
  return _expect_tensor(data, "_rebuild_parameter_with_state")


def _rebuild_from_type_v2(func, new_type, args, state):
  """torch._tensor._rebuild_from_type_v2: a tensor carrying Python attributes, which are dropped."""
  del state
  if not isinstance(func, _Rebuild) or not isinstance(new_type, _TensorType):
    raise errors.CheckpointError(
        f"_rebuild_from_type_v2 got {func!r:.100} and {new_type!r:.100}; torch writes a tensor "
        "rebuild function and torch.Tensor or torch.nn.Parameter. The file is damaged.")
  if not isinstance(args, tuple):
    raise errors.CheckpointError(
        f"_rebuild_from_type_v2 got arguments {args!r:.100}, not a tuple: the file is damaged.")
  return _expect_tensor(func(*args), "_rebuild_from_type_v2")


def _expect_tensor(value: Any, where: str) -> _TensorRef:
  if not isinstance(value, _TensorRef):
    raise errors.CheckpointError(
        f"{where} got {value!r:.100} where torch writes a tensor: the file is damaged.")
  return value


_REBUILD_FUNCTIONS = types.MappingProxyType({
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
})


# ------------------------------------------------------------------------------------------------
# The unpickler.


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles data.pkl, handing out only the stand-ins above; everything else is refused."""

  def __init__(self, pickled: bytes, archive: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(pickled))
    self._archive = archive
    self._prefix = prefix
    self._storages: dict[str, _StorageRef] = {}
    allowed: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
    for (module, name), impl in _REBUILD_FUNCTIONS.items():
      allowed[module, name] = _Rebuild(f"{module}.{name}", impl)
    allowed["torch", "Tensor"] = _TensorType("torch.Tensor")
    allowed["torch.nn.parameter", "Parameter"] = _TensorType("torch.nn.parameter.Parameter")
    for name, dtype in _STORAGE_DTYPES.items():
      allowed["torch", name] = _StorageType(name, dtype)
    untyped = _StorageType("UntypedStorage", np.dtype(np.uint8))
    allowed["torch", "UntypedStorage"] = untyped
    allowed["torch.storage", "UntypedStorage"] = untyped
    for name, dtype in _TORCH_DTYPES.items():
      allowed["torch", name] = _TorchDtype(name, dtype)
    self._allowed = allowed

  def find_class(self, module: str, name: str) -> Any:
    found = self._allowed.get((module, name))
    if found is not None:
      return found
    if module == "torch" and name in _UNSUPPORTED_TORCH_NAMES:
      raise errors.CheckpointError(f"it holds torch.{name}: {_UNSUPPORTED_TORCH_NAMES[name]}.")
    raise errors.UnsafeCheckpointError(_refusal_message(module, name))

  def persistent_load(self, pid: Any) -> _StorageRef:
    """Resolves ('storage', type, key, location, numel) to a checked `<archive>/data/<key>`."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
      raise errors.CheckpointError(
          f"its pickle refers to {pid!r:.120}; torch.save refers only to "
          "('storage', type, key, location, numel) records. The file is damaged or is not a "
          "torch.save checkpoint.")
    _, storage_type, key, location, numel = pid
    if isinstance(key, bytes):
      key = key.decode("ascii", errors="replace")
    if (not isinstance(storage_type, _StorageType) or not isinstance(key, str)
        or not isinstance(location, (str, bytes)) or not _is_int(numel) or numel < 0):
      raise errors.CheckpointError(
          f"its pickle has a malformed storage record {pid!r:.160}: the file is damaged.")
    nbytes = numel * storage_type.dtype.itemsize
    known = self._storages.get(key)
    if known is not None:
      if known.dtype != storage_type.dtype or known.nbytes != nbytes:
        raise errors.CheckpointError(
            f"storage 'data/{key}' is referenced both as {known.dtype.name} x "
            f"{known.nbytes // known.dtype.itemsize} and as {storage_type!r} x {numel}; torch.save "
            "never writes that. The file is damaged.")
      return known
    record = f"{self._prefix}data/{key}"
    info = self._archive.NameToInfo.get(record)
    if info is None:
      raise errors.CheckpointError(
          f"its pickle refers to storage 'data/{key}', which the archive does not hold: the file "
          "is incomplete or damaged. Download or save it again.")
    if info.file_size != nbytes:
      relation = "shorter" if info.file_size < nbytes else "longer"
      raise errors.CheckpointError(
          f"storage record 'data/{key}' holds {info.file_size} bytes, {relation} than the "
          f"{numel} x {storage_type.dtype.name} = {nbytes} bytes its pickle declares: the file is "
          "truncated or damaged. Download or save it again.")
    ref = _StorageRef(key, record, nbytes, storage_type.dtype)
    self._storages[key] = ref
    return ref


def _refusal_message(module: str, name: str) -> str:
  message = (
      f"its pickle asks for {module}.{name}, which is not a tensor-rebuild function, storage type, "
      "dtype or OrderedDict. Unpickling it could run code from the file, so the file was refused "
      "before anything from it ran. Only state dicts of tensors can be loaded: on a machine with "
      "torch, and only if you trust the file, load it and re-save just the weights with "
      "`torch.save(model.state_dict(), path)`")
  if module.startswith("__torch__"):
    message += " (this looks like a TorchScript archive written by torch.jit.save)"
  else:
    message += (" (for an official VAR training checkpoint ar-ckpt-*.pth, save "
                "`ckpt['trainer']['var_wo_ddp']`)")
  return message + "."


# ------------------------------------------------------------------------------------------------
# From the unpickled tree to arrays.


def _flatten(root: Any) -> list[tuple[str, _TensorRef]]:
  """[(dotted key, tensor)] in depth-first file order; non-tensor leaves are dropped."""
  if isinstance(root, _TensorRef):
    raise errors.CheckpointError(
        "it holds a single tensor, not a dict of tensors. Save a dict, e.g. "
        "`torch.save({'weight': tensor}, path)`.")
  if not isinstance(root, dict):
    raise errors.CheckpointError(
        f"it holds a {type(root).__name__}, not a dict of tensors (a state dict). Save one with "
        "`torch.save(model.state_dict(), path)`.")
  out: list[tuple[str, _TensorRef]] = []
  seen_keys: set[str] = set()
  seen_containers = {id(root)}
  stack: list[tuple[str, Any]] = list(reversed(_children("", root)))
  while stack:
    key, value = stack.pop()
    if isinstance(value, _TensorRef):
      if key in seen_keys:
        raise errors.CheckpointError(
            f"two tensors flatten to the same key {key!r} (a nested key and a dotted key collide). "
            "Rename one of them before saving.")
      seen_keys.add(key)
      out.append((key, value))
    elif isinstance(value, (dict, list, tuple)):
      if id(value) in seen_containers:
        raise errors.CheckpointError(
            f"the container at {key!r} appears twice in the pickle (shared or self-referencing); a "
            "state dict is a tree. Save a plain state dict.")
      seen_containers.add(id(value))
      stack.extend(reversed(_children(key + ".", value)))
  return out


def _children(prefix: str, container: Any) -> list[tuple[str, Any]]:
  if isinstance(container, dict):
    items = list(container.items())
  else:
    items = list(enumerate(container))
  children = []
  for key, value in items:
    if not isinstance(key, str) and not _is_int(key):
      raise errors.CheckpointError(
          f"a dict under {prefix.rstrip('.') or 'the top level'!r} has the key {key!r:.80} of type "
          f"{type(key).__name__}; only str and int keys can be flattened. Save a state dict with "
          "string keys.")
    children.append((f"{prefix}{key}", value))
  return children


def _materialize(archive: zipfile.ZipFile, leaves: list[tuple[str, _TensorRef]],
                 byteorder: str) -> dict[str, np.ndarray]:
  """Reads each storage once and cuts its tensors out of it, in file order of the keys."""
  by_storage: dict[str, list[tuple[str, _TensorRef]]] = {}
  for key, ref in leaves:
    by_storage.setdefault(ref.storage.key, []).append((key, ref))
  arrays: dict[str, np.ndarray] = dict.fromkeys(key for key, _ in leaves)
  for users in by_storage.values():
    storage = users[0][1].storage
    dtypes = {ref.dtype for _, ref in users}
    if len(dtypes) > 1:
      raise errors.CheckpointError(
          f"{storage!r} is viewed as several dtypes ({sorted(d.name for d in dtypes)}); torch.save "
          "never writes that. The file is damaged.")
    typed = _read_storage(archive, storage, dtypes.pop(), byteorder)
    for key, ref in users:
      arrays[key] = _strided_copy(typed, ref, sole_user=len(users) == 1)
  return arrays


def _read_storage(archive: zipfile.ZipFile, storage: _StorageRef, dtype: np.dtype,
                  byteorder: str) -> np.ndarray:
  """The storage's bytes as a writable 1-D array of `dtype` in native byte order."""
  raw = np.empty(storage.nbytes, np.uint8)
  try:
    with archive.open(storage.record) as f:
      view = memoryview(raw)
      filled = 0
      while filled < storage.nbytes:
        n = f.readinto(view[filled:])
        if not n:
          break
        filled += n
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise errors.CheckpointError(
        f"{storage!r} cannot be read ({e}): the file is damaged. Download or save it again.") from e
  if filled != storage.nbytes:
    raise errors.CheckpointError(
        f"{storage!r} ended after {filled} of {storage.nbytes} bytes: the file is truncated. "
        "Download or save it again.")
  if byteorder != sys.byteorder and dtype.itemsize > 1:
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    raw.view(f"u{unit}").byteswap(inplace=True)
  return raw.view(dtype)


def _strided_copy(typed: np.ndarray, ref: _TensorRef, sole_user: bool) -> np.ndarray:
  """The tensor `ref` describes, as a C-contiguous array (bounds were checked when unpickling)."""
  if not math.prod(ref.size):
    return np.zeros(ref.size, typed.dtype)
  if (sole_user and ref.offset == 0 and math.prod(ref.size) == typed.size
      and _is_c_contiguous(ref.size, ref.stride)):
    out = typed.reshape(ref.size)  # The storage is this tensor alone: no copy needed.
  else:
    item = typed.itemsize
    out = np.lib.stride_tricks.as_strided(
        typed[ref.offset:], shape=ref.size, strides=tuple(s * item for s in ref.stride),
        writeable=False).copy()
  if ref.conj:
    out = np.conj(out)
  if ref.neg:
    out = np.negative(out)
  return out


def _is_c_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
  expected = 1
  for n, s in zip(reversed(size), reversed(stride)):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True
