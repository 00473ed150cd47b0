"""Where the non-weight parts of an SDXL pipeline come from: component configs, model_index, scheduler and
tokenizers. One policy for every command that needs them (convert and merge writing a diffusers folder,
render building a pipeline, verify checking a file of another width):

- a component's config: the input's own folder, then `--config`, then the bundled SDXL-base config;
- model_index, scheduler, tokenizers: each part whole from the first place that has it complete: `--config`,
  the input's own folder, the bundled SDXL-base configs (model_index, scheduler), the local hub cache of the
  SDXL base repo, and only then a download of that repo's tokenizers (a few hundred kB), never when offline.
  A local folder's own tokenizer always wins, in whichever form the installed transformers wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_tools import hub
from lightning_tools.errors import UserError
from lightning_tools.sdxl import SDXL_BASE_CONFIGS, SDXL_BASE_REPO
from lightning_tools.sdxl.vocabulary import COMPONENT_NAMES, SUPPORT_PARTS


def read_config(path: Path) -> dict:
    """A JSON config; a damaged one is one line naming it."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read this config ({e}); fix or replace it", path=path) from None
    if not isinstance(config, dict):
        raise UserError("not a config (a JSON object expected); fix or replace it", path=path)
    return config


def check_config_dir(config_dir: Path) -> Path:
    """`--config` must be a diffusers pipeline folder (configs and tokenizers are enough, no weights)."""
    if not (config_dir / "model_index.json").is_file() and not any(
            (config_dir / c / "config.json").is_file() for c in COMPONENT_NAMES):
        raise UserError("not a diffusers pipeline folder (no model_index.json or <component>/config.json); "
                        f"--config takes a folder laid out like {SDXL_BASE_REPO}", path=config_dir)
    return config_dir


def component_configs(*, own: dict[str, Path], config_dir: Path | None) -> tuple[dict[str, dict], tuple[str, ...]]:
    """(diffusers config per component, the components whose config is the model's own rather than the bundled
    SDXL base's). `own` maps components to the config file the input itself has."""
    configs: dict[str, dict] = {}
    mine: list[str] = []
    for c in COMPONENT_NAMES:
        candidates = [own[c]] if c in own else []
        if config_dir is not None:
            candidates.append(config_dir / c / "config.json")
        found = next((p for p in candidates if p.is_file()), None)
        configs[c] = read_config(found or SDXL_BASE_CONFIGS / c / "config.json")
        if found is not None:
            mine.append(c)
    return configs, tuple(mine)


def complete(folder: Path, part: str) -> tuple[str, ...] | None:
    """The file set that makes `folder/part` complete (see `SUPPORT_PARTS`), or None."""
    for files in SUPPORT_PARTS[part]:
        if all((folder / part / name if name else folder / part).is_file() for name in files):
            return files
    return None


def support_files(*, config_dir: Path | None, source_dir: Path | None, needed_by: Path) -> dict[str, Path]:
    """Every support file of a pipeline folder: relative path -> the file to copy.

    `needed_by` names the input in the error when tokenizers are nowhere to be had."""
    folders = [d for d in (config_dir, source_dir, SDXL_BASE_CONFIGS) if d is not None]
    found: dict[str, Path] = {}
    for part in SUPPORT_PARTS:
        folder = next((f for f in folders if complete(f, part)), None)
        if folder is not None:
            target = folder / part
            files = sorted(p for p in target.iterdir() if p.is_file()) if target.is_dir() else [target]
            found.update((p.relative_to(folder).as_posix(), p) for p in files)
            continue
        files, why = _sdxl_base_part(part)
        if files is None:
            raise UserError(f"no {part} files for a diffusers pipeline: none beside the input or in --config, "
                            f"none in the local cache of {SDXL_BASE_REPO}, and {why}; pass --config DIR with an "
                            "SDXL diffusers folder (its tokenizer/ and tokenizer_2/ are used)", path=needed_by)
        found.update(files)
    return found


def _sdxl_base_part(part: str) -> tuple[dict[str, Path] | None, str]:
    """A part of the SDXL base repo from the local hub cache, else downloaded: (files, "") or (None, why not).

    Whether the hub answers is asked once, quickly, before downloading, so an offline machine gets its error at
    once instead of after the download retries."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    env = hub.HubEnv.current()
    probe = try_to_load_from_cache(SDXL_BASE_REPO, f"{part}/{SUPPORT_PARTS[part][0][0]}", cache_dir=env.cache_dir)
    if isinstance(probe, str):
        snapshot = Path(probe).parent.parent
        if complete(snapshot, part):
            return {p.relative_to(snapshot).as_posix(): p for p in sorted((snapshot / part).iterdir())}, ""
    listing, unreachable = hub.list_repo(env, SDXL_BASE_REPO, "main")
    if listing is None:
        return None, f"the hub cannot be asked ({unreachable})"
    names = sorted(n for n in listing.files if n.startswith(f"{part}/"))
    if not any(all(f"{part}/{name}" in names for name in files) for files in SUPPORT_PARTS[part]):
        return None, f"the hub's {SDXL_BASE_REPO} has no complete {part}"
    # By branch name, so the cache records refs/main and the look-up above finds these files next time.
    return {n: Path(hf_hub_download(SDXL_BASE_REPO, n, revision="main", cache_dir=env.cache_dir,
                                    endpoint=env.endpoint)) for n in names}, ""
