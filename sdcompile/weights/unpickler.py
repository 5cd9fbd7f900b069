"""A restricted unpickler for `torch.save` zip archives: the checkpoint security boundary.

A pickle names the globals it needs (`module.name`) and a plain unpickler imports and calls them,
so opening a `.ckpt` can run any code its author chose. Here each global is resolved from a fixed
table instead (`resolve_global`): tensor rebuilders and plain types are allowed, the classes that
training libraries store (Lightning, OmegaConf, numpy) become an inert stand-in, and anything else
is refused with a UserError naming it. Nothing named by the file is ever imported. Storages are
read from the archive's records with their declared sizes checked: a record shorter than its storage
is refused, naming the entry whose tensor it backs.
"""
from __future__ import annotations

import _compat_pickle
import dataclasses
import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from sdcompile.weights.safetensors_extent import REDOWNLOAD_FIX
from sdrun.errors import UserError

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"


class InertStandIn:
    """Stands in for a class or function that training code stored in a checkpoint (Lightning callbacks,
    OmegaConf configs, numpy scalars): accepts any construction and keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


# Roots of modules whose globals become `InertStandIn`; nothing from them is imported or called.
INERT_MODULE_ROOTS = frozenset({"pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "typing"})
INERT_GLOBALS = frozenset({
    ("argparse", "Namespace"), ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("collections", "defaultdict"), ("collections", "deque"),
})
TORCH_DTYPES = {
    name: getattr(torch, name) for name in (
        "float16", "float32", "float64", "bfloat16", "half", "float", "double",
        "int8", "int16", "int32", "int64", "uint8", "bool", "short", "int", "long")
}
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True, eq=False)
class ShortRecord:
    """Stands in for a storage whose record holds fewer bytes than declared. The tensor rebuilders pass it
    on in place of the tensor, so the entry it ends up under can be named."""

    record: str
    declared: int  # bytes: element count × element size
    found: int  # bytes in the record


class ShortRecordError(Exception):
    def __init__(self, short: ShortRecord, key: str | None):
        super().__init__(f"record {short.record} has {short.found} bytes, {short.declared} expected")
        self.short, self.key = short, key


def _rebuild_tensor(storage: torch.Tensor | ShortRecord, offset: int, size, stride,
                    *_ignored) -> torch.Tensor | ShortRecord:
    """(storage, offset, size, stride, [requires_grad, hooks, metadata]) -> a view; bounds are checked."""
    if isinstance(storage, ShortRecord):
        return storage
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_tensor_v3(storage: torch.Tensor | ShortRecord, offset: int, size, stride, requires_grad, hooks,
                       dtype: torch.dtype, *_ignored) -> torch.Tensor | ShortRecord:
    if isinstance(storage, torch.Tensor) and storage.dtype != dtype:
        storage = storage.view(dtype)
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: torch.Tensor, *_ignored) -> torch.Tensor:
    return data


def _encoded(text: str, encoding: str = "utf-8") -> bytes:
    """Pickle protocol 2 stores bytes as `_codecs.encode(text, "latin1")`."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError(f"unsupported bytes encoding {encoding!r:.40}")
    return text.encode(encoding)


SAFE_GLOBALS: dict[tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): _encoded,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


