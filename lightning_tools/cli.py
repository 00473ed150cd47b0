"""The `lightning-tools` command line: parse options, call the library, print its typed result. Nothing else.

Every command returns its report (so recipes read results by attribute), prints it for people or, with
`--json`, for pipelines. Errors are one `error: ...` line: exit 1 for a problem with the input, 2 for a usage
mistake, 3 for a failed render gate, 128+N for signal N; `--debug` anywhere on the line (or
LIGHTNING_TOOLS_DEBUG=1) shows the traceback instead, `--verbose` the libraries' own messages. Heavy modules
are imported inside the commands, so `--help`, `catalog` and header-only commands start in a blink.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from lightning_tools import __version__
from lightning_tools.dtypes import OUTPUT_DTYPES
from lightning_tools.errors import ChecksFailed, Interrupted, UsageError, UserError
from lightning_tools.report import Report

_DEBUG_ENV = "LIGHTNING_TOOLS_DEBUG"


class _Group(click.Group):
    """Turns every error into one line on stderr with its exit code, unless debugging."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args or os.environ.get(_DEBUG_ENV, "") not in ("", "0")
        verbose = "--verbose" in args
        args = [a for a in args if a not in ("--debug", "--verbose")]
        if not verbose:
            from lightning_tools.progress import quiet_libraries

            quiet_libraries()
        from lightning_tools.outputs import signals_as_errors

        extra.pop("standalone_mode", None)
        try:
            with signals_as_errors(), _notes():
                super().main(args, prog_name or self.name, standalone_mode=False,
                             obj={"debug": debug, "verbose": verbose}, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help() if e.ctx else str(e))
            sys.exit(0)
        except click.exceptions.Abort:
            _fail("aborted", 1)
        except click.ClickException as e:
            if debug:
                raise
            _fail(f"{' '.join(e.format_message().split())} (see `{self._help_for(args)}`)", 2)
        except UsageError as e:
            if debug:
                raise
            _fail(f"{e} (see `{self._help_for(args)}`)", e.exit_code)
        except (UserError, Interrupted) as e:
            if debug:
                raise
            _fail(str(e) if isinstance(e, UserError) else
                  f"interrupted by {e.name}: no partial output was kept", e.exit_code)
        except OSError as e:
            if debug:
                raise
            from lightning_tools.outputs import os_error

            failure = os_error(e)
            _fail(str(failure), failure.exit_code)


    def _help_for(self, args: Sequence[str]) -> str:
        """The help command to point at: the subcommand's when the line names one."""
        command = next((a for a in args if not a.startswith("-")), None)
        return f"{self.name} {command} --help" if command in self.commands else f"{self.name} --help"


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _NoteHandler(logging.Handler):
    """Our library's log lines (a sweep of stale partial outputs, say) as `note: ...` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"note: {record.getMessage()}", err=True)


@contextlib.contextmanager
def _notes() -> Iterator[None]:
    logger = logging.getLogger("lightning_tools")
    handler = _NoteHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def emit(report: Report, as_json: bool) -> Report:
    """Print the report as JSON (for pipelines) or text (for people); return it for recipes."""
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        text = report.describe()
        if text:
            click.echo(text)
    return report


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output (atomically).")
dtype_option = click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]),
                            help="Cast floating-point tensors (integer tensors are kept).")


@click.group("lightning-tools", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lightning-tools")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors (anywhere on the line; or set "
              f"{_DEBUG_ENV}=1).")
@click.option("--verbose", is_flag=True, help="Let diffusers, transformers and huggingface_hub print their own "
              "notices, warnings and retries.")
def main(debug: bool, verbose: bool) -> None:
    """Fetch, verify, merge, convert, render and publish few-step SDXL checkpoints (SDXL-Lightning and kin)."""


# --- catalog / fetch --------------------------------------------------------------------------------------------
_steps_option = click.option("--steps", "steps", type=int, multiple=True,
                             help="Inference steps the file was distilled for (Lightning: 1, 2, 4, 8); repeatable.")
_kind_option = click.option("--kind", "kinds", type=click.Choice(["unet", "lora", "full"]), multiple=True,
                            help="unet = UNet only, lora, full = ComfyUI all-in-one checkpoint; repeatable.")


@main.command("catalog")
@click.option("--family", default=None, metavar="NAME",
              help="One few-step family (lightning, hyper_sd, dmd2, tcd, pcm, lcm_lora, sdxl_turbo); default: all.")
@_steps_option
@_kind_option
@json_option
def catalog_command(family: str | None, steps: tuple[int, ...], kinds: tuple[str, ...], as_json: bool) -> Report:
    """List the few-step SDXL families' files with hashes, licences and the sampling profile of each."""
    from lightning_tools import catalog

    return emit(catalog.listing(family, steps=steps, kinds=kinds), as_json)


