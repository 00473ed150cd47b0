"""The one stream under every command: lazy tensors -> per-tensor transforms -> a sink, one tensor at a time.

A `LazyTensor` knows its dtype and shape from a header and makes its value only when a sink asks. Key maps
rename (keeping the stored bytes), transforms (`cast`, a merge, a factorisation) compute, and `drive` pulls
each tensor into a sink:

- `FileSink`: one safetensors file, stored bytes copied in the kernel, computed tensors encoded;
- `ScanSink`: reads every value once to count NaN/Inf (verify --deep);
- `StateDictSink`: a dict of torch tensors for a model (render's UNet).

Peak memory is a few tensors whatever the model size. Nothing here imports torch until a value is made.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lightning_tools import dtypes
from lightning_tools.progress import bar
from lightning_tools.tensors import Metadata, Planned, SafetensorsWriter, TensorInfo

if TYPE_CHECKING:
    import torch


class _Source(Protocol):
    def __getitem__(self, key: str) -> TensorInfo: ...

    def load(self, key: str) -> "torch.Tensor": ...


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by dtype and shape and produced on demand.

    `stored` is set when bytes on disk are exactly this tensor, so a file sink copies them without decoding.
    Renames keep `stored`; any computation (`map`) drops it.
    """

    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], "torch.Tensor"]
    stored: TensorInfo | None = None

    @classmethod
    def of(cls, source: _Source, key: str) -> "LazyTensor":
        info = source[key]
        return cls(info.dtype, tuple(info.shape), lambda: source.load(key), info if isinstance(info, TensorInfo)
                   else None)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.ITEM_SIZE[self.dtype]

    def map(self, fn: Callable[["torch.Tensor"], "torch.Tensor"], shape: Sequence[int] | None = None,
            dtype: str | None = None) -> "LazyTensor":
        """A derived tensor; give `shape`/`dtype` when `fn` changes them, so plans stay lazy."""
        load = self.load
        return LazyTensor(dtype or self.dtype, tuple(self.shape if shape is None else shape), lambda: fn(load()))


def lazy_tensors(source: Mapping[str, object]) -> dict[str, LazyTensor]:
    """Every tensor of a source (a file, shards, a pickle) as a lazy tensor, in the source's order."""
    return {key: LazyTensor.of(source, key) for key in source}  # type: ignore[arg-type]


def constant(make: Callable[[], "torch.Tensor"], dtype: str, shape: Sequence[int]) -> LazyTensor:
    """A tensor made from nothing (CLIP's position_ids, OpenCLIP's logit_scale, a LoRA alpha)."""
    return LazyTensor(dtype, tuple(shape), make)


def cast(tensor: LazyTensor, code: str | None) -> LazyTensor:
    """The tensor in dtype `code` if it is floating (integer tensors keep theirs); unchanged ones stay stored."""
    target = dtypes.target(tensor.dtype, code)
    if target == tensor.dtype:
        return tensor
    return tensor.map(lambda x: x.to(dtypes.torch_dtype(target)), dtype=target)


def cast_all(tensors: Mapping[str, LazyTensor], code: str | None) -> dict[str, LazyTensor]:
    return {name: cast(t, code) for name, t in tensors.items()}


# --- sinks ----------------------------------------------------------------------------------------------------

class Sink(Protocol):
    """Receives a planned set of tensors one at a time, in order. Used as a context manager by `drive`:
    `open` sees the whole plan (shapes and dtypes) before any value, `close` finishes (or, on an exception,
    abandons) the output."""

    def open(self, tensors: Mapping[str, LazyTensor]) -> None: ...

    def put(self, name: str, tensor: LazyTensor) -> None: ...

    def close(self, failed: bool) -> None: ...


def drive(tensors: Mapping[str, LazyTensor], sink: Sink, *, desc: str = "") -> None:
    """Pull every tensor through `sink`, showing progress in bytes on a terminal."""
    sink.open(tensors)
    try:
        with bar(sum(t.nbytes for t in tensors.values()), desc=desc) as progress:
            for name, tensor in tensors.items():
                sink.put(name, tensor)
                progress.update(tensor.nbytes)
    except BaseException:
        sink.close(failed=True)
        raise
    sink.close(failed=False)


