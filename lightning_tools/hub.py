"""Fetch a few-step family's files (or a mirror's copies) through huggingface_hub, and prove the bytes are right.

Verification is part of fetching. From the family's own repo a file's sha256 must equal the hash the catalogue
pins for it; where none is pinned (lightning_tools/families says which), the sha256 the hub lists for it at the
pinned revision, and the report says the hash is not pinned. From any other repo it must equal the sha256 that
hub lists for the file (its LFS metadata). A file that fails is removed from the hub cache and never appears at
the destination.

Downloads go through `hf_hub_download`, which brings the cache, locking, `HF_TOKEN`, offline mode and retries.
It offers no hook on the byte stream, so each file is hashed once after it lands in the cache: with `--dest`
that single read is the copy to the destination (hash while copying, rename only when the hash is right), so
the data is read once either way, usually from the page cache the download just filled.

What was fetched to a destination is recorded in a manifest beside the files (`MANIFEST_NAME`), so `verify`
and later fetches know the expected hash without the network. Files left in the hub cache need no manifest:
the cache names each LFS blob by the sha256 the hub gave for it, and `manifest_entry` reads that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_tools import families as fams
from lightning_tools.errors import UsageError, UserError
from lightning_tools.outputs import locked
from lightning_tools.progress import bar
from lightning_tools.report import Report
from lightning_tools.outputs import output
from lightning_tools.tensors import hash_file

MANIFEST_NAME = "lightning-manifest.json"
_MANIFEST_FORMAT = "lightning-tools manifest 1"
_CHUNK = 16 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# A branch or tag name, which becomes a path in the cache (refs/<name>): git's rules, in ASCII; no `..`, no part
# starting with a dot or ending in `.lock`, no leading, trailing or double slash, no trailing dot.
_REF_PART = r"[A-Za-z0-9_][A-Za-z0-9_.+@-]*"
_REF_NAME = re.compile(rf"(?!.*\.\.)(?!.*\.lock(?:/|$))(?!.*\.$){_REF_PART}(?:/{_REF_PART})*")


@dataclass(frozen=True)
class HubEnv:
    """Where the hub is and where its cache lives, read from the environment when a command runs.

    huggingface_hub copies HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE into constants at import time; reading
    them per call lets tests, recipes and the demo change them without restarting Python.
    """

    endpoint: str
    cache_dir: str
    offline: bool

    @classmethod
    def current(cls) -> "HubEnv":
        from huggingface_hub import constants

        endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
        home = os.environ.get("HF_HOME")
        cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else constants.HF_HUB_CACHE)
        flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
        offline = flag.strip().upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE
        return cls(endpoint, os.path.expanduser(cache), offline)


@dataclass(frozen=True)
class Fetched:
    """One verified file: where it is, where it came from, and whether this run downloaded or copied it.

    `filename` is its name at the destination (and in the manifest); `path_in_repo` may have folders (PCM's
    files live under sdxl/). `pinned`: the hash was checked against the one the catalogue pins, not only one a
    hub listed. `official`: these are the published bytes (their hash is pinned, or the family's own repo listed
    it; a mirror's copy counts only when its hash is pinned).
    """

    filename: str
    path: Path
    repo_id: str
    revision: str
    sha256: str
    size: int
    action: str  # "downloaded", "from cache", "already present"
    path_in_repo: str
    pinned: bool
    official: bool

    def as_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


# --- manifest ----------------------------------------------------------------------------------------------------

def read_manifest(folder: Path | str) -> dict[str, dict]:
    """filename -> {repo_id, revision, sha256, size} for the files fetched into `folder` ({} if none)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text())["files"]
        return {name: dict(entry) for name, entry in files.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise UserError(f"{path}: not a readable fetch manifest; delete it and run fetch again") from None


def _write_manifest(folder: Path, records: Sequence[Fetched]) -> None:
    with locked(folder / f".{MANIFEST_NAME}.lock"):  # two fetches into one folder: neither loses the other's record
        files = read_manifest(folder)
        for r in records:
            files[r.filename] = {"repo_id": r.repo_id, "revision": r.revision, "sha256": r.sha256, "size": r.size}
        with output(folder / MANIFEST_NAME, overwrite=True) as tmp:
            tmp.write_text(json.dumps({"format": _MANIFEST_FORMAT, "files": dict(sorted(files.items()))}, indent=2)
                           + "\n")


def manifest_entry(path: Path | str) -> dict | None:
    """What is known about where `path` came from: its fetch manifest entry, or its place in the hub cache.

    In the hub cache (`models--org--name/snapshots/<commit>/file` -> `blobs/<sha256>`) the blob's name is the
    LFS sha256 the hub listed for the file, so a cached file has an expected hash without any manifest.
    """
    path = Path(path)
    recorded = read_manifest(path.parent).get(path.name)
    if recorded is not None:
        return recorded
    return _cache_identity(path)


def _cache_identity(path: Path) -> dict | None:
    parts = path.absolute().parts
    if "snapshots" not in parts[:-1]:
        return None
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    repo_folder, commit = parts[i - 1], parts[i + 1] if i + 1 < len(parts) - 1 else ""
    blob = Path(os.path.realpath(path))
    if not repo_folder.startswith("models--") or not blob.is_file() or not _SHA256.fullmatch(blob.name):
        return None
    return {"repo_id": repo_folder[len("models--"):].replace("--", "/"), "revision": commit,
            "sha256": blob.name, "size": blob.stat().st_size}


# --- what the hub says ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Listing:
    """A repo at one commit: path -> (LFS sha256 or None, size)."""

    commit: str
    files: dict[str, tuple[str | None, int | None]]


def hub_error(e: Exception, repo_id: str, revision: str, endpoint: str, filename: str | None = None) -> UserError:
    """One line a user can act on, for the errors huggingface_hub raises."""
    import httpx2
    from huggingface_hub import errors

    where = f"{repo_id}@{revision} on {endpoint}"
    if isinstance(e, errors.GatedRepoError):
        return UserError(f"{repo_id}: gated repository; accept its terms on the hub and set HF_TOKEN")
    if isinstance(e, errors.RepositoryNotFoundError):
        return UserError(f"{repo_id}: repository not found on {endpoint}; check --repo-id "
                         "(private repositories need HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return UserError(f"{repo_id}: revision {revision!r} not found on {endpoint}; check --revision")
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return UserError(f"{where}: no file {filename}")
    if isinstance(e, errors.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return UserError(f"{where}: the hub refused access (HTTP {status}); set HF_TOKEN to a token with "
                             "the rights this needs (write access for publishing)")
        return UserError(f"{where}: the hub answered HTTP {status}; try again later")
    if isinstance(e, errors.HFValidationError):
        return UserError(f"{repo_id!r}: not a valid repo id ({str(e).splitlines()[0]})")
    if isinstance(e, (httpx2.ConnectError, httpx2.TimeoutException)):
        return UserError(f"{where}: cannot reach the hub ({type(e).__name__}: {e}); check the network or HF_ENDPOINT")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"{filename or repo_id}: {first}")


def list_repo(env: HubEnv, repo_id: str, revision: str) -> tuple[Listing | None, str | None]:
    """The repo's files and LFS hashes at `revision`, or (None, why) when the hub cannot be reached."""
    import httpx2
    from huggingface_hub import HfApi, constants, errors

    if env.offline:
        return None, "offline mode (HF_HUB_OFFLINE) is on"
    try:
        info = HfApi(endpoint=env.endpoint).model_info(repo_id, revision=revision, files_metadata=True,
                                                       timeout=constants.DEFAULT_ETAG_TIMEOUT)
    except (httpx2.ConnectError, httpx2.TimeoutException) as e:
        return None, f"cannot reach {env.endpoint} ({type(e).__name__}: {e})"
    except (errors.HfHubHTTPError, errors.HFValidationError, httpx2.HTTPError) as e:
        raise hub_error(e, repo_id, revision, env.endpoint) from e
    if not _COMMIT.fullmatch(str(info.sha)):  # it names a folder in the cache: never a path of the server's choosing
        raise UserError(f"{repo_id}@{revision} on {env.endpoint}: the hub answered commit {str(info.sha)[:60]!r}, "
                        "not 40 hex digits; refusing it (is HF_ENDPOINT a real hub?)")
    files = {s.rfilename: (s.lfs.sha256 if s.lfs else None, s.lfs.size if s.lfs else s.size)
             for s in info.siblings or []}
    return Listing(info.sha, files), None


def check_revision(revision: str) -> None:
    """A revision is a branch or tag name or a full commit id: it becomes a path in the hub cache."""
    if not (_COMMIT.fullmatch(revision) or _REF_NAME.fullmatch(revision)):
        raise UsageError(f"--revision {revision!r}: not a branch or tag name, nor a commit (40 hex digits)")


# --- fetch -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Expected:
    sha256: str | None  # None only offline for a file with no pinned hash outside the cache: nothing to compare
    size: int | None
    source: str  # says where the expected hash comes from, for error messages


def fetch(files: Sequence[fams.FamilyFile], dest: Path | str | None = None, repo_id: str | None = None,
          revision: str | None = None, overwrite: bool = False) -> "FetchReport":
    """Download (or find) the files of one family, verify each sha256, and return where the verified files are.

    `repo_id` (default: the family's own repo) names a mirror; `revision` defaults to the pinned commit for the
    family's repo and to main for a mirror. Without `dest` the files stay in the hub cache and the returned paths
    point there. With `dest` each file is copied there under its own name (without the repo's folders) and
    recorded in the manifest; a file already recorded there with the expected hash and size is not fetched again.
    """
    if not files:
        return FetchReport([])
    family = fams.family(files[0].family)
    if any(f.family != family.name for f in files):
        raise ValueError("fetch takes the files of one family at a time")
    env = HubEnv.current()
    repo_id = repo_id or family.repo_id
    official = repo_id.lower() == family.repo_id.lower()
    revision = revision or (family.revision if official else "main")
    check_revision(revision)
    dest = Path(dest) if dest is not None else None
    if dest is not None and dest.exists() and not dest.is_dir():
        raise UserError(f"{dest}: not a folder; --dest takes the folder to put the files in")
    listing: Listing | None = None
    unreachable: str | None = None
    if not official or not all(f.sha256_pinned for f in files):
        # hashes that are not pinned here come from the hub, so ask it before deciding anything
        listing, unreachable = list_repo(env, repo_id, revision)

    results = []
    for file in files:
        expected = _expected(file, official, listing, repo_id, revision, env)
        present = _already_at(dest, file.name, expected, overwrite) if dest is not None else None
        if present is not None:
            results.append(_fetched(file, dest / file.name, present["repo_id"], present["revision"],
                                    present["sha256"], present["size"], "already present", official))
            continue
        if listing is None and unreachable is None:
            listing, unreachable = list_repo(env, repo_id, revision)
            expected = _expected(file, official, listing, repo_id, revision, env)
        results.append(_fetch_one(env, file, repo_id, revision, listing, unreachable, expected, dest, official))
    if dest is not None and results:
        _write_manifest(dest, results)
    return FetchReport(results)


def _fetched(file: fams.FamilyFile, path: Path, repo_id: str, revision: str, sha256: str, size: int, action: str,
             official_repo: bool) -> Fetched:
    pinned = fams.by_sha256(sha256) is not None
    return Fetched(file.name, path, repo_id, revision, sha256, size, action, file.filename, pinned,
                   pinned or official_repo)


def _expected(file: fams.FamilyFile, official: bool, listing: Listing | None, repo_id: str, revision: str,
              env: HubEnv) -> _Expected:
    """The hash and size the bytes must have, refusing early when the hub already disagrees with them."""
    where = f"{repo_id}@{revision}"
    if listing is not None and file.filename not in listing.files:
        raise UserError(f"{where} on {env.endpoint}: no file {file.filename}")
    listed_sha, listed_size = listing.files[file.filename] if listing is not None else (None, None)
    if official:
        size = file.size if file.size_confirmed else None
        if size is not None and listed_size is not None and listed_size != size:
            raise UserError(f"{file.filename}: {where} lists {listed_size} bytes but the catalogue pins {size}; "
                            "refusing to download it")
        if file.sha256 is not None:
            if listed_sha is not None and listed_sha != file.sha256:
                raise UserError(f"{file.filename}: {where} lists sha256 {listed_sha} but the catalogue pins "
                                f"{file.sha256}; refusing to download it")
            return _Expected(file.sha256, size, "pinned in the catalogue")
    if listing is not None and listed_sha is None:
        raise UserError(f"{file.filename}: {where} has no sha256 for it (not stored with LFS), so it cannot be "
                        "verified; use a repo that stores it with LFS")
    return _Expected(listed_sha, listed_size, f"listed by {where}, not pinned in the catalogue" if official
                     else f"listed by {where}")


def _already_at(dest: Path, filename: str, expected: _Expected, overwrite: bool) -> dict | None:
    """The manifest record if `dest/filename` is verified already; refuses to replace a different file.

    "Verified" means the manifest recorded the expected hash and the size still matches. Offline, a mirror's
    expected hash is unknown, so the manifest's own record is trusted.
    """
    path = dest / filename
    if not path.is_file():
        return None
    recorded = read_manifest(dest).get(filename)
    if (recorded is not None and recorded.get("size") == path.stat().st_size
            and (expected.sha256 is None or recorded.get("sha256") == expected.sha256)):
        return recorded
    if overwrite:
        return None
    raise UserError(f"{path}: already exists and is not recorded as the expected file in {MANIFEST_NAME}; "
                    "move it away or pass --overwrite to replace it")


def _fetch_one(env: HubEnv, file: fams.FamilyFile, repo_id: str, revision: str, listing: Listing | None,
               unreachable: str | None, expected: _Expected, dest: Path | None, official: bool) -> Fetched:
    from huggingface_hub import try_to_load_from_cache

    filename = file.filename

    # Pin the download to the commit the hashes were listed at, so a branch moving in between cannot mix them.
    pinned = listing.commit if listing is not None else revision
    for attempt in (1, 2):
        was_cached = isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=env.cache_dir, revision=pinned),
                                str)
        cached = Path(_download(env, repo_id, filename, pinned, listing is None, unreachable))
        commit = cached.parent.name if _COMMIT.fullmatch(cached.parent.name) else pinned
        if listing is not None and revision != commit:
            _remember_ref(env, repo_id, revision, commit)
        if expected.sha256 is None:  # offline, no pinned hash: the cache's blob name is the hash the hub gave
            identity = _cache_identity(cached)
            if identity is None:
                raise UserError(f"{filename}: {unreachable}, and the cached copy carries no sha256 to verify it "
                                "against; fetch it again online")
            expected = _Expected(identity["sha256"], None, f"listed by {repo_id} when it was downloaded")
        try:
            size = _verify(cached, file.name, expected, dest)
        except _Mismatch as bad:
            _remove_from_cache(cached)
            if was_cached and attempt == 1:
                continue  # a damaged cache entry: it is gone now, so download a fresh copy once
            kept_out = "" if dest is None else f"; nothing was written to {dest}"
            raise UserError(f"{filename} from {repo_id}@{commit} is not the expected file: {bad}, expected sha256 "
                            f"{expected.sha256} ({expected.source}); removed it from the hub cache{kept_out}") from None
        action = "from cache" if was_cached else "downloaded"
        return _fetched(file, dest / file.name if dest is not None else cached, repo_id, commit, expected.sha256,
                        size, action, official)
    raise AssertionError("unreachable")


