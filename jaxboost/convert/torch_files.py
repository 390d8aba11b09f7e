"""Reading PyTorch weight files with a restricted unpickler: no torch needed, no code from the file run.

One loader for every converter. A torch file is a pickle whose tensors point at raw storages:
- zip format (torch >= 1.6, also TorchScript archives such as OpenAI CLIP's RN50.pt): `<root>/data.pkl`
  plus one `<root>/data/<key>` file per storage;
- legacy format (torch < 1.6): five pickles in a row (magic, protocol, system info, the object, storage
  keys), then each storage as an int64 element count and the raw bytes.
The unpickler rebuilds tensors (torch._utils._rebuild_tensor_v2 / _rebuild_parameter, storages by
persistent id) as numpy arrays and plain containers (dict, OrderedDict, Counter, list, tuple, numbers,
strings). Every other global (a class pickled into a Lightning `hyper_parameters` entry, a TorchScript
module class, `os.system`) becomes an inert placeholder that is never called: loading never executes it,
and it is refused by name if it stands where a weight should be. Python's pickle reads every protocol, so
files saved with pickle_protocol=5 (medvlsm's convert_cris_model.py; torch's weights_only loader refuses
them with "Unsupported operand 149") load as well.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _bfloat16():
    import ml_dtypes  # installed with jax
    return ml_dtypes.bfloat16


class PickledObject:
    """Stands for an instance of a global the unpickler refuses to import; records its state, runs nothing."""
    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<refused pickled object {self.global_name}>"


class _StorageType:
    """`torch.FloatStorage` etc. as seen in a persistent id: only its dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _bfloat16() if name == "BFloat16Storage" else _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor(_v2) -> numpy array (a copy, so the storage buffer can go)."""
    if isinstance(storage, _LegacyStorage):  # bytes not read yet: rebuilt by _resolve_legacy
        return _LegacyTensor(storage, (storage_offset, size, stride))
    size, stride = tuple(size), tuple(stride)
    if not size:
        return np.array(storage[storage_offset])
    if 0 in size:
        return np.zeros(size, storage.dtype)
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], size,
                                           tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, *_ignored):
    return data


def _identity(value, *_ignored):
    return value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,  # CRIS.pytorch's MultiStepLR milestones
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    # TorchScript's typed containers (torch/jit/_pickle.py): plain lists and a type tag to drop
    ("torch.jit._pickle", "build_intlist"): list, ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list, ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage, source: str):
        super().__init__(file)
        self._load_storage, self._source, self._storages = load_storage, source, {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and (name in _STORAGE_DTYPES or name == "BFloat16Storage"):
            return _StorageType(name)
        return type(name, (PickledObject,), {"global_name": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {str(pid)[:80]}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._source}: storage {key} has unknown type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = self._load_storage(key, storage_type.dtype, numel)
        storage = self._storages[key]
        if len(pid) > 5 and pid[5] is not None:  # legacy view: (view key, offset, size)
            _, offset, size = pid[5]
            return storage[offset:offset + size]
        return storage


def _load_zip(path: str) -> tuple[object, zipfile.ZipFile]:
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pickles:
        raise ValueError(f"{path}: a zip file without <root>/data.pkl: not a torch checkpoint")
    root = pickles[0].split("/")[0]
    big_endian = f"{root}/byteorder" in names and archive.read(f"{root}/byteorder").strip() == b"big"

    def load_storage(key, dtype, numel):
        data = archive.read(f"{root}/data/{key}")
        dt = np.dtype(dtype).newbyteorder(">") if big_endian and np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
        return np.frombuffer(data, dt)[:numel].astype(np.dtype(dtype), copy=False)

    unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage, path)
    return unpickler.load(), archive


class _LegacyStorage:
    """A legacy-format storage (or a view of one, offset/size in elements) whose bytes follow the object."""

    def __init__(self, key: str, offset: int = 0, size: int | None = None):
        self.key, self.offset, self.size = key, offset, size

    def __getitem__(self, item: slice):
        return _LegacyStorage(self.key, self.offset + item.start, item.stop - item.start)


class _LegacyTensor:
    def __init__(self, storage: _LegacyStorage, args: tuple):
        self.storage, self.args = storage, args


def _resolve_legacy(obj, storages: dict):
    """Replace the _LegacyTensor leaves of dicts/lists/tuples by numpy arrays over the storages read."""
    if isinstance(obj, _LegacyTensor):
        s = storages[obj.storage.key][obj.storage.offset:]
        return _rebuild_tensor(s if obj.storage.size is None else s[:obj.storage.size], *obj.args)
    if isinstance(obj, dict) and not isinstance(obj, collections.Counter):
        return type(obj)((k, _resolve_legacy(v, storages)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve_legacy(v, storages) for v in obj)
    return obj


def _load_legacy(path: str):
    """torch < 1.6 files: magic, protocol, system info, the object, its storage keys, then the storages."""
    dtypes: dict[str, np.dtype] = {}

    def legacy_storage(key, dtype, numel):
        dtypes[key] = np.dtype(dtype)
        return _LegacyStorage(key)

    no_storage = lambda key, dtype, numel: None  # noqa: E731 - the header pickles hold none
    with open(path, "rb") as f:
        try:
            magic = _RestrictedUnpickler(f, no_storage, path).load()
        except Exception:  # noqa: BLE001 - not a pickle: reported below
            magic = None
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a legacy torch "
                             "file) and not a .safetensors file")
        for _ in range(2):  # protocol version, system info
            _RestrictedUnpickler(f, no_storage, path).load()
        obj = _RestrictedUnpickler(f, legacy_storage, path).load()
        storages = {}
        for key in _RestrictedUnpickler(f, no_storage, path).load():
            dtype = dtypes[str(key)]
            count = int(np.frombuffer(f.read(8), "<i8")[0])
            data = f.read(count * dtype.itemsize)
            if len(data) != count * dtype.itemsize:
                raise ValueError(f"{path}: truncated (storage {key} ends early)")
            storages[str(key)] = np.frombuffer(data, dtype)
    return _resolve_legacy(obj, storages)


def _script_module_tables(archive: zipfile.ZipFile) -> dict[str, set[str]]:
    """TorchScript archive -> {class qualname: its parameter and buffer names}, read from the class
    declarations' `__parameters__ = [...]` / `__buffers__ = [...]` lines (text only, nothing is run).
    Other tensor attributes (OpenAI CLIP's attn_mask) are not in torch's state_dict either."""
    tables = {}
    for name in archive.namelist():
        parts = name.split("/")
        if len(parts) < 3 or parts[1] != "code" or not name.endswith(".py"):
            continue
        module = ".".join(parts[2:])[:-len(".py")]
        text = archive.read(name).decode("utf-8", "replace")
        for cls, params, buffers in re.findall(
                r"^class (\w+)\(Module\):\n\s+__parameters__ = \[(.*?)\]\n\s+__buffers__ = \[(.*?)\]",
                text, flags=re.M):
            tables[f"{module}.{cls}"] = set(re.findall(r'"([^"]*)"', params + buffers))
    return tables


def _script_state_dict(module: PickledObject, tables: dict, prefix: str = "") -> dict:
    """A TorchScript module's pickled attributes -> {dotted name: array} for its parameters and buffers."""
    out = {}
    state = module.state if isinstance(module.state, dict) else {}
    names = tables.get(module.global_name)
    for key, value in state.items():
        if isinstance(value, PickledObject) and value.global_name.startswith("__torch__."):
            out.update(_script_state_dict(value, tables, f"{prefix}{key}."))
        elif isinstance(value, np.ndarray) and (names is None or key in names):
            out[prefix + key] = value
    return out


def read_torch_file(path: str):
    """A torch file -> its object with tensors as numpy arrays and refused globals as PickledObject;
    a TorchScript archive -> its module's state dict."""
    if zipfile.is_zipfile(path):
        obj, archive = _load_zip(path)
        if isinstance(obj, PickledObject) and obj.global_name.startswith("__torch__."):
            return _script_state_dict(obj, _script_module_tables(archive))
        return obj
    return _load_legacy(path)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None


def _strip_common_prefix(sd: dict) -> dict:
    # "module." from DistributedDataParallel (CRIS.pytorch's train.py), "net." from medvlsm's Lightning module
    for prefix in ("module.", "net."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """.safetensors, a torch file (zip or legacy, any pickle protocol) or a TorchScript archive ->
    {name: numpy; floating tensors as float32}. A training checkpoint's "state_dict"/"model" entry (CRIS.pytorch,
    Lightning, ALBEF) is taken and its optimizer, scheduler or hyper-parameter entries ignored; DDP's "module."
    and Lightning's "net." prefixes are removed. A pickled object among the weights or a NaN/inf weight is an
    error naming the tensor."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give the weight file inside it")
    if path.endswith(".safetensors"):
        sd = _read_safetensors(path)
    else:
        try:
            obj = read_torch_file(path)
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict, found {_describe(obj)}")
        refused = [f"{k} ({v.global_name})" for k, v in obj.items() if isinstance(v, PickledObject)]
        if refused:
            raise ValueError(f"{path}: entries are pickled objects, not tensors (not unpickled): {refused[:5]}")
        sd = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    sd = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) or v.dtype == _bfloat16() else v
          for k, v in _strip_common_prefix(sd).items()}
    bad = [k for k, v in sd.items() if v.dtype == np.float32 and not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors hold NaN or inf: {bad[:5]}")
    return sd


def _describe(obj) -> str:
    if isinstance(obj, PickledObject):
        return f"a pickled {obj.global_name} object (not unpickled)"
    return type(obj).__name__
