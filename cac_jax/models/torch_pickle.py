"""Read PyTorch ``.pth`` checkpoints into NumPy arrays without importing torch.

Two on-disk formats exist:

* zip (``torch.save`` since torch 1.6): ``<root>/data.pkl`` is a pickle whose
  tensors point, through pickle *persistent ids*, at raw storages stored as
  ``<root>/data/<key>``; ``<root>/byteorder`` says 'little' or 'big' (absent
  in old files: little).
* legacy (``_use_new_zipfile_serialization=False`` and all files from before
  1.6, e.g. torchvision's ``mobilenet_v2-b0353104.pth``): a stream of pickles
  (magic number, protocol version, system info, the object, the list of
  storage keys) followed, for each storage key in that order, by an int64
  element count and the raw little-endian bytes.

Only what a checkpoint needs is understood: nested dicts/lists/tuples,
``OrderedDict``, tensors rebuilt with ``torch._utils._rebuild_tensor_v2``
(or ``_rebuild_parameter``) over typed storages. Any other class is refused
with an error naming it, so an arbitrary pickle cannot run code here.
The even older tar format (torch < 0.4) is detected and refused.
"""

import collections
import io
import os
import pickle
import tarfile
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

# torch storage class -> NumPy dtype (bfloat16 comes from ml_dtypes, a jax dep).
STORAGE_DTYPES = {
  'DoubleStorage': np.dtype(np.float64),
  'FloatStorage': np.dtype(np.float32),
  'HalfStorage': np.dtype(np.float16),
  'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
  'LongStorage': np.dtype(np.int64),
  'IntStorage': np.dtype(np.int32),
  'ShortStorage': np.dtype(np.int16),
  'CharStorage': np.dtype(np.int8),
  'ByteStorage': np.dtype(np.uint8),
  'BoolStorage': np.dtype(np.bool_),
  'ComplexFloatStorage': np.dtype(np.complex64),
  'ComplexDoubleStorage': np.dtype(np.complex128),
}
# torch.dtype attribute names (used by _rebuild_tensor_v3 and untyped storages).
TORCH_DTYPES = {
  'float64': np.float64,
  'double': np.float64,
  'float32': np.float32,
  'float': np.float32,
  'float16': np.float16,
  'half': np.float16,
  'bfloat16': ml_dtypes.bfloat16,
  'int64': np.int64,
  'long': np.int64,
  'int32': np.int32,
  'int': np.int32,
  'int16': np.int16,
  'short': np.int16,
  'int8': np.int8,
  'uint8': np.uint8,
  'bool': np.bool_,
}