@main.command("fetch")
@click.option("--family", default=None, metavar="NAME",
              help="Which family's files (default: lightning; `lightning-tools catalog` lists them).")
@_steps_option
@_kind_option
@click.option("--variant", default=None, metavar="NAME",
              help="Where a family has several files for the same steps and kind (fp32, cfg, normalcfg, pickle...); "
                   "default: the default one.")
@click.option("--all", "fetch_all", is_flag=True, help="Every file of the family (with --steps/--kind: every "
              "matching one), every variant (all of SDXL-Lightning: about 60 GB).")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path),
              help="Copy the verified files into this folder (default: leave them in the hub cache).")
@click.option("--repo-id", default=None, help="Fetch from a mirror instead of the family's own repo.")
@click.option("--revision", default=None, help="Branch, tag or commit (default: the pinned commit; main for mirrors).")
@overwrite_option
@json_option
def fetch_command(family: str | None, steps: tuple[int, ...], kinds: tuple[str, ...], variant: str | None, fetch_all: bool,
                  dest: Path | None, repo_id: str | None, revision: str | None, overwrite: bool,
                  as_json: bool) -> Report:
    """Download a family's files and verify their sha256; prints the local path of each."""
    from lightning_tools import catalog, hub
    from lightning_tools.families import family as find_family
    from lightning_tools.sampling import DEFAULT_FAMILY

    if not (steps or kinds or fetch_all):
        raise UsageError("say what to fetch: --steps N and/or --kind unet|lora|full (or --all); "
                         "`lightning-tools catalog` lists the files")
    chosen = find_family(family or DEFAULT_FAMILY)
    files = chosen.select(steps, kinds) if fetch_all else catalog.select(chosen, steps=steps, kinds=kinds,
                                                                         variant=variant)
    report = hub.fetch(files, dest=dest, repo_id=repo_id, revision=revision, overwrite=overwrite)
    if not as_json:
        for line in report.notes():
            click.echo(line, err=True)
    return emit(report, as_json)


# --- verify / inspect -------------------------------------------------------------------------------------------
_config_option = click.option("--config", "config_dir", type=click.Path(path_type=Path, file_okay=False),
                              help="A diffusers pipeline folder whose configs (and tokenizers) describe the model, "
                                   "for models of another width (default: the input's own, else SDXL base).")


@main.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--deep", is_flag=True, help="Also scan every tensor for NaN/Inf values (reads all the data).")
@_config_option
@json_option
def verify_command(paths: tuple[Path, ...], deep: bool, config_dir: Path | None, as_json: bool) -> Report:
    """Check that checkpoints and LoRAs are intact: structure, sha256, architecture (exit 0 only if all are)."""
    from lightning_tools.verify import verify_paths

    report = emit(verify_paths(paths, deep=deep, config_dir=config_dir), as_json)
    _mention_stale(paths)
    failed = [r for r in report.files if not r.ok]
    if failed:
        raise UserError(f"{len(failed)} of {len(report.files)} checked failed verification: "
                        + ", ".join(r.path for r in failed))
    return report


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--hash", "with_hash", is_flag=True, help="Hash the file to prove (or rule out) an official identity.")
@json_option
def inspect_command(path: Path, with_hash: bool, as_json: bool) -> Report:
    """What PATH is (format, components, architecture, LoRA ranks, Lightning identity) and how to sample it."""
    from lightning_tools.inspect import inspect_path

    report = emit(inspect_path(path, with_hash=with_hash), as_json)
    _mention_stale([path])
    return report


