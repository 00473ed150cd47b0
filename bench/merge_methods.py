"""Benchmark `merge --add-difference` at full size against `cp` and the whole-model torch way, in one run.

    flock /tmp/lightning-bench.lock python3 bench/merge_methods.py --dir /tmp/bench-methods
    python3 bench/merge_methods.py --scale tiny --dir /tmp/bench-methods-tiny     # quick check of the bench itself

Builds, tensor by tensor from cheap non-zero patterns (a different one per model), the three inputs of
"Lightning-izing" a fine-tune, each with a ModelSpec data hash so provenance needs no extra hashing pass:

    ft.safetensors                          a fine-tune: SDXL all-in-one ComfyUI file, fp16 (~6.9 GB)
    sdxl_lightning_4step_unet.safetensors   the tuned UNet, ComfyUI models/unet layout, fp16 (~5.1 GB)
    sdxl_base.safetensors                   the model it was tuned from: all-in-one file, fp16 (~6.9 GB)

then times, each in its own process under /usr/bin/time (wall clock and peak RSS), `--runs` times (medians):

    cp + sync of a file of the output's size (sdxl_base.safetensors): our outputs are synced to disk before they
        are published, so this is the fair baseline (bench/convert.py's `durable_copy`)
    reading the three inputs (cat > /dev/null): what any tool must read, the floor on a disk-bound machine
    ours: merge --base ft --add-difference tuned --minus base --alpha A --out out.safetensors
    and once each, keeping the outputs:
    ours: the same again, kept to compare with torch's
    ours: the same with --dtype fp8 (and its error against fp16)
    torch: load_file all three, W + A * (T - B) per UNet tensor in fp32, save_file (whole models in RAM; skipped
           when MemAvailable cannot hold them), and a bit-for-bit comparison of its output with ours

Every command starts with the bench's files out of the page cache (posix_fadvise DONTNEED, as after a download on
a machine whose RAM cannot hold 19 GB of inputs besides the output), so cp reads its source from disk as ours
does; `sync` runs before each so earlier writes do not bill the next one. The machine's load average is printed
at the start and the end. Not a test: run by hand, figures go to the README.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from convert import durable_copy, timed  # noqa: E402  (bench/convert.py)

from lightning_tools import provenance
from lightning_tools.checkpoint import Checkpoint, open_checkpoint, write_checkpoint
from lightning_tools.sdxl.detect import base_config, expected_shapes
from lightning_tools.sdxl.vocabulary import COMPONENT_NAMES
from lightning_tools.stream import LazyTensor
from lightning_tools.tiny import write_tiny_pipeline

ALPHA = "0.9"
TORCH_WAY = """
import sys, torch
from safetensors.torch import load_file, save_file
ft, tuned, minus = (load_file(p) for p in sys.argv[1:4])
alpha = float(sys.argv[5])
for key, t in tuned.items():
    ft[key] = (ft[key].float() + alpha * (t.float() - minus[key].float())).to(ft[key].dtype)
