"""ONNX graphs whose weights stay on disk: load the structure, run passes, write one data file.

A model held "as structure" keeps every tensor of at least `SPILL_BYTES` in an external-data file
beside its `model.onnx` (ONNX's external data: location relative to the model's directory, byte
offset and length); only the graph and the small constants are in memory. Passes run on it inside
`inside(directory)`, so onnx-graphsurgeon and ONNX Runtime find the external tensors they read
(relative locations resolve against the working directory when a model has no path of its own).
Tensors a pass creates are in memory until `spill` writes them out with the others. Writing copies
external bytes in bounded chunks and never serializes a weight-sized protobuf, so no step holds
more than the weights a pass has just created.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from sdrun.external_data import external_info, read_external
from onnx.external_data_helper import _get_all_tensors, uses_external_data

PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom for the graph itself
SPILL_BYTES = 1024  # tensors this large or larger live in the data file; smaller stay in the graph
ALIGNMENT = 4096  # data-file offsets, so ONNX Runtime can map tensors in place
CHUNK_BYTES = 64 * 1024**2


def data_file_of(model_path: Path) -> Path:
    """`model.onnx` -> `model.onnx.data`: the one external-data file beside a graph."""
    return model_path.with_name(model_path.name + ".data")


@contextlib.contextmanager
def inside(directory: Path) -> Iterator[None]:
    """Run with `directory` as the working directory (where a structure's data file lives)."""
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def load_structure(path: Path) -> onnx.ModelProto:
    """The graph at `path` without loading its external data (tensors embedded in it are loaded)."""
    return onnx.load(str(path), load_external_data=False)


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data, in memory or external."""
    if uses_external_data(tensor):
        return int(external_info(tensor)["length"])
    return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()


def data_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_nbytes(t) for t in _get_all_tensors(model))


def spill(model: onnx.ModelProto, model_path: Path, source_dir: Path | None,
          threshold: int = SPILL_BYTES) -> list[Path]:
    """Write `model` to `model_path`, every tensor of at least `threshold` bytes into its one data file.

    External tensors are read from `source_dir` (the directory their locations are relative to) and
    copied chunk by chunk (smaller ones are embedded); in-memory ones are written and dropped from the
    proto. `model` is
    changed in place to describe the written files. The data file must not be a source: write to
    another directory than `source_dir`. Returns the files written.
    """
    model_path = Path(model_path)
    data = data_file_of(model_path)
    if source_dir is not None and data.resolve() == (Path(source_dir) / data.name).resolve():
        raise ValueError(f"spill would overwrite its own source {data}")
    tensors = list(_get_all_tensors(model))
    for tensor in tensors:
        if uses_external_data(tensor) and tensor_nbytes(tensor) < threshold:
            _embed_tensor(tensor, Path(source_dir))
    moved = [t for t in tensors if tensor_nbytes(t) >= threshold]
    if not moved:
        onnx.save_model(model, str(model_path))
        return [model_path]
    with open(data, "wb") as target:
        for tensor in moved:
            _align(target)
            offset = target.tell()
            if uses_external_data(tensor):
                _copy_external(tensor, Path(source_dir), target)
            else:
                target.write(tensor.raw_data if tensor.HasField("raw_data") else _as_raw(tensor))
            _point_to(tensor, data.name, offset, target.tell() - offset)
    onnx.save_model(model, str(model_path))
    return [model_path, data]


def _embed_tensor(tensor: TensorProto, source_dir: Path) -> None:
    raw = read_external(tensor, source_dir)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = raw


def save_graph(model: onnx.ModelProto, path: Path, source_dir: Path | None, always_external: bool = False) -> list[Path]:
    """The bundle's form of a graph: one `model.onnx`, plus one `model.onnx.data` when its tensors would
    pass protobuf's limit (or `always_external`). `model` is consumed. Returns the files written."""
    if always_external or data_bytes(model) >= PROTOBUF_LIMIT:
        return spill(model, path, source_dir)
    write_embedded(model, path, source_dir)
    return [Path(path)]


def write_embedded(model: onnx.ModelProto, path: Path, source_dir: Path | None) -> None:
    """One self-contained `model.onnx`, written one initializer at a time.

    The graph without its initializers is serialized first; each initializer follows as its own
    `graph { initializer { ... } }` fragment, which protobuf parsers merge into the one graph, in
    order (an embedded message field that appears more than once is merged). So memory holds one
    tensor's bytes, never the whole serialized model. The file must stay under protobuf's 2 GiB.
    """
    structure = onnx.ModelProto()
    _copy_fields(model, structure, skip="graph")
    _copy_fields(model.graph, structure.graph, skip="initializer")
    with open(path, "wb") as target:
        target.write(structure.SerializeToString())
        for tensor in model.graph.initializer:
            inline = _inlined(tensor, source_dir) if uses_external_data(tensor) else tensor
            fragment = _field(_GRAPH_INITIALIZER, inline.SerializeToString())
            target.write(_field(_MODEL_GRAPH, fragment))


_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5  # field numbers: ModelProto.graph, GraphProto.initializer


def _copy_fields(source, target, skip: str) -> None:
    """Every set field of protobuf message `source` but `skip` into `target` (of the same type)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _inlined(tensor: TensorProto, source_dir: Path) -> TensorProto:
    """A copy of an external tensor with its bytes in `raw_data`."""
    inline = TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = read_external(tensor, source_dir)
    return inline


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: key (number << 3 | wire type 2), varint length, payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class CreatedTensors:
    """Where a pass puts the large tensors it creates (the fp16 copies of the weights): appended to one
    data file in `directory`, the directory the pass runs in, and held as lazily loaded constants that
    refer to it, so memory does not hold them; `directory` None keeps them in memory."""

    FILE_NAME = "created.data"

    def __init__(self, directory: Path | None):
        self.directory = directory

    def constant(self, name: str, values: np.ndarray) -> gs.Constant:
        if self.directory is None or values.nbytes < SPILL_BYTES:
            return gs.Constant(name, values)
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(values.dtype), dims=values.shape)
        with open(Path(self.directory) / self.FILE_NAME, "ab") as target:
            _align(target)
            offset = target.tell()
            target.write(np.ascontiguousarray(values).tobytes())
        _point_to(proto, self.FILE_NAME, offset, values.nbytes)
        return gs.Constant(name, LazyValues(proto))


def _copy_external(tensor: TensorProto, source_dir: Path, target) -> None:
    info = external_info(tensor)
    remaining = int(info["length"])
    with open(source_dir / info["location"], "rb") as source:
        source.seek(int(info.get("offset", 0)))
        while remaining:
            chunk = source.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                raise ValueError(f"external data of {tensor.name} ends {remaining} bytes early in {info['location']}")
            target.write(chunk)
            remaining -= len(chunk)


def _as_raw(tensor: TensorProto) -> bytes:
    """A tensor stored in typed fields (float_data, int64_data, ...) as raw little-endian bytes."""
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    raw = numpy_helper.from_array(array, tensor.name).raw_data
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    return raw


def _point_to(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _align(target) -> None:
    padding = -target.tell() % ALIGNMENT
    if padding:
        target.write(b"\0" * padding)