def _mention_stale(paths: Sequence[Path]) -> None:
    """A note for each folder around `paths` that holds partial outputs of runs that were killed."""
    from lightning_tools.outputs import human_size, stale_temps

    folders = dict.fromkeys(f for p in paths for f in ((p, p.parent) if os.path.isdir(p) else (p.parent,)))
    for folder in folders:
        if stale := stale_temps(folder):
            names = ", ".join(s.path.name for s in stale[:3]) + (", ..." if len(stale) > 3 else "")
            click.echo(f"note: {folder} holds {len(stale)} partial output{'s' if len(stale) > 1 else ''} of killed "
                       f"runs ({human_size(sum(s.nbytes for s in stale))}: {names}); the next command writing there "
                       "removes them", err=True)


# --- convert / merge / extract ----------------------------------------------------------------------------------

@main.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True,
              type=click.Choice(["comfyui", "diffusers", "comfyui-unet", "kohya", "peft"]),
              help="comfyui: all-in-one single file; diffusers: pipeline folder (or, for a UNet alone and an OUT "
                   "ending in .safetensors, a diffusers-named UNet file); comfyui-unet: models/unet file; "
                   "kohya/peft: LoRA formats (kohya loads everywhere; peft in diffusers/peft only).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output file or folder.")
@_config_option
@click.option("--base", type=click.Path(path_type=Path),
              help="An SDXL model (either layout) that supplies the parts SRC lacks (VAE, text encoders).")
@dtype_option
@click.option("--strict", is_flag=True, help="Fail on tensors that fit no SDXL key map instead of leaving them out.")
@overwrite_option
@json_option
def convert_command(src: Path, to: str, out: Path, config_dir: Path | None, base: Path | None, dtype: str | None,
                    strict: bool, overwrite: bool, as_json: bool) -> Report:
    """Convert SRC between diffusers and ComfyUI/A1111 layouts, or a LoRA between kohya and peft."""
    from lightning_tools.convert import ConvertReport, convert

    report = convert(src, to, out, config_dir=config_dir, base=base, dtype=dtype, strict=strict,
                     overwrite=overwrite)
    if isinstance(report, ConvertReport) and report.unknown_keys:
        unknown = report.unknown_keys
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        click.echo(f"warning: {len(unknown)} tensors fit no SDXL key map and were left out: {shown} "
                   "(--strict makes this an error)", err=True)
    return emit(report, as_json)


_blocks_option = click.option(
    "--blocks", default=None, metavar="SPEC",
    help="Per-block strengths multiplying every strength (and --alpha): NAME:VALUE pairs such as "
         "\"IN:0.5,MID:1,OUT:0.8\" or \"IN04:0.3,BASE:0\" (blocks BASE = text encoders, IN00-IN08, MID, "
         "OUT00-OUT08; groups IN, OUT; later pairs win), or 20 numbers in kohya's --lbws order.")


@main.command("merge")
@click.option("--base", required=True, type=click.Path(path_type=Path),
              help="SDXL model: diffusers folder, ComfyUI all-in-one file, or a UNet file (either naming).")
@click.option("--lora", "loras", multiple=True, type=click.Path(path_type=Path),
              help="LoRA file (kohya, LyCORIS or peft/diffusers); repeat for several.")
@click.option("--strength", "strengths", multiple=True, type=float,
              help="LoRA strength (default 1; negative removes); one for all LoRAs or one per --lora, in order.")
@click.option("--add-difference", "add_difference", multiple=True, type=click.Path(path_type=Path),
              help="A tuned model (say a full Lightning UNet, any layout) whose difference to --minus is added: "
                   "W + alpha * (TUNED - MINUS), streamed; repeatable.")
@click.option("--minus", multiple=True, type=click.Path(path_type=Path),
              help="The model --add-difference was tuned from (say SDXL base); one for all or one per "
                   "--add-difference.")
