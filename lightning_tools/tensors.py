"""Lazy safetensors reading, an incremental writer, atomic outputs and fast hashing.

A checkpoint is a named collection of tensors whose shapes and dtypes come from the safetensors header; data
is read only when a tensor is asked for. The writer plans the header first and then takes tensors one at a
time, so peak memory is a few tensors, never the model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_tools import dtypes, outputs
from lightning_tools.errors import UserError
from lightning_tools.header import TensorInfo, corrupt, parse_header, read_header
from lightning_tools.pickles import load_tensors, not_weights, sniff
from lightning_tools.progress import bar

if TYPE_CHECKING:
    import torch

_CHUNK = 16 * 1024 * 1024


class _WeightsFile(Mapping):
    """One weights file as a mapping from key to what its header (or its loaded pickle) says of the tensor."""

    path: Path
    tensors: dict
    metadata: dict[str, str]

    def __getitem__(self, key: str):
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


class SafetensorsFile(_WeightsFile):
    """A lazy, validated view of one .safetensors file; key -> TensorInfo."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = read_header(self.path)

    def load(self, key: str) -> "torch.Tensor":
        return read_tensor(self.tensors[key])


@dataclass(frozen=True)
class PickleTensor:
    """One tensor of a pickle: known by dtype and shape; its bytes have no fixed place to copy from."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        return self.dtype in dtypes.FLOAT_CODES


class PickleFile(_WeightsFile):
    """The tensors of a PyTorch checkpoint (read safely, see `pickles`); key -> PickleTensor. Files in torch's zip
    format are memory-mapped, so only what the stream reads is in memory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.metadata = {}
        self._loaded = load_tensors(self.path)
        self.tensors = {k: PickleTensor(k, dtypes.code_of(t.dtype), tuple(t.shape)) for k, t in self._loaded.items()}

    def load(self, key: str) -> "torch.Tensor":
        return self._loaded[key]


class TensorSource(Mapping[str, TensorInfo]):
    """Several weight files seen as one collection (a sharded component, or a single file). Safetensors files
    are read lazily; PyTorch pickles (`PickleFile`) fit the same mapping."""

    def __init__(self, files: Sequence[SafetensorsFile | PickleFile]):
        self.files = list(files)
        self._owner: dict[str, SafetensorsFile | PickleFile] = {}
        for f in self.files:
            for key in f:
                if key in self._owner:
                    raise UserError(f"{f.path}: tensor {key!r} also appears in {self._owner[key].path}")
                self._owner[key] = f

    @classmethod
    def open(cls, path: Path | str) -> "TensorSource":
        """A weights file, a `*.index.json` of shards, or a component folder holding either."""
        return cls([open_file(p) for p in weight_files(Path(path))])

    @property
    def metadata(self) -> dict[str, str]:
        return self.files[0].metadata if len(self.files) == 1 else {}

    def __getitem__(self, key: str) -> TensorInfo:
        return self._owner[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def load(self, key: str) -> "torch.Tensor":
        return self._owner[key].load(key)

    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.values())


def open_file(path: Path) -> SafetensorsFile | PickleFile:
    """One weights file, by what its bytes are: safetensors, a PyTorch pickle (read safely), or an error that
    names what else it is (an image, JSON, text)."""
    if not path.is_file():
        raise UserError("no such file" if not path.exists() else "is a folder, expected a weights file", path=path)
    kind = sniff(path)
    if kind in ("zip-pickle", "pickle"):
        return PickleFile(path)
    if kind in ("safetensors", "unknown") or path.suffix == ".safetensors" and kind == "empty":
        return SafetensorsFile(path)
    raise not_weights(path, kind)


# Weight file names in a diffusers component folder, preferred first: safetensors (diffusers' and
# transformers' names), then the pickles older savers wrote.
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin")


def weight_files(path: Path) -> list[Path]:
    """The weight files behind a file, an index.json, or a diffusers component folder.

    In a folder the full-precision weights win over a `.fp16` variant, which is used only when alone, and
    safetensors win over pickles.
    """
    if path.is_file():
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError("not a valid weights index (no weight_map)", path=path) from None
            return [path.parent / name for name in dict.fromkeys(weight_map.values())]
        return [path]
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    for name in _WEIGHT_NAMES:
        stem, suffix = name.rsplit(".", 1)
        for variant in ("", ".fp16"):
            index = path / f"{stem}.{suffix}.index{variant}.json"
            if index.is_file():
                return weight_files(index)
            single = path / f"{stem}{variant}.{suffix}"
            if single.is_file():
                return [single]
    raise UserError("no weights found (no diffusion_pytorch_model.safetensors, model.safetensors or their "
                    ".bin forms)", path=path)


