"""Seconds per image for `render` against the model card's plain diffusers snippet, and what each speed-up gives.

Same process, same weights, same GPU: one pipeline is built once, then sampled
  1. the model card's way: trailing Euler scheduler, `pipe(prompt, num_inference_steps=4, guidance_scale=0)`
     (diffusers upcasts the fp16 VAE inside every call),
  2. render's way (`pipeline.prepare` + `pipeline.render_batch`: VAE kept in fp32, decode in our hands, SDPA),
  3. render's way with classic attention instead of SDPA (what SDPA is worth),
  4. + channels_last, 5. + channels_last + torch.compile of the UNet.
Random weights time the same as real ones, so the default is a full-size random-weight SDXL built from the
bundled SDXL-base configs directly on the GPU (nothing to download); `--model` times a real checkpoint.

    python3 bench/render.py                              # 1024x1024, 4 steps, batch 1, fp16, cuda
    python3 bench/render.py --model sdxl_lightning_4step_unet.safetensors --base /path/to/sdxl-base
    python3 bench/render.py --tiny --device cpu          # smoke run of this script on a toy model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lightning_tools.device import parse_device
from lightning_tools.render.checks import image_difference, to_pixels
from lightning_tools.render.pipeline import Accelerations, load_pipeline, prepare, render_batch
from lightning_tools.render.plan import plan
from lightning_tools.render.run import TORCH_DTYPES
from lightning_tools.sampling import lightning
from lightning_tools.sdxl import SDXL_BASE_CONFIGS

PROMPT = "A girl smiling"  # the model card's
VARIANTS = ("diffusers", "render", "render-classic-attention", "render-channels-last", "render-compile")


def random_sdxl(device: torch.device, dtype: torch.dtype, workdir: Path):
    """A full-size SDXL pipeline with random weights, created on `device` (toy tokenizers: tokenizing is free)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lightning_tools.tiny import write_tiny_tokenizer

    def config(component: str) -> dict:
        return json.loads((SDXL_BASE_CONFIGS / component / "config.json").read_text())

    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        write_tiny_tokenizer(workdir / name, pad)
    with torch.device(device):
        parts = dict(
            unet=UNet2DConditionModel.from_config(config("unet")).to(dtype),
            vae=AutoencoderKL.from_config(config("vae")).to(dtype),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))).to(dtype),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config("text_encoder_2"))).to(dtype),
        )
    scheduler = EulerDiscreteScheduler.from_config(
        EulerDiscreteScheduler.load_config(SDXL_BASE_CONFIGS / "scheduler"))
    return StableDiffusionXLPipeline(tokenizer=CLIPTokenizer.from_pretrained(workdir / "tokenizer"),
                                     tokenizer_2=CLIPTokenizer.from_pretrained(workdir / "tokenizer_2"),
                                     scheduler=scheduler, **parts)


def tiny_sdxl(dtype: torch.dtype, workdir: Path):
    from diffusers import StableDiffusionXLPipeline

    from lightning_tools.tiny import write_tiny_pipeline

    return StableDiffusionXLPipeline.from_pretrained(write_tiny_pipeline(workdir / "tiny"), dtype=dtype,
                                                     local_files_only=True)