def _download(env: HubEnv, repo_id: str, filename: str, revision: str, local_only: bool,
              unreachable: str | None) -> str:
    import httpx2
    from huggingface_hub import errors, hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=env.cache_dir,
                               endpoint=env.endpoint, local_files_only=local_only, tqdm_class=_download_bar)
    except errors.LocalEntryNotFoundError as e:
        why = unreachable or f"cannot reach {env.endpoint}"
        raise UserError(f"{filename}: {why}, and it is not in the hub cache ({env.cache_dir}); "
                        "fetch it once with network access") from e
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError, httpx2.HTTPError) as e:
        raise hub_error(e, repo_id, revision, env.endpoint, filename) from e


def _remember_ref(env: HubEnv, repo_id: str, revision: str, commit: str) -> None:
    """Note in the cache which commit `revision` (a branch or tag) named, as hf_hub_download does itself when
    given a branch: we download by commit, and offline runs resolve the branch through this file."""
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(env.cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def _download_bar(total: int | None = None, desc: str = "", initial: int = 0, **_):
    """huggingface_hub's progress bar, made to follow our policy (quiet off a terminal)."""
    return bar(total, f"downloading {desc}", initial=initial)


class _Mismatch(Exception):
    """The bytes are not the expected file; the message says what they are instead."""


def _verify(cached: Path, filename: str, expected: _Expected, dest: Path | None) -> int:
    """Hash the cached file (copying it to `dest` on the way); raise _Mismatch unless it is the expected file."""
    size = cached.stat().st_size
    if expected.size is not None and size != expected.size:
        raise _Mismatch(f"{size} bytes instead of {expected.size}")
    if dest is None:
        actual = hash_file(cached, desc=f"verifying {filename}")
        if actual != expected.sha256:
            raise _Mismatch(f"sha256 {actual}")
    else:
        with output(dest / filename, overwrite=True) as tmp:
            actual = _copy_hashing(cached, tmp, f"verifying {filename}")
            if actual != expected.sha256:
                raise _Mismatch(f"sha256 {actual}")
    return size


def _copy_hashing(src: Path, dst: Path, desc: str) -> str:
    """Copy `src` to `dst` and return the sha256 of what was copied: one read serves both."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as f, open(dst, "wb") as out, bar(src.stat().st_size, desc) as progress:
        while n := f.readinto(buf):
            digest.update(view[:n])
            out.write(view[:n])
            progress.update(n)
    return digest.hexdigest()


def _remove_from_cache(pointer: Path) -> None:
    """Delete a cached file: the snapshot's link and the blob it points to."""
    blob = Path(os.path.realpath(pointer))
    for p in (pointer, blob):
        if p.is_symlink() or p.exists():
            p.unlink()


@dataclass
class FetchReport(Report):
    """The verified files of one fetch."""

    files: list[Fetched]

    def to_json(self) -> list:  # type: ignore[override]
        return [f.as_dict() for f in self.files]

    def describe(self) -> str:
        return "\n".join(str(f.path) for f in self.files)

    def notes(self) -> list[str]:
        """What each file was checked against, for stderr (stdout stays the list of paths)."""
        return [f"{f.filename}: {f.action}, sha256 {f.sha256[:12]}… matches " + (
            "the official file" if f.pinned else
            f"what the official {f.repo_id}@{f.revision[:12]} lists; this hash is not pinned in the catalogue, so "
            "the hub's listing is all it was checked against" if f.official else
            f"{f.repo_id}'s listed hash" + _not_the_release(f.filename, f.sha256)) for f in self.files]


def _not_the_release(filename: str, sha256: str) -> str:
    """A note for a mirror's file that bears a published name but other bytes (a re-save, a conversion)."""
    entry = fams.by_filename(filename)
    if entry is None or entry.sha256 is None or entry.sha256 == sha256:
        return ""
    return f"; these bytes are not the official release of that name ({fams.family(entry.family).title})"