def read_raw(info: TensorInfo, chunk: int = _CHUNK) -> Iterator[memoryview]:
    """The tensor's bytes exactly as stored, in chunks: copying them needs no decode or encode."""
    with open(info.path, "rb", buffering=0) as f:
        f.seek(info.start)
        left = info.nbytes
        buf = bytearray(min(chunk, max(left, 1)))
        view = memoryview(buf)
        while left:
            n = f.readinto(view[: min(left, len(buf))])
            if not n:
                raise corrupt(info.path, f"ended inside tensor {info.name!r}")
            left -= n
            yield view[:n]


def read_tensor(info: TensorInfo, into: bytearray | None = None) -> "torch.Tensor":
    """A stored tensor read with plain file reads, into `into` (reused scratch, at least info.nbytes) if given.

    Not a memory map: every mapped page a stream touches would stay in the process's resident memory, so
    merging a 7 GB model that way peaks at 7 GB RSS.
    """
    data = bytearray(info.nbytes) if into is None else into
    view = memoryview(data)
    with open(info.path, "rb", buffering=0) as f:
        f.seek(info.start)
        done = 0
        while done < info.nbytes:
            n = f.readinto(view[done:info.nbytes])
            if not n:
                raise corrupt(info.path, f"ended inside tensor {info.name!r}")
            done += n
    import torch

    dtype = dtypes.torch_dtype(info.dtype)
    if not info.numel:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=info.numel).reshape(info.shape)


# struct formats of the dtypes a scalar setting (a LoRA's alpha) comes in; BF16 is the top half of an F32.
_SCALAR_FORMAT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
                  "U64": "<Q", "U32": "<I", "U16": "<H", "U8": "<B", "BOOL": "<?"}


def read_scalars(infos: Iterable[TensorInfo]) -> dict[str, float]:
    """One-element tensors' values by name (a LoRA's alphas), decoded without torch and read through one open
    file per source, so reading a LoRA stays header-cheap."""
    values: dict[str, float] = {}
    handles: dict[Path, object] = {}
    try:
        for info in infos:
            if info.numel != 1:
                raise corrupt(info.path, f"tensor {info.name!r} should hold one number but has shape "
                                          f"{list(info.shape)}")
            if info.dtype != "BF16" and info.dtype not in _SCALAR_FORMAT:
                raise corrupt(info.path, f"tensor {info.name!r} is {info.dtype}, not a number type for a setting")
            f = handles.get(info.path) or handles.setdefault(info.path, open(info.path, "rb"))
            f.seek(info.start)
            raw = f.read(info.nbytes)
            if len(raw) != info.nbytes:
                raise corrupt(info.path, f"ended inside tensor {info.name!r}")
            values[info.name] = struct.unpack("<f", b"\0\0" + raw)[0] if info.dtype == "BF16" else \
                float(struct.unpack(_SCALAR_FORMAT[info.dtype], raw)[0])
    finally:
        for f in handles.values():
            f.close()
    return values


def tensor_bytes(t: "torch.Tensor") -> memoryview:
    """A tensor's little-endian bytes as safetensors stores them (zero-copy for contiguous CPU tensors)."""
    import torch

    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


# Safetensors metadata, or a function of the data section's sha256 giving it (see SafetensorsWriter).
Metadata = Mapping[str, str] | Callable[[str], Mapping[str, str]]


