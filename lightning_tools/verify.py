"""Is this checkpoint intact, and is it the file it claims to be?

Checks run cheapest first and stop at the first layer that fails: the safetensors structure (header alone:
catches truncated and padded files without reading the data), the size against a known reference, the sha256
(only when there is a reference to compare with: the few-step catalogue (lightning_tools/families), the fetch
manifest beside the file, or the file's own `modelspec.hash_sha256`), architecture sanity, and with `deep` a
NaN/Inf scan tensor by tensor.
A diffusers folder is verified component by component.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lightning_tools import families as fams
from lightning_tools import hub, lora, support
from lightning_tools import provenance as prov
from lightning_tools.errors import UserError
from lightning_tools.outputs import os_error
from lightning_tools.report import Report
from lightning_tools.sdxl import detect
from lightning_tools.sdxl.vocabulary import COMPONENT_NAMES
from lightning_tools.stream import lazy_tensors, scan
from lightning_tools.tensors import PickleFile, SafetensorsFile, TensorSource, hash_file, hash_file_and_data, open_file, weight_files


@dataclass
class FileReport(Report):
    """The verdict on one file, or on one component of a diffusers folder (which may span shards)."""

    path: str
    component: str | None = None
    files: list[str] = field(default_factory=list)
    size: int = 0
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    identity: list[dict] = field(default_factory=list)
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return super().to_json() | {"ok": self.ok}

    def describe(self) -> str:
        """A few lines for people: verdict, path, what was checked or what is wrong."""
        name = self.path + (f"  ({self.component})" if self.component else "")
        if not self.ok:
            return "\n".join([f"FAIL  {name}"] + [f"      - {p}" for p in self.problems])
        said = [f"sha256 matches {i['reference']}" for i in self.identity] + self.notes
        return f"OK    {name}  [{', '.join(self.checks)}]" + "".join(f"\n      {s}" for s in said)


@dataclass
class VerifyReport(Report):
    """Every file or diffusers component checked; `ok` only if all passed."""

    files: list[FileReport]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    def to_json(self) -> dict:
        return {"ok": self.ok, "files": [f.to_json() for f in self.files]}

    def describe(self) -> str:
        return "\n".join(f.describe() for f in self.files)


def verify_paths(paths: Iterable[Path | str], *, deep: bool = False,
                 config_dir: Path | str | None = None) -> VerifyReport:
    """One report per file or diffusers component under `paths`; bad input becomes a failed report and the
    others are still checked. Single files are checked against the SDXL-base shapes, or against `config_dir`'s
    configs when given."""
    configs = load_configs(config_dir)
    reports: list[FileReport] = []
    for path in map(Path, paths):
        try:
            found = [_verify_unit(unit, component, deep, configs) for component, unit in _units(path)]
        except (UserError, OSError) as e:  # a name too long, a file that cannot be read: this path fails
            error = e if isinstance(e, UserError) else os_error(e, None if e.filename else path)
            reports.append(FileReport(str(path), problems=[_reason(error, path)]))
            continue
        reports += found
    return VerifyReport(reports)


def _units(path: Path) -> list[tuple[str | None, Path]]:
    """What to verify under `path`: (diffusers component name or None, file or component folder)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.name.endswith(".index.json"):  # a sharded model: verify the folder its shards are in
        return _units(path.parent)
    if path.is_file():
        return [(None, path)]
    index = path / "model_index.json"
    if index.is_file():
        try:
            names = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0]]
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{index}: not valid JSON; the diffusers folder is damaged") from None
        # Model components carry config.json; tokenizers and schedulers have no weights to verify.
        components = [n for n in names if (path / n / "config.json").is_file()]
        return [(n, path / n) for n in components]
    if (path / "config.json").is_file():  # one component folder: its name says which, if it is a standard one
        return [(path.name if path.name in COMPONENT_NAMES else None, path)]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: a folder with no .safetensors files; give a .safetensors file or a diffusers folder")
    return [(None, f) for f in files]