def measure(run, device: torch.device, runs: int, warmups: int) -> dict:
    """Median seconds of `run()` (one image) after `warmups` untimed calls, and the peak GPU memory while timed."""
    for _ in range(warmups):
        run()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds_per_image": statistics.median(times), "min_seconds": min(times), "runs": runs,
            "peak_gpu_memory_bytes": peak}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(pipe, device: torch.device, dtype: torch.dtype, steps: int, size: tuple[int, int], runs: int,
          variants: list[str]) -> dict:
    from diffusers import EulerDiscreteScheduler
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    height, width = size
    settings = lightning(steps)
    results: dict[str, dict] = {}
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    # 1. the model card, verbatim apart from the size
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    if "diffusers" in variants:
        results["diffusers"] = measure(
            lambda: pipe(PROMPT, num_inference_steps=steps, guidance_scale=0, height=height, width=width).images[0],
            device, runs, warmups=1)
    seeded = pipe(PROMPT, num_inference_steps=steps, guidance_scale=0, height=height, width=width,
                  generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    card_pixels = (seeded * 255).round().astype("uint8")

    def ours():
        return to_pixels(render_batch(pipe, settings, [(PROMPT, 0)], height, width)[0])

    prepare(pipe, settings, device, dtype)
    difference = image_difference(ours(), card_pixels)
    if "render" in variants:
        results["render"] = measure(ours, device, runs, warmups=1)
    if "render-classic-attention" in variants:
        pipe.unet.set_attn_processor(AttnProcessor())
        results["render-classic-attention"] = measure(ours, device, runs, warmups=1)
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    if "render-channels-last" in variants:
        prepare(pipe, settings, device, dtype, Accelerations(channels_last=True))
        results["render-channels-last"] = measure(ours, device, runs, warmups=1)
    if "render-compile" in variants:
        prepare(pipe, settings, device, dtype, Accelerations(channels_last=True, compile=True))
        start = time.perf_counter()
        ours()
        _sync(device)
        compile_seconds = time.perf_counter() - start
        results["render-compile"] = measure(ours, device, runs, warmups=1) | {"compile_seconds": compile_seconds}
    return {"results": results, "render_vs_model_card_image": difference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a real checkpoint (any form render takes) instead of random")
    parser.add_argument("--base", type=Path, help="base for a UNet-only --model or a LoRA")
    parser.add_argument("--config", type=Path, help="configs + tokenizers for an all-in-one --model")
    parser.add_argument("--tiny", action="store_true", help="the toy SDXL-structured model (smoke runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), help="default fp16 on cuda, else fp32")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--height", type=int, help="default 1024 (64 with --tiny)")
    parser.add_argument("--width", type=int, help="default 1024 (64 with --tiny)")
    parser.add_argument("--runs", type=int, default=5, help="timed images per variant")
    parser.add_argument("--variants", help="comma-separated subset of " + ", ".join(VARIANTS) + " (default: all; "
                        "on the CPU all but render-compile, whose codegen takes many minutes there)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = parse_device(args.device)
    variants = args.variants.split(",") if args.variants else \
        [v for v in VARIANTS if device.type == "cuda" or v != "render-compile"]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = TORCH_DTYPES[dtype_name]
    default_size = 64 if args.tiny else 1024
    size = (args.height or default_size, args.width or default_size)
    with tempfile.TemporaryDirectory(prefix="bench-render-") as workdir:
        if args.model:
            model = plan(args.model, base=args.base, config=args.config).model
            pipe = load_pipeline(model, dtype)
            what = str(args.model)
        elif args.tiny:
            pipe, what = tiny_sdxl(dtype, Path(workdir)), "tiny random-weight SDXL-structured model"
        else:
            pipe, what = random_sdxl(device, dtype, Path(workdir)), "full-size random-weight SDXL"
        out = bench(pipe, device, dtype, args.steps, size, args.runs, variants)

    import diffusers

    out.update(model=what, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               dtype=dtype_name, steps=args.steps, height=size[0], width=size[1], batch_size=1,
               torch=torch.__version__, diffusers=diffusers.__version__)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{what}, {size[1]}x{size[0]}, {args.steps} steps, batch 1, {dtype_name} on {out['device']} "
          f"(torch {torch.__version__}, diffusers {diffusers.__version__})")
    reference = out["results"].get("diffusers", {}).get("seconds_per_image")
    print(f"{'variant':28} {'s/image':>9} {'vs card':>8} {'peak GiB':>9}")
    for name, r in out["results"].items():
        ratio = f"{reference / r['seconds_per_image']:.2f}x" if reference else "-"
        peak = f"{r['peak_gpu_memory_bytes'] / 2**30:.2f}" if r["peak_gpu_memory_bytes"] else "-"
        extra = f"  (compile {r['compile_seconds']:.0f} s)" if "compile_seconds" in r else ""
        print(f"{name:28} {r['seconds_per_image']:9.3f} {ratio:>8} {peak:>9}{extra}")
    d = out["render_vs_model_card_image"]
    print(f"render's image vs the model card's, same seed: mean abs diff {d['mean_abs_diff']} levels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