@dataclass(frozen=True)
class Planned:
    """One tensor the writer will receive: the header is built from these before any data is written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.ITEM_SIZE[self.dtype]


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, in the planned order.

    The header is written first from the plan and rewritten at the end, when it may say more than was known at
    the start: `metadata` may be a function of the sha256 of the data section (called with 64 zeros for the
    first header and with the real hash at the end), so a file can carry its own data hash, or a report known
    only when the data is written, while this I/O layer knows nothing of what the keys mean; and planned tensors
    may be left out (`skip`). The final header must fit in the first one plus `room` bytes. Use as a context
    manager on a path from `outputs.output`, or on a final path (it then writes to a temporary name itself).
    Stored tensors copied unchanged (`copy`) move inside the kernel with copy_file_range, as `cp` does, where
    the OS and filesystems allow it.
    """

    def __init__(self, path: Path | str, plan: Sequence[Planned], metadata: Metadata | None = None,
                 overwrite: bool = False, room: int = 0):
        self.path = Path(path)
        self.plan = list(plan)
        self.room = room
        self._skipped: set[str] = set()
        self._metadata_of = metadata if callable(metadata) else None
        self.metadata = self._metadata("0" * 64) if callable(metadata) else dict(metadata or {})
        self.overwrite = overwrite
        self._next = 0
        self._pending = 0
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._sources: dict[Path, int] = {}
        self.sha256: str | None = None

    def _metadata(self, sha256: str) -> dict[str, str]:
        return {k: str(v) for k, v in self._metadata_of(sha256).items()}

    def _written(self) -> list[Planned]:
        return [p for p in self.plan if p.name not in self._skipped]

    def _header(self, room: int = 0) -> bytes:
        """The header JSON padded with spaces to a multiple of 8 bytes, and to at least `room` bytes."""
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for p in self._written():
            header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * max(0, room - len(raw))
        return raw + b" " * (-len(raw) % 8)

    def __enter__(self) -> "SafetensorsWriter":
        names = [p.name for p in self.plan]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the write plan")
        if unknown := [p for p in self.plan if p.dtype not in dtypes.ITEM_SIZE]:
            raise ValueError(f"{unknown[0].name}: planned dtype {unknown[0].dtype!r} is not one the format holds")
        header = self._checked(self._header())
        header = self._header(len(header) + self.room)
        self._header_len = len(header)
        self._atomic = outputs.output(self.path, overwrite=self.overwrite)
        self._tmp = self._atomic.__enter__()
        try:
            # Unbuffered: kernel copies and plain writes then share one file position.
            self._file = open(self._tmp, "wb", buffering=0)
            self._hasher = _OrderedHash()
            self._write_all(struct.pack("<Q", len(header)) + header)
        except BaseException as e:
            if hasattr(self, "_file"):
                self._file.close()
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _checked(self, header: bytes) -> bytes:
        """The header, after the reader's own validation: what it would refuse is never written."""
        try:
            parse_header(struct.pack("<Q", len(header)) + header,
                         8 + len(header) + sum(p.nbytes for p in self._written()), path=self.path)
        except UserError as e:
            raise ValueError(f"refusing to write a header the reader refuses: {e.message}") from None
        return header

    def write(self, name: str, data: "torch.Tensor | bytes | memoryview") -> None:
        """Append the next planned tensor: a torch tensor of the planned dtype, or its raw bytes."""
        planned = self.plan[self._next]
        if name != planned.name:
            raise ValueError(f"expected tensor {planned.name!r} next, got {name!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            if dtypes.code_of(data.dtype) != planned.dtype or tuple(data.shape) != planned.shape:
                raise ValueError(f"{name}: got {data.dtype}{list(data.shape)}, planned {planned.dtype}{list(planned.shape)}")
            data = tensor_bytes(data)
        self.write_bytes(data)
        if self._pending != planned.nbytes:
            raise ValueError(f"{name}: wrote {self._pending} bytes, planned {planned.nbytes}")
        self._pending = 0
        self._next += 1

    def skip(self, name: str) -> None:
        """Leave the next planned tensor out of the file (its header entry goes; its room stays as padding)."""
        planned = self.plan[self._next]
        if name != planned.name:
            raise ValueError(f"expected tensor {planned.name!r} next, got {name!r}")
        self._skipped.add(name)
        self._next += 1

    def write_bytes(self, chunk: bytes | memoryview) -> None:
        """Part of the current tensor's bytes; `write(name, b"")` closes the tensor after streamed chunks.

        The chunk is hashed in the hashing thread while it is written here, and both are done when this
        returns, so the caller may reuse its buffer."""
        if not len(chunk):
            return
        self._hasher.add(chunk)
        self._write_all(chunk)
        self._hasher.wait()
        self._pending += len(chunk)

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[self._file.write(view):]

    def copy(self, info: TensorInfo) -> None:
        """Copy a source tensor's stored bytes unchanged (same dtype and shape as planned)."""
        planned = self.plan[self._next]
        if (info.dtype, info.shape) != (planned.dtype, planned.shape):
            raise ValueError(f"{info.name}: stored {info.dtype}{list(info.shape)}, planned {planned.dtype}{list(planned.shape)}")
        if self._copy_in_kernel(info):
            self._pending += info.nbytes
        else:
            for chunk in read_raw(info):
                self.write_bytes(chunk)
        self.write(planned.name, b"")

    def _copy_in_kernel(self, info: TensorInfo) -> bool:
        """copy_file_range from the input into the output; False (and plain copies from then on) where the OS
        or the pair of filesystems does not support it. The hashing thread reads the same range of the input
        (from the page cache the copy just filled), so the hash covers exactly the bytes copied."""
        if not self._kernel_copy or not info.nbytes:
            return False
        source = self._sources.get(info.path)
        if source is None:
            source = self._sources[info.path] = os.open(info.path, os.O_RDONLY)
        done = 0
        try:
            while done < info.nbytes:
                n = os.copy_file_range(source, self._file.fileno(), info.nbytes - done, info.start + done)
                if not n:
                    raise corrupt(info.path, f"ended inside tensor {info.name!r}")
                done += n
        except OSError as e:
            if done or e.errno not in _NO_KERNEL_COPY:
                raise
            self._kernel_copy = False
            return False
        self._hasher.add_range(source, info.start, info.nbytes, info)
        return True

    def _close(self) -> None:
        self._hasher.close()
        for fd in self._sources.values():
            os.close(fd)
        self._file.close()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._next != len(self.plan):
                missing = self.plan[self._next].name
                raise ValueError(f"writer closed after {self._next} of {len(self.plan)} tensors (next: {missing})")
            if exc_type is None:
                self.sha256 = self._hasher.hexdigest()
                if self._metadata_of is not None or self._skipped:
                    if self._metadata_of is not None:
                        self.metadata = self._metadata(self.sha256)
                    header = self._checked(self._header(self._header_len))
                    if len(header) != self._header_len:
                        raise ValueError(f"final metadata needs {len(header)} header bytes, {self._header_len} "
                                         "were reserved")
                    self._file.seek(8)
                    self._write_all(header)
        except BaseException as e:
            self._close()
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        self._close()
        self._atomic.__exit__(exc_type, exc, tb)


# copy_file_range errors that mean "not here" (old kernel, other filesystem pair, special file), not a failure.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF,
                             errno.EPERM, errno.ETXTBSY})