@click.option("--alpha", "alphas", multiple=True, type=float,
              help="Weight of the difference (default 1); one for all or one per --add-difference.")
@_blocks_option
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output: *.safetensors for a single file, otherwise a diffusers folder.")
@click.option("--to", type=click.Choice(["comfyui", "diffusers"]),
              help="Output layout (default: from OUT; a UNet base gives a UNet file).")
@click.option("--dtype", type=click.Choice(list(OUTPUT_DTYPES)),
              help="Cast floating-point tensors (integer tensors are kept). fp8: the UNet's matrices and convs in "
                   "float8_e4m3fn, the rest fp16, with the error against fp16 reported.")
@click.option("--compute-dtype", default="fp32", show_default=True, type=click.Choice(["fp16", "bf16", "fp32"]),
              help="Dtype of the merge arithmetic; the result is rounded once to the output dtype.")
@click.option("--device", default="cpu", show_default=True, help="Where the LoRA arithmetic runs: cpu, cuda, cuda:N.")
@_config_option
@click.option("--allow-unmatched", is_flag=True,
              help="Skip LoRA modules that fit no base weight (with a warning) instead of refusing.")
@click.option("--allow-stacking", is_flag=True,
              help="Merge two few-step accelerators (say a Lightning and a Hyper-SD LoRA, or one into an already "
                   "distilled base) instead of refusing.")
@click.option("--dry-run", is_flag=True, help="Print the plan (matches, output layout and size); write nothing.")
@overwrite_option
@json_option
def merge_command(base: Path, loras: tuple[Path, ...], strengths: tuple[float, ...],
                  add_difference: tuple[Path, ...], minus: tuple[Path, ...], alphas: tuple[float, ...],
                  blocks: str | None, out: Path, to: str | None, dtype: str | None, compute_dtype: str, device: str,
                  config_dir: Path | None, allow_unmatched: bool, allow_stacking: bool, dry_run: bool,
                  overwrite: bool, as_json: bool) -> Report:
    """Bake LoRAs (a Lightning LoRA, say) and model differences (FT + (Lightning UNet - SDXL base)) into an SDXL
    base at chosen strengths, per block if wished, streaming."""
    from lightning_tools.merge import merge

    report = merge(base, loras, out, strengths=strengths, add_difference=add_difference, minus=minus,
                   alphas=alphas, blocks=blocks, to=to, dtype=dtype, compute_dtype=compute_dtype, device=device,
                   allow_unmatched=allow_unmatched, allow_stacking=allow_stacking, dry_run=dry_run,
                   overwrite=overwrite, config_dir=config_dir)
    if report.unmatched_modules:
        click.echo(f"warning: skipped {len(report.unmatched_modules)} LoRA modules that fit no base weight "
                   f"(e.g. {report.unmatched_modules[0]})", err=True)
    return emit(report, as_json)


# Options of every command that writes a LoRA from SVD factors (extract, lora resize, lora combine).
_lora_out = click.option("--out", required=True, type=click.Path(path_type=Path), help="Output LoRA (.safetensors).")
_lora_format = click.option("--format", "lora_format", default="kohya", show_default=True,
                            type=click.Choice(["kohya", "peft"]),
                            help="kohya: the official Lightning layout, loads everywhere; peft: diffusers/peft only.")
_lora_device = click.option("--device", default="cpu", show_default=True, help="Where the SVDs run: cpu, cuda, cuda:N.")
_clamp_quantile = click.option("--clamp-quantile", type=click.FloatRange(0, 1, min_open=True),
                               help="Clip the factors at this quantile of their magnitudes, e.g. 0.99 (default: no "
                                    "clipping).")


@main.command("extract")
@click.option("--base", required=True, type=click.Path(path_type=Path),
              help="The SDXL base the model was tuned from (diffusers folder, single file or UNet file).")
@click.option("--tuned", required=True, type=click.Path(path_type=Path),
              help="The tuned model, e.g. a full SDXL-Lightning UNet (any layout).")
