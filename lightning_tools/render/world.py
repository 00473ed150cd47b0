"""The processes render runs in: those a launcher started (`accelerate launch`, `torchrun`, `mpirun`), on one
machine or several, or this process alone.

Built on accelerate's `PartialState`, the field's standard for multi-GPU and multi-node inference. A process
started without a launcher never forms a process group, so a plain run behaves exactly as it always did. The main
process (rank 0) owns the output and speaks for all; `together` makes a block fail on every process when it fails
on any, so no process is left waiting for one that gave up.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from lightning_tools.errors import UsageError, UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# How long a process waits for the others at an exchange. The main process reads references and writes the
# sheets while the others wait, which takes minutes for thousands of images; a process that dies ends the whole
# world through its launcher, so a generous limit does not turn a crash into a hang.
EXCHANGE_TIMEOUT = datetime.timedelta(hours=4)


def launched() -> tuple[int, int]:
    """(rank, world size) as the launcher set them in the environment; (0, 1) without a launcher. Known before
    the world is joined, so an error found that early is still reported by the main process alone."""
    from accelerate.utils import get_cpu_distributed_information

    info = get_cpu_distributed_information()  # reads torchrun's, accelerate's and MPI's variables alike
    return info.rank, info.world_size


@dataclass(frozen=True)
class Process:
    """One process of the world, as the report names it."""

    rank: int
    host: str
    device: str
    device_name: str


class World:
    """This process's view of all of them: its rank, how many there are, and the exchanges render needs."""

    def __init__(self, state: Any, device: torch.device):
        self._state = state  # accelerate's PartialState, None when alone
        self.device = device  # where this process renders

    @classmethod
    def join(cls, device: str) -> World:
        """The world the launcher started, or this process alone, rendering on `device` (`cpu`, `cuda`, `cuda:N`).
        On the CPU the processes talk over gloo; on GPUs over NCCL, and `cuda` means each process's own GPU
        (that of its local rank). Joining again returns the same world."""
        from lightning_tools.device import parse_device

        device = parse_device(device)
        size = launched()[1]
        if size <= 1:
            return cls(None, device)
        if device.type == "cuda" and device.index is not None:
            raise UsageError(f"--device {device}: under a launcher every process takes the GPU of its local rank; "
                             "pass --device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES or the launcher's "
                             "--gpu_ids)")
        from accelerate import PartialState

        state = PartialState(cpu=device.type == "cpu", timeout=EXCHANGE_TIMEOUT)
        if state.num_processes != size:
            raise UsageError(f"launched as {size} processes, but accelerate formed a world of "
                             f"{state.num_processes} on --device {device}; check the launcher's options")
        return cls(state, device if device.type == "cpu" else state.device)

    @property
    def rank(self) -> int:
        return self._state.process_index if self._state else 0

    @property
    def size(self) -> int:
        return self._state.num_processes if self._state else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def process(self, device_name: str) -> Process:
        return Process(self.rank, socket.gethostname(), str(self.device), device_name)

    def split(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous share of `items` (accelerate's `split_between_processes`): the first ranks
        take one more when they do not divide evenly."""
        if self.size == 1:
            return list(items)
        with self._state.split_between_processes(list(items)) as mine:
            return list(mine)

    def share(self, value: T) -> T:
        """The main process's `value`, on every process."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        self._exchange(dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T] | None:
        """Every process's `value`, in rank order, on the main process; None on the others."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.size if self.is_main else None
        self._exchange(dist.gather_object, value, out, dst=0)
        return out

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Run a block on every process; when it raises on any, it raises on all.

        The process that failed raises its own error; the others raise it too, naming where it happened (a
        `UserError` keeps its class and exit code; anything else becomes a `UserError` pointing at that process's
        traceback). Signals are not caught: the launcher delivers them to every process. The block itself must
        not exchange anything, or a process that failed early would leave the others waiting."""
        if self.size == 1:
            yield
            return
        try:
            yield
        except Exception as e:
            self._agree(e)
            raise
        self._agree(None)

    def _agree(self, error: Exception | None) -> None:
        import torch.distributed as dist

        mine = None
        if error is not None:
            kind = type(error) if isinstance(error, UserError) else None
            mine = (kind, str(error) if kind else f"{type(error).__name__}: {error}")
        everyone: list[Any] = [None] * self.size
        self._exchange(dist.all_gather_object, everyone, (self.rank, socket.gethostname(), mine))
        failed = [(rank, host, what) for rank, host, what in everyone if what is not None]
        if not failed or error is not None:
            return  # nothing failed, or this process failed too and raises its own error
        rank, host, (kind, message) = failed[0]
        where = f"process {rank} of {self.size} on {host}"
        if kind is None:
            raise UserError(f"{where} failed with {message} (its traceback is above)")
        try:
            relayed = kind(f"{message} ({where})")
        except TypeError:  # a subclass with another constructor
            relayed = UserError(f"{message} ({where})")
        raise relayed

    def _exchange(self, collective, *args, **kwargs) -> None:
        """One collective; a peer that died or a network that failed becomes one line, not a traceback."""
        try:
            collective(*args, **kwargs)
        except RuntimeError as e:  # torch.distributed.DistBackendError and the like
            last = str(e).strip().splitlines()[-1:] or [type(e).__name__]
            raise UserError(f"lost contact with the other processes ({last[0][:200]}); one of them stopped, see "
                            "its own message") from None
