"""A `.safetensors` file checked from its header alone: a file cut short (an interrupted download or
copy) is refused, naming the tensor it cuts, before any tensor data is read.

Layout (the safetensors format): an 8-byte little-endian header length N, N bytes of JSON mapping each
tensor name to `{"dtype", "shape", "data_offsets": [begin, end)}`, then the data; offsets are bytes
from the start of the data, i.e. from file byte 8 + N.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from sdrun.errors import UserError

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses longer headers
METADATA_KEY = "__metadata__"
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
REDOWNLOAD_FIX = "download the file again and compare its sha256 with the one its publisher lists"


@dataclasses.dataclass(frozen=True)
class TensorExtent:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # bytes from the start of the data
    end: int  # exclusive


def check_safetensors_extent(path: Path) -> None:
    """Raise a UserError unless every tensor of `path` lies inside the file and spans dtype size × element
    count bytes. Reads the header only."""
    size = path.stat().st_size
    header_length, header = read_header(path, size)
    data_start = HEADER_LENGTH_BYTES + header_length
    extents = tensor_extents(path, header)
    for extent in extents:
        check_declared_size(path, extent)
    cut = first_cut(extents, size - data_start)
    if cut is not None:
        raise truncation_error(path, cut, extents, data_start, size)


def read_header(path: Path, size: int) -> tuple[int, dict]:
    """(header length N in bytes, the parsed JSON header)."""
    with open(path, "rb") as file:
        prefix = file.read(HEADER_LENGTH_BYTES)
        length = int.from_bytes(prefix, "little")
        check_header_length(path, prefix, length, size)
        return length, parse_header(path, file.read(length))


def check_header_length(path: Path, prefix: bytes, length: int, size: int) -> None:
    if len(prefix) < HEADER_LENGTH_BYTES or length > MAX_HEADER_BYTES:
        raise UserError(f"{path} is truncated or not a .safetensors file: it does not start with a header length.",
                        expected=f"an 8-byte little-endian header length of at most {MAX_HEADER_BYTES} bytes",
                        got=f"a file of {size} bytes starting with {prefix!r}", fix=REDOWNLOAD_FIX)
    if HEADER_LENGTH_BYTES + length > size:
        raise UserError(f"{path} is truncated: its header runs past the end of the file.",
                        expected=f"a {length}-byte header ending at byte {HEADER_LENGTH_BYTES + length}",
                        got=f"a file of {size} bytes", fix=REDOWNLOAD_FIX)


def parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        header, reason = None, f"{type(err).__name__}: {err}"
    else:
        reason = f"a JSON {type(header).__name__}"
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a .safetensors file: its header is not a JSON object.",
                        expected="a JSON object mapping tensor names to dtype, shape and data_offsets",
                        got=reason, fix=REDOWNLOAD_FIX)
    return header


def tensor_extents(path: Path, header: dict) -> list[TensorExtent]:
    extents = []
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        extent = parsed_extent(name, entry)
        if extent is None:
            raise UserError(f"{path} has a malformed header entry for tensor {name!r}.",
                            expected='{"dtype": str, "shape": [int, …], "data_offsets": [begin, end]}, '
                                     "0 <= begin <= end", got=f"{entry!r:.200}", fix=REDOWNLOAD_FIX)
        extents.append(extent)
    return extents


def parsed_extent(name: str, entry: object) -> TensorExtent | None:
    """The extent a header entry declares; None when the entry is malformed."""
    if not isinstance(entry, dict):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(dtype, str) and _int_list(shape) and _int_list(offsets) and len(offsets) == 2):
        return None
    if min(shape, default=0) < 0 or not 0 <= offsets[0] <= offsets[1]:
        return None
    return TensorExtent(name, dtype, tuple(shape), offsets[0], offsets[1])


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def check_declared_size(path: Path, extent: TensorExtent) -> None:
    """Offsets must span exactly the tensor's bytes; dtypes we do not know are left to safetensors."""
    element_bytes = DTYPE_BYTES.get(extent.dtype)
    if element_bytes is None:
        return
    nbytes = element_bytes * math.prod(extent.shape)
    if extent.end - extent.begin != nbytes:
        raise UserError(f"{path} has an inconsistent header: tensor {extent.name!r} does not span its size.",
                        expected=f"{nbytes} bytes ({extent.dtype} × {list(extent.shape)})",
                        got=f"data_offsets [{extent.begin}, {extent.end}) ({extent.end - extent.begin} bytes)",
                        fix=REDOWNLOAD_FIX)


def first_cut(extents: list[TensorExtent], data_bytes: int) -> TensorExtent | None:
    """The tensor with the lowest offset among those ending past the `data_bytes` the file holds."""
    cut = [extent for extent in extents if extent.end > data_bytes]
    return min(cut, key=lambda extent: extent.begin, default=None)


def truncation_error(path: Path, cut: TensorExtent, extents: list[TensorExtent], data_start: int,
                     size: int) -> UserError:
    incomplete = sum(extent.end > size - data_start for extent in extents)
    where = "inside" if data_start + cut.begin < size else "before"
    complete_size = data_start + max(extent.end for extent in extents)
    return UserError(
        f"{path} is truncated: it ends {where} tensor {cut.name!r} ({incomplete} of {len(extents)} tensors "
        "are incomplete).",
        expected=f"{cut.name} ({cut.dtype} {list(cut.shape)}) at bytes [{data_start + cut.begin}, "
                 f"{data_start + cut.end}) of a {complete_size}-byte file",
        got=f"a file of {size} bytes", fix=REDOWNLOAD_FIX)