@click.option("--rank", required=True, type=click.IntRange(min=1), help="LoRA rank (the official files use 64).")
@click.option("--conv-rank", type=click.IntRange(min=1), help="Rank of 3x3 conv modules (default: --rank).")
@_lora_out
@_lora_format
@click.option("--dtype", default="fp16", show_default=True, type=click.Choice(["fp16", "bf16", "fp32"]),
              help="Dtype of the LoRA weights.")
@_lora_device
@click.option("--min-diff", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Leave out modules whose largest absolute weight change is at most this.")
@_clamp_quantile
@overwrite_option
@json_option
def extract_command(base: Path, tuned: Path, rank: int, conv_rank: int | None, out: Path, lora_format: str,
                    dtype: str, device: str, min_diff: float, clamp_quantile: float | None, overwrite: bool,
                    as_json: bool) -> Report:
    """Extract a LoRA of any rank from TUNED - BASE (e.g. a full Lightning UNet minus SDXL base), with its error."""
    from lightning_tools.extract import extract_lora

    return emit(extract_lora(base, tuned, out, rank=rank, conv_rank=conv_rank, format=lora_format, device=device,
                             min_diff=min_diff, clamp_quantile=clamp_quantile, dtype=dtype, overwrite=overwrite),
                as_json)


# --- lora resize / combine --------------------------------------------------------------------------------------

@main.group("lora")
def lora_group() -> None:
    """Resize a LoRA to a lower rank or combine several into one, with an error report per module."""


@lora_group.command("resize")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--rank", required=True, type=click.IntRange(min=1),
              help="New rank (with --dynamic: the largest rank a module may keep).")
@click.option("--conv-rank", type=click.IntRange(min=1), help="New rank of 3x3 conv modules (default: --rank).")
@click.option("--dynamic", type=click.Choice(["sv_fro", "sv_ratio", "sv_cumulative"]),
              help="Choose each module's rank from its singular values, as kohya's resize_lora.py: sv_fro keeps "
                   "this fraction of the Frobenius norm, sv_cumulative of the sum of singular values, sv_ratio the "
                   "values at least the largest divided by this.")
@click.option("--dynamic-param", type=float, help="The fraction (sv_fro, sv_cumulative) or ratio (sv_ratio).")
@_lora_out
@_lora_format
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="Dtype of the output (default: the "
              "source's).")
@_lora_device
@overwrite_option
@json_option
def lora_resize_command(src: Path, rank: int, conv_rank: int | None, dynamic: str | None,
                        dynamic_param: float | None, out: Path, lora_format: str, dtype: str | None, device: str,
                        overwrite: bool, as_json: bool) -> Report:
    """Resize the LoRA/LoCon SRC to a lower rank; modules already at or below it are copied unchanged."""
    from lightning_tools.lora_tools import resize_lora

    return emit(resize_lora(src, out, rank=rank, conv_rank=conv_rank, dynamic=dynamic, dynamic_param=dynamic_param,
                            format=lora_format, dtype=dtype, device=device, overwrite=overwrite), as_json)


@lora_group.command("combine")
@click.argument("loras", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--strength", "strengths", multiple=True, type=float,
              help="Strength of each LoRA in the sum (default 1); one for all or one per LoRA, in order.")
@click.option("--rank", required=True, type=click.IntRange(min=1), help="Rank of the combined LoRA.")
@click.option("--conv-rank", type=click.IntRange(min=1), help="Rank of 3x3 conv modules (default: --rank).")
@_blocks_option
@_clamp_quantile
@_lora_out
@_lora_format
@click.option("--dtype", default="fp16", show_default=True, type=click.Choice(["fp16", "bf16", "fp32"]),
              help="Dtype of the output.")
@_lora_device
@click.option("--allow-stacking", is_flag=True, help="Combine two few-step accelerators instead of refusing.")
@overwrite_option
@json_option
def lora_combine_command(loras: tuple[Path, ...], strengths: tuple[float, ...], rank: int, conv_rank: int | None,
                         blocks: str | None, clamp_quantile: float | None, out: Path, lora_format: str, dtype: str,
                         device: str, allow_stacking: bool, overwrite: bool, as_json: bool) -> Report:
    """Combine LoRAs (any variant but DoRA) into one: the sum of their changes at their strengths, refactorised
    to --rank by SVD."""
    from lightning_tools.lora_tools import combine_loras

    return emit(combine_loras(loras, out, strengths=strengths, rank=rank, conv_rank=conv_rank, blocks=blocks,
                              clamp_quantile=clamp_quantile, format=lora_format, dtype=dtype, device=device,
                              allow_stacking=allow_stacking, overwrite=overwrite), as_json)


