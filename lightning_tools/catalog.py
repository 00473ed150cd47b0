"""The `catalog` and `fetch` view of the few-step families (lightning_tools/families): which files to list or
fetch for a family, steps, kind and variant, and the listing people read. The data itself lives in families/.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_tools import families as fams
from lightning_tools.errors import UserError
from lightning_tools.report import Report
from lightning_tools.sampling import DEFAULT_FAMILY, Sampling, for_file


def select(family: fams.Family, *, steps: Sequence[int] = (), kinds: Sequence[str] = (),
           variant: str | None = None) -> list[fams.FamilyFile]:
    """The files to fetch: for every (steps, kind) asked for, or implied by leaving one out, the default variant
    (or the only file), or the named `variant` ("default" names the default one).

    A combination asked for explicitly must exist (the error says the nearest one that does); one implied by
    "every kind" or "every step count" is skipped when the family lacks it.
    """
    for n in steps:
        if n not in family.steps:
            raise UserError(f"{family.title} has no {n}-step file; it ships {', '.join(map(str, family.steps))} steps")
    if steps and kinds:
        return list(dict.fromkeys(_find(family, n, k, variant) for n in steps for k in kinds))
    combinations = dict.fromkeys((f.steps, f.kind) for f in family.select(steps, kinds))
    if variant is None:
        return [family.find(n, k) for n, k in combinations]
    wanted = "" if variant == "default" else variant
    chosen = [f for f in family.select(steps, kinds) if f.variant == wanted]
    if not chosen:
        variants = sorted({f.variant or "default" for f in family.select(steps, kinds)})
        raise UserError(f"{family.title} has no {variant!r} variant among these files; it has "
                        f"{', '.join(variants)}")
    return chosen


def _find(family: fams.Family, steps: int, kind: str, variant: str | None) -> fams.FamilyFile:
    """`family.find`, with the nearest step count of the same kind suggested when this one has none."""
    if kind in fams.KINDS and not family.select(steps=(steps,), kinds=(kind,)):
        others = [f.steps for f in family.select(kinds=(kind,))]
        if others:
            nearest = min(others, key=lambda n: (abs(n - steps), -n))
            raise UserError(f"{family.title} has no {steps}-step {kind}; its {kind} files are for "
                            f"{', '.join(map(str, sorted(set(others))))} steps: the nearest is --steps {nearest} "
                            f"--kind {kind}")
    return family.find(steps, kind, variant)


@dataclass
class CatalogListing(Report):
    """What `catalog` prints: every selected family with its licence, files and sampling profiles."""

    families: list[fams.Family]
    files: dict[str, list[fams.FamilyFile]]  # family name -> its selected files

    def to_json(self) -> dict:
        out = []
        for fam in self.families:
            data = fam.as_dict()
            data["files"] = [f.as_dict() | {"settings": for_file(f).as_dict()} for f in self.files[fam.name]]
            out.append(data)
        return {"families": out}

    def describe(self) -> str:
        lines: list[str] = []
        for fam in self.families:
            files = self.files[fam.name]
            lic = fam.license_info
            use = {True: "commercial use allowed", False: "NON-COMMERCIAL", None: "no licence declared"}[lic.commercial]
            lines += [f"{fam.title} ({fam.name}): {fam.repo_id}@{fam.revision[:12]}, licence {fam.license} ({use})"]
            rows = [("file", "steps", "kind", "variant", "size", "profile", "sha256")] + [
                (f.filename, str(f.steps), f.kind, f.variant or "-", _size(f), f.profile.name,
                 f.sha256[:12] if f.sha256 else "not pinned") for f in files]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
            for profile in dict.fromkeys(f.profile for f in files):
                sampling = Sampling.of(profile)
                low, high = profile.steps_range
                lines.append(f"  {sampling.describe()}" + (" (each file at its own step count)" if sampling.fixed_steps
                                                            and low != high else
                                                            f" (any of {low}-{high} steps)" if low != high else ""))
            lines.append("")
        notes = []
        if any(f.size is not None and not f.size_confirmed for fs in self.files.values() for f in fs):
            notes.append("? = size not confirmed, checked by hash only")
        if any(not f.sha256_pinned for fs in self.files.values() for f in fs):
            notes.append("not pinned = no sha256 known here: fetch checks the hub's LFS sha256 at the pinned revision")
        return "\n".join(lines + notes).rstrip()


def _size(f: fams.FamilyFile) -> str:
    if f.size is None:
        return "?"
    return f"{f.size / 1e9:.2f} GB" + ("" if f.size_confirmed else "?")


def listing(family: str | None = None, *, steps: Sequence[int] = (), kinds: Sequence[str] = ()) -> CatalogListing:
    """The catalogue of one family (or all of them), filtered by steps and kinds; an error when nothing is left."""
    chosen = [fams.family(family)] if family is not None else \
        sorted(fams.families(), key=lambda fam: fam.name != DEFAULT_FAMILY)  # the tool's own family first
    files = {fam.name: fam.select(steps, kinds) for fam in chosen}
    kept = [fam for fam in chosen if files[fam.name]]
    if not kept:
        asked = ", ".join(filter(None, [f"steps {'/'.join(map(str, steps))}" if steps else "",
                                        f"kind {'/'.join(kinds)}" if kinds else ""]))
        subject = f"{chosen[0].title} has no file" if family is not None else "no family has a file"
        raise UserError(f"{subject} with {asked}; `lightning-tools catalog` lists them all")
    return CatalogListing(kept, {fam.name: files[fam.name] for fam in kept})
