"""Benchmark `extract` on a full-size random-weight SDXL UNet: wall time, peak RSS and the error report.

    flock /tmp/lightning-bench.lock python3 bench/extract.py --dir /tmp/bench-extract
    python3 bench/extract.py --width 32 --dir /tmp/bench-extract-small     # quick check of the bench itself

Builds an SDXL-base UNet (fp16, ~5.1 GB; a UNet folder with its config) with random weights and a "tuned" UNet
file (diffusers naming, like the official `sdxl_lightning_4step_unet.safetensors`) = base + a delta on every
Lightning LoRA target made of a rank-32 part (80% of the change) plus full-rank noise (20%), and small noise on
every other tensor. Then runs `lightning-tools extract --rank 64` (fp16 kohya output, like the official LoRA) in
its own process (wall clock; peak RSS, and sampled peaks of anonymous and file-backed memory) and prints the error summary from the output's
metadata. `--compare-svd` also times exact and randomized SVD (2 and 4 power iterations) at the rank on one
module of each target shape, with their errors.

`--width` scales the UNet (320 = SDXL). Not a test: run by hand, figures go to the README.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from convert import size_of  # noqa: E402  (bench/convert.py)

from lightning_tools.lora import lightning_targets  # noqa: E402
from lightning_tools.lowrank import truncated_svd  # noqa: E402
from lightning_tools.provenance import EXTRACT  # noqa: E402
from lightning_tools.stream import LazyTensor, write_file  # noqa: E402
from lightning_tools.tensors import TensorSource, read_header  # noqa: E402
from lightning_tools.tiny import sdxl_unet_config  # noqa: E402

LOW_RANK = 32
LOW_RANK_SHARE = 0.8  # of the delta's squared norm; the rest is full-rank noise
DELTA_RMS = 1e-3  # per element, against weights of RMS 0.02
OTHER_RMS = 1e-4  # change of biases, norms, embeddings (what no LoRA carries)


def unet_config(width: int) -> dict:
    if width == 320:
        return sdxl_unet_config()
    if width % 8:
        sys.exit("--width must be 320 (SDXL) or a multiple of 8")
    return sdxl_unet_config(width=width, heads_per_level=(1, 2, 4), norm_groups=8)


def unet_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in UNet2DConditionModel(**config).state_dict().items()}


def _generator(key: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()) * 4 + salt)


def base_weight(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.randn(shape, generator=_generator(key, 0)) * 0.02).half()


def delta(key: str, shape: tuple[int, ...], targeted: bool) -> torch.Tensor:
    """A fine-tune-like change: low rank plus noise on targets, small noise elsewhere."""
    gen = _generator(key, 1)
    if not targeted:
        return torch.randn(shape, generator=gen) * OTHER_RMS
    rows, cols = shape[0], math.prod(shape[1:])
    rank = min(LOW_RANK, rows, cols)
    low = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)
    low *= math.sqrt(LOW_RANK_SHARE * rows * cols) * DELTA_RMS / low.norm()
    noise = torch.randn(rows, cols, generator=gen) * (math.sqrt(1 - LOW_RANK_SHARE) * DELTA_RMS)
    return (low + noise).reshape(shape)


def build(work: Path, config: dict) -> tuple[Path, Path]:
    """Write the base UNet folder and the tuned UNet file, tensor by tensor."""
    shapes = unet_shapes(config)
    targets = {m + ".weight" for m in lightning_targets(config)}
    base = work / "base_unet"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config | {"_class_name": "UNet2DConditionModel"}, indent=2))
    write_file(base / "diffusion_pytorch_model.safetensors",
               {k: LazyTensor("F16", s, lambda k=k, s=s: base_weight(k, s)) for k, s in shapes.items()})
    tuned = work / "bench_lightning_4step_unet.safetensors"
    write_file(tuned, {k: LazyTensor("F16", s, lambda k=k, s=s: (base_weight(k, s).float()
                                                               + delta(k, s, k in targets)).half())
                       for k, s in shapes.items()})
    return base, tuned


def compare_svd(base: Path, tuned: Path, config: dict, rank: int) -> list[dict]:
    """On one module of each distinct shape: seconds and relative error at `rank` of what extract uses
    (`truncated_svd`), of randomized SVD with 4 power iterations, and of exact SVD (the optimum)."""
    import lightning_tools.lowrank as lowrank

    base_src, tuned_src = TensorSource.open(base), TensorSource.open(tuned)
    seen, rows = set(), []
    for module in lightning_targets(config):
        key = module + ".weight"
        shape = base_src[key].shape
        if shape in seen:
            continue
        seen.add(shape)
        d = (tuned_src.load(key).float() - base_src.load(key).float()).reshape(shape[0], -1)
        row = {"module": module, "matrix": list(d.shape)}
        for name, iterations in (("ours", lowrank.POWER_ITERATIONS), ("niter4", 4)):
            lowrank.POWER_ITERATIONS, saved = iterations, lowrank.POWER_ITERATIONS
            start = time.perf_counter()
            u, s, vh, method = truncated_svd(d, rank)
            row[name + "_s"] = round(time.perf_counter() - start, 3)
            lowrank.POWER_ITERATIONS = saved
            row[name + "_error"] = round(float((d - (u * s) @ vh).norm() / d.norm()), 5)
            row[name + "_method"] = method
        start = time.perf_counter()
        tall = d.T if d.shape[0] < d.shape[1] else d
        _, exact, _ = torch.linalg.svd(tall, full_matrices=False)
        row["exact_s"] = round(time.perf_counter() - start, 3)
        row["optimal_error"] = round(float(exact[rank:].square().sum().sqrt() / exact.square().sum().sqrt()), 5)
        rows.append(row)
    return rows


def run_sampled(name: str, command: list[str]) -> dict:
    """Run `command`; wall seconds, the kernel's peak RSS, and sampled peaks of its anonymous memory (what it
    allocated) and file-backed memory (pages of memory-mapped inputs, which the kernel can drop)."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                field, _, value = line.partition(":")
                if field in peak:
                    peak[field] = max(peak[field], int(value.split()[0]))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr.read()[-4000:]}")
    row = {"name": name, "wall_s": round(wall, 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
           "peak_anon_mb": round(peak["RssAnon"] / 1024), "peak_file_mb": round(peak["RssFile"] / 1024)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-extract"))
    parser.add_argument("--width", type=int, default=320, help="UNet width: 320 is SDXL; e.g. 32 to check the bench")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compare-svd", action="store_true", help="Also time exact vs randomized SVD per shape.")
    parser.add_argument("--keep", action="store_true", help="Keep the generated UNets and the LoRA.")
    args = parser.parse_args()
    work: Path = args.dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    config = unet_config(args.width)
    try:
        start = time.perf_counter()
        base, tuned = build(work, config)
        print(f"built {base} and {tuned.name} ({size_of(tuned) / 1e9:.2f} GB each) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        out = work / f"extracted_rank{args.rank}_lora.safetensors"
        command = [sys.executable, "-m", "lightning_tools", "extract", "--base", str(base), "--tuned", str(tuned),
                   "--rank", str(args.rank), "--device", args.device, "--out", str(out)]
        print("$ " + " ".join(command), flush=True)
        row = run_sampled(f"extract --rank {args.rank}", command)
        report = json.loads(read_header(out)[1][EXTRACT])
        report.pop("per_module")
        summary = {"width": args.width, "cores": len(os.sched_getaffinity(0)),
                   "threads": torch.get_num_threads(), **row, "minutes": round(row["wall_s"] / 60, 2),
                   "lora_bytes": size_of(out), "tuned_bytes": size_of(tuned), **report}
        if args.compare_svd:
            summary["svd_comparison"] = compare_svd(base, tuned, config, args.rank)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["uptime"])
    by_kind = summary.pop("by_kind")
    comparison = summary.pop("svd_comparison", [])
    print(json.dumps(summary))
    if comparison:
        print("SVD at the rank: seconds and error, ours (randomized, 2 power iterations) / 4 iterations / exact")
        for r in comparison:
            print(f"  {str(r['matrix']):<14} {r['ours_s']:7.3f} {r['niter4_s']:7.3f} {r['exact_s']:7.3f}   "
                  f"{r['ours_error']:.5f} {r['niter4_error']:.5f} {r['optimal_error']:.5f}  {r['ours_method']}")
        total = {k: round(sum(r[k] for r in comparison), 2) for k in ("ours_s", "niter4_s", "exact_s")}
        print(f"  one module per shape, total seconds: {total}")
    print("by module kind: modules, rank, error, energy kept")
    for kind, r in sorted(by_kind.items(), key=lambda kv: -kv[1]["error"]):
        print(f"  {kind:<24} {r['modules']:>4} {r['rank']:>4} {r['error']:.4f} {100 * r['energy']:6.2f}%")


if __name__ == "__main__":
    main()