# --- render -----------------------------------------------------------------------------------------------------

@main.command("render")
@click.argument("model", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path),
              help="Full SDXL model (diffusers folder or all-in-one file) giving a UNet-only file or a LoRA its "
                   "VAE and text encoders (among several MODELs, those that need one).")
@click.option("--config", type=click.Path(path_type=Path, file_okay=False),
              help="Diffusers SDXL folder with configs and tokenizers, for an all-in-one file.")
@click.option("--family", default=None, metavar="NAME",
              help="Sample MODEL as this few-step family (lightning, hyper_sd, dmd2, tcd, pcm, lcm_lora, sdxl_turbo) "
                   "when nothing in it says so; the profile follows --steps (`lightning-tools catalog` lists them).")
@click.option("--profile", default=None, metavar="NAME",
              help="The family's sampling profile by name (e.g. ddim-trailing-cfg), instead of the one --steps picks.")
@click.option("--steps", type=click.IntRange(min=1), help="Override the checkpoint's step count.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "sample"]),
              help="Override the checkpoint's prediction type (sample = the 1-step x0 model).")
@click.option("--guidance-scale", type=float, help="Override the profile's guidance scale (Lightning: 0, no CFG).")
@click.option("--lora-strength", type=float,
              help="Strength a LoRA MODEL is merged into --base at (default: its profile's recommendation).")