def _verify_unit(path: Path, component: str | None, deep: bool, configs: Mapping[str, dict]) -> FileReport:
    report = FileReport(str(path), component)
    report.checks.append("structure")
    try:
        files = weight_files(path)  # a component folder's shards (or its only file); a file is itself
    except UserError as e:
        report.problems.append(_reason(e, path))
        return report
    report.files = [str(f) for f in files]
    opened = []
    for f in files:
        try:
            opened.append(open_file(f))
        except UserError as e:
            report.problems.append(_reason(e, path))
    if report.problems:
        return report
    report.size = sum(f.path.stat().st_size for f in opened)
    source = TensorSource(opened)
    try:
        for f in opened:
            _check_identity(f, report)
        if report.problems:
            return report
        _check_architecture(path, component, source, report, configs)
        if deep:
            _scan_finite(source, report)
    except UserError as e:  # e.g. an unreadable config.json or manifest: this unit fails, the others go on
        report.problems.append(_reason(e, path))
    return report


def _reason(e: UserError, path: Path) -> str:
    """The error's message, without the path when it is the one the report already names."""
    return e.message if e.path is not None and Path(e.path) == path else str(e)


def _catalogued(file: fams.FamilyFile) -> str:
    return f"catalogue: {fams.family(file.family).repo_id}/{file.filename}"


def _check_identity(f: SafetensorsFile | PickleFile, report: FileReport) -> None:
    """Compare size, then sha256, against every reference the file has; hash only when one exists."""
    size = f.path.stat().st_size
    name = "" if len(report.files) == 1 else f"{f.path.name}: "  # shards of one component: say which
    whole: list[tuple[str, str]] = []  # (what the reference is, sha256 of the whole file)
    # A file we wrote (say the all-in-one built from the UNet release) may carry a published name; its own
    # metadata says what it is, so its name is not a claim to be the published download.
    ours = prov.TOOL in f.metadata
    recorded = hub.manifest_entry(f.path)
    named = fams.by_filename(f.path.name) if not ours else None
    # A fetch manifest (or the hub cache) beside the file is the more specific record: it says which repo's bytes
    # these are, so a mirror's copy under a published name is checked against the mirror, with a note.
    entry = named if recorded is None else None
    if entry is not None:
        what = _catalogued(entry)
        if entry.size is not None and entry.size_confirmed and size != entry.size:
            report.problems.append(f"{name}{size} bytes but {what} has {entry.size}")
        if entry.sha256 is not None:
            whole.append((what, entry.sha256))
        else:
            report.notes.append(f"{name}{what} has no pinned sha256 (fetch checks the hub's)")
    if recorded is not None:
        what = f"manifest: {recorded.get('repo_id')}@{str(recorded.get('revision'))[:12]}"
        if recorded.get("size") is not None and size != recorded["size"]:
            report.problems.append(f"{name}{size} bytes but {what} recorded {recorded['size']}")
        whole.append((what, recorded["sha256"]))
    spec = prov.data_hash(f.metadata)
    # diffusers' default LoRA name, shared by catalogued files (TCD, LCM-LoRA): their hashes may tell which it is
    generic = [c for c in fams.files_named(f.path.name) if not c.name_identifies and c.sha256] if not ours else []
    if report.problems:
        return  # a size mismatch already proves the bytes differ: no need to hash
    if whole or (generic and spec is None):
        digest = hash_file(f.path)
        report.sha256 = digest if len(report.files) == 1 else None
        published = fams.by_sha256(digest)
        if published is not None and entry is None:
            report.identity.append({"reference": _catalogued(published), "sha256": digest})
        if not whole:  # only the candidates a generic name suggests, and none of them is a claim
            if published is not None:
                report.checks.append("sha256")
            else:
                report.notes.append(f"{name}not the {' or '.join(fams.family(c.family).title for c in generic)} "
                                    f"file of that name (every diffusers LoRA is called {f.path.name})")
            return
        references = whole
    elif spec is not None:
        whole_file, digest = hash_file_and_data(f.path, f.data_start)
        report.sha256 = whole_file if len(report.files) == 1 else None  # publish reuses it: no second read
        references = [(f"{prov.HASH_KEY} in the header", spec)]
    else:
        report.notes.append(f"{name}no reference hash (not in the catalogue, no fetch manifest, no modelspec hash)")
        return
    report.checks.append("sha256")
    if named is not None and recorded is not None and named.sha256 not in (None, digest):
        report.notes.append(f"{name}these bytes are not the official release of {f.path.name} "
                            f"({_catalogued(named)}): they are what {recorded.get('repo_id')} holds under that name")
    for what, expected in references:
        if digest == expected.lower():
            report.identity.append({"reference": what, "sha256": digest})
        else:
            report.problems.append(f"{name}sha256 {digest} differs from {what} ({expected}): the data is damaged "
                                   "or not that file; fetch it again")


