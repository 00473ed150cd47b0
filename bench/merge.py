"""Benchmark `merge` against `cp` and the diffusers way on a full-size random-weight SDXL pipeline.

    flock /tmp/lightning-bench.lock python3 bench/merge.py --dir /tmp/bench-merge
    python3 bench/merge.py --scale tiny --dir /tmp/bench-merge-tiny     # quick check of the bench itself

Builds the fp16 SDXL-base pipeline of bench/convert.py (~6.9 GB) and a Lightning-format LoRA at full size (788
modules, rank 64, fp16: 393,854,592 bytes like the official files), then times, each in its own process under
/usr/bin/time (wall clock and peak RSS):

    cp -r of the pipeline
    ours: merge into a diffusers folder          ours: merge into a ComfyUI single file
    diffusers: from_pretrained, load_lora_weights, fuse_lora(lora_scale=S), unload_lora_weights, save_pretrained

Outputs are deleted after each run; `sync` runs before each so earlier writes do not bill the next command.
Not a test: run by hand, figures go to the README.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from convert import build_full_pipeline, durable_copy, size_of, timed  # noqa: E402  (bench/convert.py)

from lightning_tools.tiny import make_lightning_lora, sdxl_unet_config, tiny_unet_config, write_tiny_pipeline  # noqa: E402

DIFFUSERS_MERGE = """
import sys, torch
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float16, local_files_only=True)
pipe.load_lora_weights(sys.argv[2])
pipe.fuse_lora(lora_scale=float(sys.argv[4]))
pipe.unload_lora_weights()
pipe.save_pretrained(sys.argv[3])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-merge"))
    parser.add_argument("--scale", choices=("full", "tiny"), default="full",
                        help="full: SDXL-size random weights (~6.9 GB); tiny: the test model, to check the bench")
    parser.add_argument("--strength", type=float, default=0.9)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="--device for our merge")
    parser.add_argument("--skip-diffusers", action="store_true", help="Time only cp and ours.")
    parser.add_argument("--keep", action="store_true", help="Keep the generated pipeline and LoRA.")
    parser.add_argument("--runs", type=int, default=3, help="runs of each row; the median is reported")
    args = parser.parse_args()
    work: Path = args.dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tool = [sys.executable, "-m", "lightning_tools"]
    pipe, lora = work / "pipeline", work / "sdxl_lightning_4step_lora.safetensors"
    strength = str(args.strength)
    rows = []
    try:
        start = time.perf_counter()
        if args.scale == "full":
            pipe.mkdir()
            build_full_pipeline(pipe)
            save_file(make_lightning_lora(sdxl_unet_config(), rank=64), str(lora))
        else:
            write_tiny_pipeline(pipe, torch_dtype=torch.float16)
            save_file(make_lightning_lora(tiny_unet_config(), rank=4), str(lora))
        print(f"built {pipe} ({size_of(pipe) / 1e9:.2f} GB) and {lora.name} ({size_of(lora):,} bytes) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)

        n = args.runs
        rows.append(timed("cp -r pipeline", ["cp", "-r", str(pipe), str(work / "copy")], work / "copy", n))
        rows.append(timed("cp -r pipeline + sync", durable_copy(pipe, work / "copy"), work / "copy", n))
        merge = [*tool, "merge", "--base", str(pipe), "--lora", str(lora), "--strength", strength,
                 "--device", args.device]
        rows.append(timed("ours: merge -> diffusers folder", [*merge, "--out", str(work / "ours")], work / "ours", n))
        rows.append(timed("ours: merge -> comfyui single file", [*merge, "--out", str(work / "ours.safetensors")],
                          work / "ours.safetensors", n))
        if not args.skip_diffusers:
            rows.append(timed("diffusers: load_lora_weights + fuse_lora + save",
                              [sys.executable, "-c", DIFFUSERS_MERGE, str(pipe), str(lora), str(work / "theirs"),
                               strength], work / "theirs", max(1, n // 2)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    by = {r["name"]: r for r in rows}
    cp = by["cp -r pipeline + sync"]["wall_s"]
    theirs = by.get("diffusers: load_lora_weights + fuse_lora + save")
    for name in ("ours: merge -> diffusers folder", "ours: merge -> comfyui single file"):
        ours = by[name]["wall_s"]
        faster = f", {theirs['wall_s'] / ours:.2f}x faster than diffusers" if theirs else ""
        print(f"{name}: {ours / cp:.2f}x cp + sync{faster}, peak RSS {by[name]['peak_rss_mb']} MB")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