class _StorageType:
  """Stand-in for ``torch.FloatStorage`` & co: remembers the element dtype."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype


class _TorchDtype:
  """Stand-in for a pickled ``torch.float32`` & co."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _Storage:
  """A storage whose bytes may arrive after unpickling (legacy format)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, numel
    self.array: np.ndarray | None = None  # 1-D, filled in by the loader


class _StorageView:
  """Legacy storage view: ``numel`` elements of ``base`` from ``offset``."""

  def __init__(self, base: _Storage, offset: int, numel: int):
    self.base, self.offset, self.numel = base, offset, numel
    self.dtype = base.dtype


class _LazyTensor:
  """A tensor to materialise once all storage bytes are known."""

  def __init__(self, storage, offset: int, size, stride, dtype=None):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(size), tuple(stride)
    self.dtype = dtype  # set by _rebuild_tensor_v3 over untyped storages

  def materialize(self) -> np.ndarray:
    storage, offset = self.storage, self.offset
    if isinstance(storage, _StorageView):
      offset += storage.offset
      storage = storage.base
    flat = storage.array
    if flat is None:
      raise ValueError('checkpoint is truncated: a storage has no data.')
    if self.dtype is not None and self.dtype != flat.dtype:
      flat = flat.view(self.dtype)
    if not self.size:
      return flat[offset : offset + 1].copy().reshape(())
    extent = offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
    if min(self.size) > 0 and extent > flat.size:
      raise ValueError(
        f'checkpoint tensor of size {self.size} reads past its storage '
        f'({extent} > {flat.size} elements): the file is corrupt.'
      )
    view = np.lib.stride_tricks.as_strided(
      flat[offset:],
      shape=self.size,
      strides=tuple(s * flat.itemsize for s in self.stride),
      writeable=False,
    )
    return np.ascontiguousarray(view)


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
  storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride, dtype=dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


_ALLOWED_GLOBALS = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
  ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
}


class _CheckpointUnpickler(pickle.Unpickler):
  """Unpickler that resolves torch storages and refuses unknown classes."""

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage], zip_reader=None):
    super().__init__(file, encoding='latin1')
    self._storages = storages
    self._zip_reader = zip_reader  # callable key -> bytes, zip format only

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == 'torch' and name in STORAGE_DTYPES:
      return _StorageType(name, STORAGE_DTYPES[name])
    if module == 'torch' and name == 'UntypedStorage':
      return _StorageType(name, np.dtype(np.uint8))
    if module == 'torch' and name in TORCH_DTYPES:
      return _TorchDtype(TORCH_DTYPES[name])
    raise pickle.UnpicklingError(
      f'checkpoint references {module}.{name}, which this torch-free reader '
      'does not load; save a plain state_dict of tensors instead '
      '(torch.save(model.state_dict(), path)).'
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}.')
    storage_type, key, _, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
    view_metadata = pid[5] if len(pid) > 5 else None
    if key not in self._storages:
      storage = _Storage(storage_type.dtype, numel)
      if self._zip_reader is not None:
        raw = self._zip_reader(key)
        storage.array = np.frombuffer(raw, dtype=_little_endian(storage.dtype))
      self._storages[key] = storage
    storage = self._storages[key]
    if view_metadata is not None:
      _, view_offset, view_size = view_metadata
      return _StorageView(storage, int(view_offset), int(view_size))
    return storage


def _little_endian(dtype: np.dtype) -> np.dtype:
  """The little-endian variant of a NumPy dtype (extension dtypes: as is)."""
  if dtype.kind in 'biufc' and dtype.itemsize > 1:
    return dtype.newbyteorder('<')
  return dtype


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialize(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v) for v in obj)
  return obj


def _load_zip(data: bytes) -> Any:
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pickles) != 1:
      raise ValueError(f'zip checkpoint must hold exactly one data.pkl, found {pickles}.')
    root = pickles[0][: -len('data.pkl')]
    byteorder = 'little'
    if root + 'byteorder' in names:
      byteorder = archive.read(root + 'byteorder').decode().strip()
    storages: dict[str, _Storage] = {}

    def read_record(key: str) -> bytes:
      return archive.read(f'{root}data/{key}')

    result = _CheckpointUnpickler(
      io.BytesIO(archive.read(pickles[0])), storages, read_record
    ).load()
  if byteorder == 'big':
    # Records were written in the saving machine's order; reinterpret them.
    for storage in storages.values():
      if storage.dtype.itemsize > 1:
        storage.array = storage.array.byteswap()
  return _materialize(result)


def _load_legacy(data: bytes) -> Any:
  stream = io.BytesIO(data)
  magic = pickle.load(stream, encoding='latin1')
  if magic != LEGACY_MAGIC_NUMBER:
    raise ValueError('not a PyTorch checkpoint (bad legacy magic number).')
  pickle.load(stream, encoding='latin1')  # protocol version
  sys_info = pickle.load(stream, encoding='latin1')
  if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
    raise ValueError(
      'big-endian legacy checkpoints are not supported; re-save '
      'the file with torch.save on a little-endian machine.'
    )
  storages: dict[str, _Storage] = {}
  result = _CheckpointUnpickler(stream, storages).load()
  storage_keys = pickle.load(stream, encoding='latin1')
  for key in storage_keys:
    key = str(key)
    if key not in storages:
      raise ValueError(f'legacy checkpoint lists an unknown storage {key!r}.')
    storage = storages[key]
    count_bytes = stream.read(8)
    if len(count_bytes) != 8:
      raise ValueError('legacy checkpoint is truncated (storage header).')
    numel = int(np.frombuffer(count_bytes, '<i8')[0])
    nbytes = numel * storage.dtype.itemsize
    raw = stream.read(nbytes)
    if len(raw) != nbytes:
      raise ValueError(f'legacy checkpoint is truncated (storage {key!r}).')
    storage.array = np.frombuffer(raw, dtype=_little_endian(storage.dtype))
  return _materialize(result)


def loads(data: bytes) -> Any:
  """Decodes the bytes of a ``.pth`` file; tensors become NumPy arrays.

  Args:
    data: the whole file's content.

  Returns:
    The saved object with every tensor replaced by a C-contiguous NumPy array
    of the same shape and dtype (bfloat16 as ``ml_dtypes.bfloat16``).

  Raises:
    ValueError: the bytes are not a supported PyTorch checkpoint.
    pickle.UnpicklingError: the pickle references an unsupported class.
  """
  if data[:4] == b'PK\x03\x04':
    return _load_zip(data)
  if data[:1] == b'\x80':  # a pickle stream (any protocol)
    return _load_legacy(data)
  if len(data) >= 512 and tarfile.is_tarfile(io.BytesIO(data)):
    raise ValueError(
      'this is a tar-format checkpoint from torch < 0.4, which is not '
      'supported; load it with an old torch and torch.save it again.'
    )
  raise ValueError('not a PyTorch checkpoint (neither zip nor pickle stream).')


def load(path: str | os.PathLike) -> Any:
  """Reads a ``.pth`` file; see :func:`loads`."""
  with open(path, 'rb') as f:
    return loads(f.read())


def load_state_dict(path_or_bytes: str | os.PathLike | bytes) -> dict[str, np.ndarray]:
  """Loads a flat ``{name: array}`` state dict from a path or file bytes.

  Accepts a bare state dict or a training checkpoint that wraps one under
  'state_dict' or 'model' (a common convention).

  Raises:
    ValueError: the file does not hold a flat mapping of names to tensors.
  """
  obj = loads(path_or_bytes) if isinstance(path_or_bytes, bytes) else load(path_or_bytes)
  if isinstance(obj, dict):
    for wrapper in ('state_dict', 'model'):
      if wrapper in obj and isinstance(obj[wrapper], dict):
        obj = obj[wrapper]
        break
  if not isinstance(obj, dict) or not all(
    isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
  ):
    raise ValueError(
      'checkpoint does not hold a flat {name: tensor} state dict; save '
      'model.state_dict() (not the model) with torch.save.'
    )
  return dict(obj)