def _check_architecture(path: Path, component: str | None, source: TensorSource, report: FileReport,
                        configs: Mapping[str, dict]) -> None:
    """Keys and shapes an SDXL model needs (against the folder's own config where it has one, else `configs`,
    else SDXL base); for LoRAs, every module must name an SDXL module. Other architectures are noted, not failed,
    unless the file claims to be SDXL."""
    if component is None and lora.detect_lora_format(source) is not None:
        report.checks.append("architecture")
        try:
            unknown = lora_modules_not_in_sdxl(lora.read_lora(path))
        except UserError as e:
            report.problems.append(_reason(e, path))
            return
        if unknown:
            report.problems.append(f"{len(unknown)} LoRA modules name nothing in SDXL (e.g. {unknown[0]}); "
                                   "is this an SDXL LoRA?")
        return
    own = path / "config.json"
    if own.is_file():
        configs = dict(configs) | {component or "unet": support.read_config(own)}
    if component is None:
        found = detect.detect(path)
        if found.architecture != "sdxl-base":
            claim = _claims_sdxl(path, source)
            (report.problems if claim else report.notes).append(
                f"SDXL architecture not checked: this is {found.description}"
                + (f", yet {claim} says SDXL" if claim else ""))
            return
    report.checks.append("architecture")
    problems = detect.check_architecture(lazy_tensors(source), component, configs)
    if problems and not configs and component is None and "wrong shape" in " ".join(problems):
        problems.append("if this is an SDXL-architecture model of another width, pass --config DIR with its "
                        "diffusers configs")
    report.problems += problems


def _claims_sdxl(path: Path, source: TensorSource) -> str | None:
    """What says this file is SDXL: its catalogue name or its ModelSpec architecture."""
    if fams.by_filename(path.name) is not None:
        return "its catalogue file name"
    if source.metadata.get(prov.ARCHITECTURE, "").startswith(prov.ARCH_BASE):
        return "its modelspec.architecture"
    return None


def load_configs(config_dir: Path | str | None) -> dict[str, dict]:
    """The component configs of a diffusers pipeline folder (for checking single files of a non-standard size)."""
    if config_dir is None:
        return {}
    config_dir = support.check_config_dir(Path(config_dir))
    found = {c: config_dir / c / "config.json" for c in COMPONENT_NAMES}
    return {c: support.read_config(p) for c, p in found.items() if p.is_file()}


def lora_modules_not_in_sdxl(lora_file: lora.LoraFile) -> list[str]:
    """The LoRA's module names (as the file spells them) that adapt no module of the SDXL base."""
    names, _ = lora.sdxl_module_names()
    return lora_file.unresolved + [m.name for m in lora_file.modules if m.module not in names.get(m.component, ())]


def _scan_finite(source: TensorSource, report: FileReport) -> None:
    """Count NaN/Inf values tensor by tensor: memory stays at one tensor however large the model."""
    report.checks.append("finite")
    bad = scan(lazy_tensors(source))
    if bad:
        listed = [f"{key} ({count} of {numel})" for key, (count, numel) in bad.items()]
        more = f" and {len(listed) - 5} more tensors" if len(listed) > 5 else ""
        report.problems.append(f"NaN/Inf values in {', '.join(listed[:5])}{more}")
