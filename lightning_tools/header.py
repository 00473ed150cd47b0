"""The safetensors header: where each tensor lives in a file, read by the one strict parser that every reader
and the writer use.

A header is untrusted input: a file from anywhere must give either tensors whose byte ranges are exactly right or
one `CorruptFile` line, never a traceback, a hang or a huge allocation. The checks follow the reference (Rust)
reader, so we accept what safetensors accepts and refuse what it refuses: a length field of at most 100,000,000
bytes, a UTF-8 JSON object (strict JSON, bounded nesting), `__metadata__` a map of strings to strings (or null),
every tensor with a dtype, a shape of non-negative integers and two integer data offsets (other fields are
ignored, as there), its byte size (elements x item size) fitting in 64 bits and equal to its span, and the spans
tiling the data section exactly. Stricter in one place: a name given twice is refused (safetensors keeps the
last, so two readers could disagree on what the file holds). Dtypes of the format that torch cannot hold here
are refused by name, not called damage.

No torch import: header-only commands (inspect, verify) stay fast.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lightning_tools import dtypes
from lightning_tools.errors import CorruptFile, UserError
from lightning_tools.outputs import os_error

MAX_HEADER = 100_000_000  # the Rust reader's MAX_HEADER_SIZE
_LIMIT = 2 ** 64  # element counts, byte sizes and offsets are u64/usize in the format
# The format's dtypes that `dtypes` (what torch holds here) lacks: sub-byte and microscaling floats, FNUZ float8,
# complex. Valid files, refused by name.
OTHER_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in dtypes.FLOAT_CODES


class Header(NamedTuple):
    """A validated header: tensors (in the header's order, absolute offsets), metadata, where the data starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def corrupt(path: Path | str, what: str) -> CorruptFile:
    return CorruptFile(f"{what}; the file is damaged or not safetensors: download or export it again", path=path)


def read_header(path: Path | str) -> Header:
    """Read and validate the header of the safetensors file at `path` (reads the header bytes only)."""
    path = Path(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"{path}: is a folder, expected a .safetensors file")
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open, a device never end
            raise UserError(f"{path}: not a regular file, expected a .safetensors file")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER and n <= st.st_size - 8:
                    head, length = bytearray(8 + n), head  # filled in place: headers may reach 100 MB
                    head[:8] = length
                    f.readinto(memoryview(head)[8:])
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise os_error(e, path) from None
    return parse_header(head, st.st_size, path=path)


def parse_header(head: bytes | bytearray, file_size: int, *, path: Path | str) -> Header:
    """Validate a header given as the file's first bytes (the length field and at least the JSON it announces)
    and the size of the whole file; raises CorruptFile naming `path` with a one-line reason."""
    path = Path(path)
    if len(head) < 8:
        raise corrupt(path, f"only {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", head)
    if n > file_size - 8:
        raise corrupt(path, f"header claims {n} bytes but the file has {file_size - 8} after the length field")
    if n > MAX_HEADER:
        raise corrupt(path, f"header claims {n:,} bytes, over the format's limit of {MAX_HEADER:,}")
    raw = _json(memoryview(head)[8:8 + n], path)
    if not isinstance(raw, dict):
        raise corrupt(path, "header is not a JSON object")
    metadata = _metadata(raw.pop("__metadata__", None), path)
    data_start = 8 + n
    tensors = [_entry(name, entry, path) for name, entry in raw.items()]
    cursor = 0
    for name, _, _, begin, end in sorted(tensors, key=lambda t: (t[3], t[4])):
        if begin != cursor:
            raise corrupt(path, f"tensor {_short(name)} starts at byte {begin} of the data, expected {cursor} "
                                "(offsets overlap or leave a gap)")
        cursor = end
    if data_start + cursor != file_size:
        what = "truncated" if data_start + cursor > file_size else "has trailing bytes"
        raise corrupt(path, f"{what}: tensors end at byte {data_start + cursor}, the file has {file_size}")
    return Header({name: TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
                   for name, dtype, shape, begin, end in tensors}, metadata, data_start)


class _Duplicate(Exception):
    pass


def _object(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _json(raw: memoryview, path: Path) -> object:
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError:
        raise corrupt(path, "header is not UTF-8 text") from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except _Duplicate as e:
        raise corrupt(path, f"header names {_short(e.args[0])} twice") from None
    except RecursionError:
        raise corrupt(path, "header nests JSON arrays or objects too deeply") from None
    except ValueError:  # JSONDecodeError, NaN/Infinity, integers of more than 4300 digits
        raise corrupt(path, "header is not JSON") from None


def _metadata(value: object, path: Path) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise corrupt(path, f"__metadata__ is a JSON {_kind(value)}, not a map of strings to strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise corrupt(path, f"__metadata__ {_short(key)} is a JSON {_kind(item)}, not a string")
    return value


def _entry(name: str, entry: object, path: Path) -> tuple[str, str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict):
        raise corrupt(path, f"header entry {_short(name)} is a JSON {_kind(entry)}, not a tensor description")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise corrupt(path, f"header entry {_short(name)} has no {' or '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if isinstance(dtype, str) and dtype in OTHER_DTYPES:
        raise UserError(f"{path}: tensor {_short(name)} is {dtype}, a safetensors dtype this tool does not handle "
                        f"(it handles {', '.join(dtypes.ITEM_SIZE)})")
    if not isinstance(dtype, str) or dtype not in dtypes.ITEM_SIZE:
        raise corrupt(path, f"tensor {_short(name)} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise corrupt(path, f"tensor {_short(name)} has shape {_short(shape)}; dimensions must be non-negative "
                            "integers")
    nbytes = _nbytes(shape, dtypes.ITEM_SIZE[dtype])
    if nbytes is None:
        raise corrupt(path, f"tensor {_short(name)} of shape {_short(shape)} has more elements than 64 bits can count")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
        raise corrupt(path, f"tensor {_short(name)} has data_offsets {_short(offsets)}; they must be two non-negative "
                            "integers")
    begin, end = offsets
    if end - begin != nbytes:
        raise corrupt(path, f"tensor {_short(name)} spans {end - begin} bytes but {dtype}{_short(shape)} needs "
                            f"{nbytes}")
    return name, dtype, tuple(shape), begin, end


def _nbytes(shape: list[int], item_size: int) -> int | None:
    """Byte size of a tensor, or None where the running element count or the size in bits leaves 64 bits (the
    reference reader's checked arithmetic, dimension by dimension: [2**63, 2**63, 0] overflows there too)."""
    numel = 1
    for dim in shape:
        numel *= dim
        if numel >= _LIMIT:
            return None
    return numel * item_size if numel * item_size * 8 < _LIMIT else None


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < _LIMIT  # bool is an int subclass, and not a dimension


def _kind(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxdict = 6
_REPR.maxstring = _REPR.maxother = 100
_REPR.maxlevel = 2


def _short(value: object) -> str:
    """A JSON value for a message, shortened: a hostile header may hold megabytes where one number belongs."""
    return _REPR.repr(value)