def python3_name(module: str, name: str) -> tuple[str, str]:
    """Pickle protocol 2 (torch.save's) writes Python 2 names (`__builtin__`, `commands`); map them back
    as `pickle.Unpickler.find_class` does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RefusedGlobal(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


def resolve_global(module: str, name: str) -> object:
    """What a pickle's GLOBAL `module.name` becomes: a tensor rebuilder, a plain type, an inert stand-in,
    or a refusal. Nothing named by the file is imported."""
    if (module, name) in SAFE_GLOBALS:
        return SAFE_GLOBALS[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(STORAGE_DTYPES[name])
    if module == "torch" and name in TORCH_DTYPES:
        return TORCH_DTYPES[name]
    if module.split(".")[0] in INERT_MODULE_ROOTS or (module, name) in INERT_GLOBALS:
        return InertStandIn
    raise RefusedGlobal(module, name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, read_storage: Callable[[str, torch.dtype, int], torch.Tensor | ShortRecord]):
        super().__init__(file, encoding="utf-8")
        self._read_storage = read_storage

    def find_class(self, module: str, name: str) -> object:
        return resolve_global(*python3_name(module, name))

    def persistent_load(self, pid) -> torch.Tensor | ShortRecord:
        """('storage', storage type, record key, location, element count) -> a 1-D tensor of that storage."""
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        return self._read_storage(str(pid[2]), pid[1].dtype, pid[4])


def read_pickled(path: Path) -> object:
    """The object a `torch.save` zip archive holds, rebuilt without running code from the file."""
    check_zip_magic(path)
    try:
        with open_archive(path) as archive:
            return _unpickle_archive(archive)
    except RefusedGlobal as refused:
        raise UserError(f"{path} names `{refused.qualified_name}`, which loading would have to import or call; "
                        "refused (checkpoints are read without running code from them).",
                        expected="tensors, plain containers and training records (Lightning, OmegaConf, numpy)",
                        got=f"pickle global {refused.qualified_name}",
                        fix="use a .safetensors copy of this checkpoint; only if you trust its author, convert it "
                            "with torch.load(weights_only=False) and safetensors.torch.save_file") from None
    except ShortRecordError as err:
        raise short_record_error(path, err.short, err.key) from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError,
            RuntimeError, zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{path} is damaged or not a model checkpoint: {type(err).__name__}: {err}.",
                        expected="a torch.save archive holding a state_dict",
                        fix="download or copy the file again") from None


def check_zip_magic(path: Path) -> None:
    with open(path, "rb") as file:
        magic = file.read(len(ZIP_MAGIC))
    if magic != ZIP_MAGIC:
        got = "the legacy (pre-1.6) torch format" if magic[:1] == PICKLE_PROTO else f"a file starting with {magic!r}"
        raise UserError(f"{path} is not a torch zip archive.",
                        expected="a checkpoint written by torch.save (PyTorch >= 1.6 zip format)", got=got,
                        fix="convert it to .safetensors in an environment you trust, or download a .safetensors copy")


def open_archive(path: Path) -> zipfile.ZipFile:
    """The zip archive at `path`; a file cut short has lost the central directory at its end."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError) as err:
        raise UserError(f"{path} is truncated or not a zip checkpoint: {err}.",
                        expected="a complete torch.save zip archive, ending in its central directory",
                        got=f"a file of {path.stat().st_size} bytes without a readable central directory",
                        fix=REDOWNLOAD_FIX) from None


def short_record_error(path: Path, short: ShortRecord, key: str | None) -> UserError:
    what = f"tensor {key!r}" if key is not None else f"storage record {short.record}"
    return UserError(f"{path} is truncated or damaged: the data of {what} is incomplete.",
                     expected=f"{short.declared} bytes in record {short.record}", got=f"{short.found} bytes",
                     fix=REDOWNLOAD_FIX)


def _unpickle_archive(archive: zipfile.ZipFile) -> object:
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise pickle.UnpicklingError(f"expected one <archive>/data.pkl record, found {len(pickles)}")
    root = pickles[0][: -len("data.pkl")]
    byteorder = _record_text(archive, root + "byteorder") or "little"
    if byteorder != "little":
        raise pickle.UnpicklingError(f"byte order {byteorder!r} is not supported")
    storages: dict[str, torch.Tensor | ShortRecord] = {}

    def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor | ShortRecord:
        if key not in storages:
            storages[key] = _read_storage_record(archive, f"{root}data/{key}", dtype, numel)
        return storages[key]

    with archive.open(pickles[0]) as data:
        obj = _RestrictedUnpickler(io.BytesIO(data.read()), read_storage).load()
    short = next((s for s in storages.values() if isinstance(s, ShortRecord)), None)
    if short is not None:
        raise ShortRecordError(short, key_of(obj, short))
    return obj


def key_of(obj: object, target: object) -> str | None:
    """The innermost dict key under which `target` sits in `obj`'s nested dicts, lists and tuples."""
    pending: list[tuple[str | None, object]] = [(None, obj)]
    seen: set[int] = set()
    while pending:
        key, value = pending.pop()
        if value is target:
            return key
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            pending += reversed([(str(k), v) for k, v in value.items()])
        elif isinstance(value, (list, tuple)):
            pending += reversed([(key, v) for v in value])
    return None


def _record_text(archive: zipfile.ZipFile, name: str) -> str | None:
    try:
        return archive.read(name).decode().strip()
    except KeyError:
        return None


def _read_storage_record(archive: zipfile.ZipFile, name: str, dtype: torch.dtype,
                         numel: int) -> torch.Tensor | ShortRecord:
    """The raw bytes of one storage record as a 1-D tensor of `numel` elements of `dtype`."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    data = bytearray(archive.read(name))
    if len(data) < nbytes:
        return ShortRecord(name, nbytes, len(data))
    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8, count=nbytes).view(dtype)