@click.option("--prompt", "prompts", multiple=True, help="A prompt; repeat for several. Default: a fixed set.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="File with one prompt per line.")
@click.option("--seed", "seeds", type=int, multiple=True, help="Seed; repeat for several (default 0). Every "
              "prompt is rendered with every seed.")
@click.option("--height", type=int, help="Default: the profile's resolution (1024; SDXL-Turbo 512).")
@click.option("--width", type=int, help="Default: the profile's resolution (1024; SDXL-Turbo 512).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--device", default="cuda", show_default=True, help="cuda, cuda:N or cpu. Under a launcher, cuda is "
              "each process's own GPU.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="Default: fp16 on CUDA, fp32 on CPU.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: render-<model name>, or "
              "render-models for several).")
@click.option("--reference", type=click.Path(path_type=Path), help="Output folder of an earlier render: each image "
              "is compared with the one of the same prompt, seed, size and steps there (of the same model, when "
              "it rendered several).")
@click.option("--max-diff", type=float, help="Largest mean absolute difference to --reference, in 8-bit levels "
              "(default 3).")
@click.option("--channels-last", is_flag=True, help="Run the UNet in channels_last memory format.")
@click.option("--compile", "compile_unet", is_flag=True, help="torch.compile the UNet (slow first image).")
@click.option("--comfyui-workflow", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a ComfyUI API workflow JSON for the model instead of rendering.")
@click.option("--print-comfyui", is_flag=True, help="Print the ComfyUI equivalent settings instead of rendering.")
@overwrite_option
@json_option
@click.pass_context
def render_command(ctx: click.Context, model: tuple[Path, ...], base: Path | None, config: Path | None,
                   family: str | None, profile: str | None, steps: int | None, prediction_type: str | None,
                   guidance_scale: float | None, lora_strength: float | None, prompts: tuple[str, ...],
                   prompts_file: Path | None, seeds: tuple[int, ...], height: int | None, width: int | None,
                   batch_size: int, device: str, dtype: str | None, out: Path | None, reference: Path | None,
                   max_diff: float | None, channels_last: bool, compile_unet: bool, comfyui_workflow: Path | None,
                   print_comfyui: bool, overwrite: bool, as_json: bool) -> Report | None:
    """Render validation images of each MODEL with the sampling profile it was distilled for, check them, write
    a report.

    Several MODELs get a folder each and a grid comparing them. Under `accelerate launch` or `torchrun` the
    processes share the work and the main one writes the output. Exits 3 when an image fails a check (NaN/Inf,
    blank, out of range, too far from --reference)."""
    from lightning_tools.render.world import launched

    settings = dict(steps=steps, prediction_type=prediction_type, guidance_scale=guidance_scale, family=family,
                    profile=profile, lora_strength=lora_strength)
    try:
        if prompts and prompts_file:
            raise UsageError("--prompt and --prompts: give one or the other")
        if print_comfyui or comfyui_workflow is not None:
            from lightning_tools import comfyui
            from lightning_tools.render.plan import plan as plan_render

            if len(model) > 1:
                raise UsageError("--print-comfyui and --comfyui-workflow take one MODEL")
            plan = plan_render(model[0], base=base, config=config, **settings)  # headers only: fast
            height, width = _size(plan, height, width)
            for warning in plan.warnings:
                click.secho(f"warning: {warning}", err=True, fg="yellow", bold=True)
            return emit(comfyui.export(plan, prompt=prompts[0] if prompts else None, seed=(seeds or (0,))[0],
                                       width=width, height=height, workflow_path=comfyui_workflow,
                                       overwrite=overwrite), as_json)
        from lightning_tools.render import run

        world = run.World.join(device)
        with world.together():  # a file missing on one machine stops all of them, said once
            plans = run.plans_for(model, base=base, config=config, **settings)  # headers only: fast
            sizes = {_size(plan, height, width) for plan in plans}
            if len(sizes) > 1:
                raise UsageError("these models are sampled at different resolutions; give --height and --width")
            height, width = sizes.pop()
            for plan in plans:  # whatever would fail later fails now, in one line, before the warnings
                run.preflight(plan, device)
            prompt_list = list(prompts) or (run.read_prompts(prompts_file) if prompts_file else
                                            list(run.DEFAULT_PROMPTS))
        if world.is_main:
            for plan in plans:
                for warning in plan.warnings:
                    click.secho(f"warning: {warning}", err=True, fg="yellow", bold=True)
        out = out or Path(f"render-{plans[0].model.path.stem}" if len(plans) == 1 else run.SEVERAL_MODELS_OUT)
        report = run.render(plans[0] if len(plans) == 1 else plans, out, prompts=prompt_list, seeds=seeds or (0,),
                            height=height, width=width, batch_size=batch_size, device=device, dtype=dtype,
                            accelerations=run.Accelerations(channels_last, compile_unet), reference=reference,
                            overwrite=overwrite,
                            max_diff=run.checks.DEFAULT_MAX_DIFF if max_diff is None else max_diff)
        if report is None:
            return None  # another process of a launch: the main one reports
        emit(report, as_json)
        failed = report.failures()
        if failed:
            total = len(report.images) if isinstance(report, run.RenderReport) else \
                sum(m.images for m in report.models)
            raise ChecksFailed(f"{len(failed)} of {total} images failed: {'; '.join(failed)}",
                               path=out / "report.json")
        return report
    except (UserError, Interrupted) as e:
        if launched()[0] != 0:
            ctx.exit(e.exit_code)  # the main process says it, once
        raise


def _size(plan, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width): as given, else the profile's resolution; both positive multiples of 8."""
    default_width, default_height = plan.settings.profile.resolution
    height = default_height if height is None else height
    width = default_width if width is None else width
    if height % 8 or width % 8 or height < 8 or width < 8:
        raise UsageError(f"--height {height} --width {width}: both must be positive multiples of 8")
    return height, width


# --- run / demo -------------------------------------------------------------------------------------------------

@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe variable.")
@click.option("--dry-run", is_flag=True, help="Check the recipe and print the commands without running them.")
@click.option("--force", is_flag=False, flag_value="", default=None, metavar="[STEP]",
              help="Run again even if unchanged: every step, or STEP and the steps that use its output.")
@click.option("--allow-outside", is_flag=True, help="Let the recipe's workdir lie outside the recipe's folder.")
@json_option
@click.pass_context
def run_command(ctx: click.Context, recipe: Path, overrides: tuple[str, ...], dry_run: bool, force: str | None,
                allow_outside: bool, as_json: bool) -> None:
    """Run the steps of a TOML recipe in order; unchanged steps are skipped. Exits with a failed step's code."""
    from lightning_tools.recipes import load_recipe, run_recipe

    loaded = load_recipe(recipe, overrides, commands=step_commands(), allow_outside=allow_outside)
    echo = (lambda line: None) if as_json else (lambda line: click.echo(line, err=not dry_run))
    results = run_recipe(loaded, dry_run=dry_run, force=True if force == "" else force or False, echo=echo,
                         obj=ctx.obj)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2, default=str))
    elif not dry_run:
        click.echo(f"recipe done: {sum(r.status == 'ran' for r in results)} step(s) ran, "
                   f"{sum(r.status == 'skipped' for r in results)} skipped")


