"""Hashing throughput: `lightning_tools.tensors.hash_file` (and fetch's hash-while-copying) against `sha256sum`.

Writes a multi-GB file of random-looking bytes, reads it once so it sits in the page cache, then times each
hasher on the same warm file, so the figures compare the hashing, not the disk. Run the full size under the
shared benchmark lock:

    flock /tmp/lightning-bench.lock python3 bench/verify.py --gib 4

Small trial: `python3 bench/verify.py --gib 0.25`. The file and its copy are deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

from lightning_tools.hub import _copy_hashing
from lightning_tools.tensors import hash_file

_BLOCK = 64 * 1024 * 1024


def write_file(path: Path, size: int) -> None:
    """Random-looking data without paying for `size` bytes of urandom: one random block, varied per block."""
    seed = bytearray(os.urandom(_BLOCK))
    with open(path, "wb") as f:
        written = 0
        while written < size:
            seed[:8] = written.to_bytes(8, "little")
            n = min(_BLOCK, size - written)
            f.write(memoryview(seed)[:n])
            written += n


def timed(fn) -> tuple[float, str]:
    start = time.perf_counter()
    digest = fn()
    return time.perf_counter() - start, digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="file size in GiB (default 4)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-hub"), help="where to put the file")
    parser.add_argument("--repeat", type=int, default=2, help="runs per hasher; the best is reported")
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    path, copy = args.dir / f"hash-bench-{os.getpid()}.bin", args.dir / f"hash-bench-{os.getpid()}.copy"
    size = int(args.gib * 1024**3)
    try:
        write_file(path, size)
        hash_file(path)  # warm the page cache: every hasher below reads from memory
        rows = []
        hashers = {
            "tensors.hash_file": lambda: hash_file(path),
            "sha256sum (coreutils)": lambda: subprocess.run(["sha256sum", str(path)], check=True,
                                                             capture_output=True, text=True).stdout.split()[0],
            "fetch: hash while copying": lambda: _copy_hashing(path, copy, "copy"),
        }
        digests = set()
        for name, fn in hashers.items():
            best, digest = min(timed(fn) for _ in range(args.repeat))
            digests.add(digest)
            rows.append((name, best, size / best / 1e9))
        if len(digests) != 1:
            raise SystemExit(f"hashers disagree: {digests}")
    finally:
        for p in (path, copy):
            p.unlink(missing_ok=True)
        if not any(args.dir.iterdir()):
            args.dir.rmdir()

    print(f"sha256 of a {size / 1e9:.2f} GB file ({args.gib:g} GiB), warm page cache, best of {args.repeat}; "
          f"{os.cpu_count()} CPUs")
    print(f"{'hasher':28} {'seconds':>8} {'GB/s':>6} {'vs sha256sum':>12}")
    reference = rows[1][1]
    for name, seconds, rate in rows:
        print(f"{name:28} {seconds:8.2f} {rate:6.2f} {reference / seconds:11.1f}x")


if __name__ == "__main__":
    main()