@dataclass
class FileSink:
    """One safetensors file at `path` (written under a temporary name, published when complete). `metadata` may
    be a function of the data section's sha256, and `room` reserves header bytes for what it adds at the end
    (see `tensors.SafetensorsWriter`). A tensor whose value comes out None is left out of the file: a
    computation may decide only when it runs that there is nothing to write (extract, for a module that did not
    change)."""

    path: Path
    metadata: Metadata = field(default_factory=dict)
    overwrite: bool = False
    room: int = 0
    sha256: str | None = None

    def open(self, tensors: Mapping[str, LazyTensor]) -> None:
        plan = [Planned(name, t.dtype, t.shape) for name, t in tensors.items()]
        self._writer = SafetensorsWriter(self.path, plan, self.metadata, overwrite=self.overwrite, room=self.room)
        self._writer.__enter__()

    def put(self, name: str, tensor: LazyTensor) -> None:
        if tensor.stored is not None and tensor.stored.dtype == tensor.dtype \
                and tuple(tensor.stored.shape) == tensor.shape:
            self._writer.copy(tensor.stored)
            return
        value = tensor.load()
        if value is None:
            self._writer.skip(name)
            return
        if tuple(value.shape) != tensor.shape or dtypes.code_of(value.dtype) != tensor.dtype:
            raise ValueError(f"{name}: computed {value.dtype}{list(value.shape)}, planned "
                             f"{tensor.dtype}{list(tensor.shape)}")
        self._writer.write(name, value)

    def close(self, failed: bool) -> None:
        if failed:
            with contextlib.suppress(Exception):
                self._writer.__exit__(RuntimeError, RuntimeError("stream failed"), None)
            return
        self._writer.__exit__(None, None, None)
        self.sha256 = self._writer.sha256


@dataclass
class ScanSink:
    """Reads every floating tensor once and counts its NaN/Inf values: `bad` maps name -> (count, numel)."""

    bad: dict[str, tuple[int, int]] = field(default_factory=dict)

    def open(self, tensors: Mapping[str, LazyTensor]) -> None:
        pass

    def put(self, name: str, tensor: LazyTensor) -> None:
        if tensor.dtype in dtypes.FLOAT_CODES:
            count = count_nonfinite(tensor.load())
            if count:
                self.bad[name] = (count, math.prod(tensor.shape))

    def close(self, failed: bool) -> None:
        pass


_SCAN_CHUNK = 1 << 24  # elements per NaN/Inf test: bounds the temporary mask and any float8 upcast


def count_nonfinite(t: "torch.Tensor") -> int:
    """Number of NaN/Inf entries; float8 is upcast chunk by chunk (torch has no isfinite for it)."""
    import torch

    count = 0
    for chunk in t.reshape(-1).split(_SCAN_CHUNK):
        if chunk.element_size() == 1:
            chunk = chunk.to(torch.float16)
        count += int((~torch.isfinite(chunk)).sum())
    return count


@dataclass
class StateDictSink:
    """The tensors as a state dict in a torch dtype (floating tensors only are cast), for `load_state_dict`."""

    dtype: "torch.dtype | None" = None
    state: dict = field(default_factory=dict)

    def open(self, tensors: Mapping[str, LazyTensor]) -> None:
        pass

    def put(self, name: str, tensor: LazyTensor) -> None:
        value = tensor.load()
        if self.dtype is not None and value.is_floating_point():
            value = value.to(self.dtype)
        self.state[name] = value

    def close(self, failed: bool) -> None:
        if failed:
            self.state.clear()


def write_file(path: Path | str, tensors: Mapping[str, LazyTensor], *, metadata: Metadata | None = None,
               dtype: str | None = None, overwrite: bool = False, room: int = 0) -> str:
    """Stream `tensors` (floating ones cast to safetensors code `dtype`) into one file; the data's sha256."""
    sink = FileSink(Path(path), metadata or {}, overwrite, room)
    drive(cast_all(tensors, dtype), sink, desc=Path(path).name)
    assert sink.sha256 is not None
    return sink.sha256


def scan(tensors: Mapping[str, LazyTensor], desc: str = "NaN/Inf scan") -> dict[str, tuple[int, int]]:
    sink = ScanSink()
    drive(tensors, sink, desc=desc)
    return sink.bad


def state_dict(tensors: Mapping[str, LazyTensor], dtype: "torch.dtype | None" = None, desc: str = "") -> dict:
    sink = StateDictSink(dtype)
    drive(tensors, sink, desc=desc)
    return sink.state