def step_commands() -> dict[str, click.Command]:
    """The commands a recipe step may name, a group's as "GROUP COMMAND" ("lora resize")."""
    table: dict[str, click.Command] = {}
    for name, command in main.commands.items():
        if isinstance(command, click.Group):
            table |= {f"{name} {sub}": c for sub, c in command.commands.items()}
        else:
            table[name] = command
    return table


@main.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path), default="lightning-demo")
@json_option
@click.pass_context
def demo(ctx: click.Context, folder: Path, as_json: bool) -> None:
    """Run merge, verify, convert, render, extract, lora resize and a model card on a tiny model in FOLDER."""
    from lightning_tools.demo import describe, run_demo

    results = run_demo(folder, commands=step_commands(), echo=(lambda line: None) if as_json else click.echo,
                       obj=ctx.obj)
    click.echo(json.dumps([r.as_dict() for r in results], indent=2, default=str) if as_json else describe(results))


# --- publish ----------------------------------------------------------------------------------------------------

@main.command("publish")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Hub repo to publish to (created if missing), e.g. you/my-model.")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", default="main", show_default=True, help="Branch to commit to (created if missing).")
@click.option("--validation", type=click.Path(file_okay=False, path_type=Path),
              help="A `lightning-tools render` output folder: its contact sheet goes into the card.")
@click.option("--steps", type=int, help="Step count, when the model's metadata and name do not say.")
@click.option("--family", default=None, metavar="NAME",
              help="The few-step family it samples as, when its metadata and name do not say (default: "
                   "SDXL-Lightning); `lightning-tools catalog` lists them.")
@click.option("--licence", "--license", "licence", default=None, metavar="ID",
              help="The card's licence (a hub licence id); default: the family's. Needed to publish a model made "
                   "from a non-commercial family (DMD2, SDXL-Turbo) under another licence.")
@click.option("--base-model", "base_models", multiple=True,
              help="Hub id of the SDXL base it was merged into, for the card's base_model; repeatable.")
@_config_option
@click.option("--dry-run", is_flag=True, help="Write the card and list the upload; no network access.")
@click.option("--card", type=click.Path(dir_okay=False, path_type=Path),
              help="Where --dry-run writes the card (default: ./<repo name>.README.md).")
@overwrite_option
@json_option
def publish_command(src: Path, repo_id: str, private: bool, revision: str, validation: Path | None,
                    steps: int | None, family: str | None, licence: str | None, base_models: tuple[str, ...],
                    config_dir: Path | None, dry_run: bool, card: Path | None, overwrite: bool,
                    as_json: bool) -> Report:
    """Verify a checkpoint, write its model card and upload both to the hub in one commit."""
    from lightning_tools import publish

    plan = publish.plan_publish(src, repo_id, revision=revision, private=private, validation=validation,
                                steps=steps, family=family, licence=licence, base_models=base_models,
                                config_dir=config_dir)
    if dry_run:
        card = card or Path(f"{repo_id.split('/')[-1]}.README.md").absolute()
        return emit(publish.write_card(plan, card, overwrite=overwrite), as_json)
    return emit(publish.upload(plan), as_json)