class _OrderedHash:
    """sha256 of a stream fed in order, computed in one worker thread (a single worker runs its queue in
    order), so hashing overlaps the copying. Pieces are in-memory chunks, which the caller keeps unchanged
    until `wait` returns, or byte ranges of input files, read by the worker into its own buffer."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._queued: list[Future] = []
        self._buffer: bytearray | None = None

    def add(self, chunk: bytes | memoryview) -> None:
        self._queued.append(self._pool.submit(self._digest.update, chunk))

    def add_range(self, fd: int, start: int, nbytes: int, info: TensorInfo) -> None:
        self._queued.append(self._pool.submit(self._hash_range, fd, start, nbytes, info))

    def _hash_range(self, fd: int, start: int, nbytes: int, info: TensorInfo) -> None:
        if self._buffer is None:
            self._buffer = bytearray(_CHUNK)
        view = memoryview(self._buffer)
        while nbytes:
            n = os.preadv(fd, [view[:min(nbytes, len(view))]], start)
            if not n:
                raise corrupt(info.path, f"ended inside tensor {info.name!r}")
            self._digest.update(view[:n])
            start += n
            nbytes -= n

    def wait(self) -> None:
        """Until everything queued is hashed; raises the first failure."""
        queued, self._queued = self._queued, []
        for future in queued:
            future.result()

    def hexdigest(self) -> str:
        self.wait()
        return self._digest.hexdigest()

    def close(self) -> None:
        for future in self._queued:
            future.cancel()
        self._pool.shutdown(wait=True)


def hash_file(path: Path | str, start: int = 0, *, desc: str | None = None) -> str:
    """sha256 hex of a file from byte `start` on, in large reads (OpenSSL's SHA-NI path: >1 GB/s), with a
    progress bar on a terminal."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        _hash_into(f, [digest], os.fstat(f.fileno()).st_size - start, desc or f"sha256 {Path(path).name}")
    return digest.hexdigest()


def hash_file_and_data(path: Path | str, data_start: int) -> tuple[str, str]:
    """(sha256 of the whole file, sha256 of its data after the header) in one read: the first identifies a
    download, the second checks a data hash the file claims in its metadata."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        whole.update(f.read(data_start))
        _hash_into(f, [whole, data], os.fstat(f.fileno()).st_size - data_start, f"sha256 {Path(path).name}")
    return whole.hexdigest(), data.hexdigest()


def _hash_into(f, digests: list, nbytes: int, desc: str) -> None:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with bar(nbytes, desc=desc) as progress:
        while n := f.readinto(buf):
            for digest in digests:
                digest.update(view[:n])
            progress.update(n)