save_file(ft, sys.argv[4])
"""


def _pattern(seed: int) -> torch.Tensor:
    return (torch.rand(1 << 20, generator=torch.Generator().manual_seed(seed)) * 0.02 - 0.01).half()


def patterned(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, LazyTensor]:
    """Non-zero fp16 tensors of `shapes`, cheap to make: one random block per model, repeated."""
    block = _pattern(seed)

    def make(shape):
        n = 1
        for s in shape:
            n *= s
        return block.repeat(-(-n // block.numel()))[:n].reshape(shape)

    return {k: LazyTensor("F16", tuple(s), lambda s=s: make(s)) for k, s in shapes.items()}


def architecture(work: Path, scale: str) -> tuple[dict[str, dict], dict[str, dict[str, tuple[int, ...]]]]:
    """(configs, tensor shapes) per component: SDXL base's, or the tiny test pipeline's."""
    if scale == "full":
        configs = {c: base_config(c) for c in COMPONENT_NAMES}
        return configs, {c: expected_shapes(c, configs[c]) for c in COMPONENT_NAMES}
    tiny = open_checkpoint(write_tiny_pipeline(work / "tiny-reference"))
    return tiny.configs, {c: {k: t.shape for k, t in tensors.items()} for c, tensors in tiny.components.items()}


def build(work: Path, scale: str) -> tuple[Path, Path, Path]:
    """The fine-tune, the tuned UNet and the base it was tuned from (see the module docstring)."""
    cfg, shapes = architecture(work, scale)
    paths = (work / "ft.safetensors", work / "sdxl_lightning_4step_unet.safetensors", work / "sdxl_base.safetensors")
    for seed, (path, to) in enumerate(zip(paths, ("comfyui", "comfyui-unet", "comfyui"))):
        components = {c: patterned(s, seed) for c, s in shapes.items() if to == "comfyui" or c == "unet"}
        ckpt = Checkpoint(path, "diffusers", components, cfg, {}, [])
        write_checkpoint(ckpt, path, to, metadata=provenance.modelspec(path.stem))
    return paths


_DROP = """
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
"""


def cold(command: list[str], files: tuple[Path, ...]) -> list[str]:
    """`command`, run after dropping `files` from the page cache (clean pages only: `sync` ran before)."""
    return ["sh", "-c", f'"{sys.executable}" -c "$0" {" ".join(map(str, files))} && exec "$@"', _DROP, *command]


def run_once(name: str, command: list[str]) -> tuple[dict, str]:
    """Run `command` once under /usr/bin/time -v, keeping its output (bench/convert.py's `timed` removes it):
    (wall seconds and peak RSS, its stdout)."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss_kb = next(int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line)
    row = {"name": name, "wall_s": round(wall, 2), "runs_s": [round(wall, 1)], "peak_rss_mb": round(rss_kb / 1024)}
    print(f"{name:<48} {row['wall_s']:>8.2f} s {row['peak_rss_mb']:>7} MB  (one run)", flush=True)
    return row, proc.stdout


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors that differ) between two files, bit for bit."""
    differ = 0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        keys = list(fa.keys())
        assert set(keys) == set(fb.keys()), "different keys"
        for key in keys:
            differ += not torch.equal(fa.get_tensor(key), fb.get_tensor(key))
    return len(keys), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-methods"))
    parser.add_argument("--scale", choices=("full", "tiny"), default="full",
                        help="full: SDXL-size inputs (~19 GB); tiny: a tiny UNet, to check the bench")
    parser.add_argument("--runs", type=int, default=3, help="Runs of cp and of ours; the median is reported.")
    parser.add_argument("--skip-torch", action="store_true", help="Leave out the whole-model torch way.")
    parser.add_argument("--keep", action="store_true", help="Keep the generated inputs.")
    args = parser.parse_args()
    work: Path = args.dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    tool = [sys.executable, "-m", "lightning_tools"]
    rows: dict[str, dict] = {}
    try:
        start = time.perf_counter()
        ft, tuned, minus = build(work, args.scale)
        sizes = {p.name: p.stat().st_size for p in (ft, tuned, minus)}
        print(f"built {', '.join(f'{n} ({s / 1e9:.2f} GB)' for n, s in sizes.items())} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        out, copy = work / "ours.safetensors", work / "copy.safetensors"
        merge = [*tool, "merge", "--base", str(ft), "--add-difference", str(tuned), "--minus", str(minus),
                 "--alpha", ALPHA, "--json"]
        n, inputs = args.runs, (ft, tuned, minus)
        marker = work / "read"
        for row in (timed("cp + sync", cold(durable_copy(minus, copy), inputs), copy, n),
                    timed("read the three inputs", cold(["sh", "-c", f'cat {ft} {tuned} {minus} > /dev/null && touch '
                                                         f'{marker}'], inputs), marker, n),
                    timed("ours: add-difference -> single file", cold([*merge, "--out", str(out)], inputs), out, n)):
            rows[row["name"]] = row
        row, _ = run_once("ours: the same, kept", cold([*merge, "--out", str(out)], inputs))
        rows[row["name"]] = row
        output_bytes = out.stat().st_size
        eight = work / "ours-fp8.safetensors"
        row, stdout = run_once("ours: add-difference -> fp8 single file",
                               cold([*merge, "--dtype", "fp8", "--out", str(eight)], inputs))
        rows[row["name"]], fp8 = row, json.loads(stdout)["written"]["fp8"]
        fp8_bytes = eight.stat().st_size
        eight.unlink()
        needed = sum(sizes.values()) + (1 << 30)
        if args.skip_torch:
            pass
        elif mem_available() < needed:
            print(f"torch way skipped: it holds the three models in RAM ({needed / 1e9:.1f} GB with headroom), "
                  f"{mem_available() / 1e9:.1f} GB available", flush=True)
        else:
            theirs = work / "theirs.safetensors"
            row, _ = run_once("torch: three state dicts in RAM, save_file",
                              cold([sys.executable, "-c", TORCH_WAY, str(ft), str(tuned), str(minus), str(theirs),
                                    ALPHA], inputs))
            rows[row["name"]] = row
            compared, differ = same_tensors(out, theirs)
            print(f"ours vs torch: {compared} tensors compared, {differ} differ", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    synced, read = rows["cp + sync"]["wall_s"], rows["read the three inputs"]["wall_s"]
    ours = rows["ours: add-difference -> single file"]
    print(f"inputs {sum(sizes.values()) / 1e9:.2f} GB, output {output_bytes / 1e9:.2f} GB, fp8 output "
          f"{fp8_bytes / 1e9:.2f} GB")
    print(f"ours: {ours['wall_s']:.1f} s median = {ours['wall_s'] / synced:.2f}x cp + sync ({synced:.1f} s), "
          f"{ours['wall_s'] / read:.2f}x reading the inputs ({read:.1f} s); peak RSS {ours['peak_rss_mb']} MB")
    torch_row = rows.get("torch: three state dicts in RAM, save_file")
    if torch_row:
        print(f"torch way: {torch_row['wall_s']:.1f} s ({torch_row['wall_s'] / ours['wall_s']:.2f}x ours), peak RSS "
              f"{torch_row['peak_rss_mb']} MB")
    print(f"fp8: {rows['ours: add-difference -> fp8 single file']['wall_s']:.1f} s; UNet against fp16: max abs error "
          f"{fp8['max_abs_error']:.3g}, mean {fp8['mean_abs_error']:.3g} (mean |w| {fp8['mean_abs_value']:.3g}), "
          f"{fp8['saturated']} saturated")
    print(json.dumps({"rows": list(rows.values()), "fp8": fp8, "sizes": sizes}))


if __name__ == "__main__":
    main()
