"""Benchmark `convert` against `cp` and diffusers on a full-size random-weight SDXL pipeline.

    flock /tmp/lightning-bench.lock python3 bench/convert.py --dir /tmp/bench-convert
    python3 bench/convert.py --scale tiny --dir /tmp/bench-convert-tiny     # quick check of the bench itself

Builds an fp16 SDXL-base pipeline in diffusers layout (2.6B-parameter UNet, VAE, CLIP-L, OpenCLIP bigG:
~6.9 GB) tensor by tensor from cheap non-zero patterns, then times, each in its own process under
/usr/bin/time (wall clock and peak RSS):

    cp -r of the pipeline            vs  ours: diffusers -> comfyui
    cp of the single file            vs  ours: comfyui -> diffusers  vs  diffusers: from_single_file + save_pretrained

Outputs are deleted after each run; `sync` runs before each so earlier writes do not bill the next command.
Not a test: run by hand, figures go to the README.
"""

from __future__ import annotations

import argparse
import statistics
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_tools.sdxl import SDXL_BASE_CONFIGS
from lightning_tools.sdxl.detect import base_config, expected_shapes
from lightning_tools.sdxl.vocabulary import COMPONENTS
from lightning_tools.stream import LazyTensor, write_file
from lightning_tools.tiny import write_tiny_pipeline, write_tiny_tokenizer

_PATTERN = (torch.rand(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02 - 0.01).half()


def _pattern(shape: tuple[int, ...]) -> torch.Tensor:
    """A non-zero fp16 tensor of `shape`, cheap to make: one random block repeated."""
    n = 1
    for s in shape:
        n *= s
    reps = -(-n // _PATTERN.numel())
    return _PATTERN.repeat(reps)[:n].reshape(shape)


def build_full_pipeline(folder: Path) -> None:
    """The SDXL base pipeline with patterned fp16 weights, written tensor by tensor (never a whole model)."""
    shutil.copyfile(SDXL_BASE_CONFIGS / "model_index.json", folder / "model_index.json")
    shutil.copytree(SDXL_BASE_CONFIGS / "scheduler", folder / "scheduler")
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        write_tiny_tokenizer(folder / name, pad)  # loading needs tokenizer files; their vocabulary is irrelevant
    for c, component in COMPONENTS.items():
        config = base_config(c)
        shapes = expected_shapes(c, config)
        if c == "text_encoder":  # what transformers >= 5.6 saves for CLIPTextModel
            shapes = {k.removeprefix("text_model."): s for k, s in shapes.items()}
        (folder / c).mkdir()
        tensors = {k: LazyTensor("F16", s, lambda s=s: _pattern(s)) for k, s in shapes.items()}
        write_file(folder / c / component.weights_file, tensors, metadata={"format": "pt"})
        (folder / c / "config.json").write_text(json.dumps(config, indent=2))


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def durable_copy(src: Path, dst: Path) -> list[str]:
    """`cp` followed by `sync` of what it wrote: the fair baseline for our outputs, which are synced to disk
    before they are published (a plain `cp` returns with the data still in the page cache)."""
    return ["sh", "-c", 'cp -r "$0" "$1" && sync -f "$1"', str(src), str(dst)]


def timed(name: str, command: list[str], output: Path, runs: int = 1) -> dict:
    """Run `command` `runs` times under /usr/bin/time -v, removing `output` after each run: the median wall
    seconds (this disk's speed swings 2x between runs) and the largest peak RSS of the process and its children."""
    walls, peaks = [], []
    for _ in range(runs):
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        peaks.append(next(int(line.split(":")[1]) for line in proc.stderr.splitlines()
                          if "Maximum resident set size" in line))
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    row = {"name": name, "wall_s": round(statistics.median(walls), 2), "runs_s": [round(w, 1) for w in walls],
           "peak_rss_mb": round(max(peaks) / 1024)}
    print(f"{name:<48} {row['wall_s']:>8.2f} s {row['peak_rss_mb']:>7} MB  (median of {row['runs_s']})", flush=True)
    return row


DIFFUSERS_SAVE = """
import sys, torch
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_single_file(sys.argv[1], config=sys.argv[2], torch_dtype=torch.float16,
                                                  local_files_only=True)
pipe.save_pretrained(sys.argv[3])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-convert"))
    parser.add_argument("--scale", choices=("full", "tiny"), default="full",
                        help="full: SDXL-size random weights (~6.9 GB); tiny: the test model, to check the bench")
    parser.add_argument("--keep", action="store_true", help="Keep the generated pipeline and single file.")
    parser.add_argument("--runs", type=int, default=3, help="runs of each row; the median is reported")
    args = parser.parse_args()
    work: Path = args.dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tool = [sys.executable, "-m", "lightning_tools"]
    pipe, comfy = work / "pipeline", work / "sdxl.safetensors"
    rows = []
    try:
        start = time.perf_counter()
        if args.scale == "full":
            pipe.mkdir()
            build_full_pipeline(pipe)
        else:
            write_tiny_pipeline(pipe, torch_dtype=torch.float16)
        print(f"built {pipe} ({size_of(pipe) / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s", flush=True)

        n = args.runs
        rows.append(timed("cp -r pipeline", ["cp", "-r", str(pipe), str(work / "copy")], work / "copy", n))
        rows.append(timed("cp -r pipeline + sync", durable_copy(pipe, work / "copy"), work / "copy", n))
        subprocess.run([*tool, "convert", str(pipe), "--to", "comfyui", "--out", str(comfy)], check=True)
        print(f"  single file: {size_of(comfy) / 1e9:.2f} GB", flush=True)
        rows.append(timed("ours: diffusers -> comfyui", [*tool, "convert", str(pipe), "--to", "comfyui",
                                                         "--out", str(work / "o.safetensors")], work / "o.safetensors",
                          n))
        rows.append(timed("cp single file + sync", durable_copy(comfy, work / "c.safetensors"), work / "c.safetensors",
                          n))
        rows.append(timed("ours: comfyui -> diffusers", [*tool, "convert", str(comfy), "--to", "diffusers",
                                                         "--out", str(work / "ours"), "--config", str(pipe)],
                          work / "ours", n))
        rows.append(timed("diffusers: from_single_file + save_pretrained",
                          [sys.executable, "-c", DIFFUSERS_SAVE, str(comfy), str(pipe), str(work / "theirs")],
                          work / "theirs", max(1, n // 2)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    by = {r["name"]: r for r in rows}
    to_comfy, to_diff = by["ours: diffusers -> comfyui"], by["ours: comfyui -> diffusers"]
    print(f"diffusers -> comfyui: {to_comfy['wall_s'] / by['cp -r pipeline + sync']['wall_s']:.2f}x cp + sync")
    print(f"comfyui -> diffusers: {to_diff['wall_s'] / by['cp single file + sync']['wall_s']:.2f}x cp + sync, "
          f"{by['diffusers: from_single_file + save_pretrained']['wall_s'] / to_diff['wall_s']:.2f}x faster "
          "than diffusers")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
