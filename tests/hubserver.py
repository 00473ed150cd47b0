"""A local, hub-compatible HTTP server so tests exercise huggingface_hub for real, without the network.

It speaks the parts of the Hugging Face Hub protocol that huggingface_hub 2.4.0 uses for downloads:

- `HEAD`/`GET /{repo_id}/resolve/{revision}/{path}`: `X-Repo-Commit`, `ETag` (git blob id), and for LFS files
  `X-Linked-Etag` (the sha256) and `X-Linked-Size`; `Content-Length`; byte ranges (206). Errors are 404s with
  the `X-Error-Code` the client maps to RepositoryNotFound / RevisionNotFound / EntryNotFound.
- `GET /api/models/{repo_id}[/revision/{rev}]` (`?blobs=true` adds size, blobId and `lfs`), and
  `POST /api/models/{repo_id}/paths-info/{rev}`.

and what `HfApi.create_repo`, `create_branch` and `create_commit` use for uploads:

- `POST /api/repos/create`, `POST /api/models/{repo_id}/branch/{branch}`, `POST /api/validate-yaml`;
- `POST /api/models/{repo_id}/preupload/{rev}` (which files go to LFS),
- `POST /{repo_id}.git/info/lfs/objects/batch` (LFS batch API, "basic" transfer) answered with upload and verify
  actions on this server: `PUT /lfs-objects/{oid}` stores the bytes, `POST /lfs-verify/{oid}` checks their sha256;
- `POST /api/models/{repo_id}/commit/{rev}` (ndjson: header, file, lfsFile, deletedFile).

It never advertises Xet (no `X-Xet-*` headers, no `xetHash`), so the client uses plain HTTP; tests/conftest.py
also sets HF_HUB_DISABLE_XET so uploads take the LFS path. Repos are kept in memory as a list of commits;
`add_file` makes a commit, like a push would. Set `token` to require `Authorization: Bearer <token>` for writes.

Use the `hub_server` fixture: it starts a server on 127.0.0.1 (ephemeral port) and points `HF_ENDPOINT` at it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import base64
from urllib.parse import parse_qs, unquote, urlsplit

import pytest


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A file's content as the hub describes it. `sha256` may differ from the data to play a lying mirror."""

    data: bytes
    lfs: bool
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file that git stores in place of an LFS file."""
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def oid(self) -> str:
        """The git blob id: of the pointer for LFS files, of the content otherwise."""
        return git_blob_id(self.pointer if self.lfs else self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # sha -> tree (path -> Blob)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    messages: dict[str, str] = field(default_factory=dict)  # sha -> commit message

    def resolve(self, revision: str) -> str | None:
        """A branch name or a full commit sha -> commit sha (None if unknown)."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def commit(self, branch: str, changes: dict[str, Blob | None], message: str = "") -> str:
        """A new commit on `branch` (created from main if new): `None` deletes a path. Returns its sha."""
        parent = self.branches.get(branch) or self.branches.get("main")
        tree = dict(self.commits.get(parent, {})) if parent else {}
        for path, blob in changes.items():
            if blob is None:
                tree.pop(path, None)
            else:
                tree[path] = blob
        sha = hashlib.sha1(f"{self.repo_id}\n{parent}\n{len(self.commits)}\n{message}".encode()).hexdigest()
        self.commits[sha] = tree
        self.messages[sha] = message
        self.branches[branch] = sha
        return sha


class HubServer:
    """In-memory repos served over HTTP. `downloads` counts GETs of file content per (repo_id, path)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, shared by all repos like the hub's storage
        self.token: str | None = None
        self.downloads: Counter[tuple[str, str]] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hubserver", daemon=True)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            if repo_id not in self.repos:
                repo = self.repos[repo_id] = Repo(repo_id, private)
                repo.commit("main", {}, "initial commit")
            return self.repos[repo_id]

    def add_file(self, repo_id: str, path: str, content: bytes | str | Path, revision: str = "main",
                 lfs: bool | None = None, sha256: str | None = None) -> str:
        """Commit `content` (bytes or a local file) as `path` on branch `revision`; returns the commit sha.

        `lfs` defaults to True for .safetensors files, as on the hub. `sha256` overrides the LFS hash the hub
        advertises, to simulate a hub whose bytes do not match its metadata.
        """
        data = Path(content).read_bytes() if isinstance(content, (str, Path)) else bytes(content)
        lfs = path.endswith(".safetensors") if lfs is None else lfs
        blob = Blob(data, lfs, sha256 or hashlib.sha256(data).hexdigest())
        repo = self.create_repo(repo_id)
        with self.lock:
            return repo.commit(revision, {path: blob}, f"add {path}")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """What the repo holds at `revision` (for asserting what an upload left there)."""
        repo = self.repos[repo_id]
        return {path: blob.data for path, blob in repo.commits[repo.resolve(revision)].items()}


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        server_state = hub

    return Handler


_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_MODEL_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_PATHS_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)$")
_CREATE_REPO = re.compile(r"^/api/repos/create$")
_VALIDATE_YAML = re.compile(r"^/api/validate-yaml$")
_BRANCH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)$")
_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/lfs-objects/(?P<oid>[0-9a-f]{64})$")
_LFS_VERIFY = re.compile(r"^/lfs-verify/(?P<oid>[0-9a-f]{64})$")
# What the hub's default .gitattributes sends to LFS (the subset that matters for checkpoints and images).
_LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".png", ".jpg",
                 ".jpeg", ".webp", ".gguf", ".zip", ".tar.gz")


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every response sets Content-Length
    server_state: HubServer

    def log_message(self, *args) -> None:  # quiet: pytest shows failures, not access logs
        pass

    # --- plumbing -------------------------------------------------------------------------------------------

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.server_state.lock:
            self.server_state.requests.append((method, url.path))
        self._head = method == "HEAD"  # a HEAD answer has the GET's headers and no body
        body = self._body()
        for pattern, handler in self._routes(method):
            match = pattern.match(path)
            if match:
                return handler(**match.groupdict(), query=query, body=body)
        self._error(404, "NotFound", f"no route for {method} {path}")

    def _routes(self, method: str):
        if method in ("GET", "HEAD"):
            yield _MODEL_INFO, self.model_info
            yield _RESOLVE, self.resolve
        if method == "POST":
            yield _PATHS_INFO, self.paths_info
            yield _CREATE_REPO, self.create_repo
            yield _VALIDATE_YAML, self.validate_yaml
            yield _BRANCH, self.create_branch
            yield _PREUPLOAD, self.preupload
            yield _COMMIT, self.commit
            yield _LFS_BATCH, self.lfs_batch
            yield _LFS_VERIFY, self.lfs_verify
        if method == "PUT":
            yield _LFS_OBJECT, self.lfs_put

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, up to the blank line
                pass
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not self._head:
            self.wfile.write(body)

    def _json(self, data, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
               **fields) -> None:
        body = json.dumps({"error": message, **fields}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                  "X-Error-Message": message, **(headers or {})})

    def _repo_at(self, repo_id: str, revision: str) -> tuple[Repo, str] | None:
        """(repo, commit sha), or None after answering with the hub's error for an unknown repo or revision."""
        repo = self.server_state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        commit = repo.resolve(unquote(revision))
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    # --- downloads ------------------------------------------------------------------------------------------

    def resolve(self, repo: str, rev: str, path: str, query, body) -> None:
        found = self._repo_at(repo, rev)
        if found is None:
            return
        repository, commit = found
        blob = repository.commits[commit].get(path)
        if blob is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": commit})
            return
        headers = {"X-Repo-Commit": commit, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)}
        start, end = 0, blob.size
        status = 200
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted.group(1))
            end = min(int(wanted.group(2)) + 1, blob.size) if wanted.group(2) else blob.size
            if start >= blob.size:
                self._send(416, headers={"Content-Range": f"bytes */{blob.size}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        if not self._head:
            with self.server_state.lock:
                self.server_state.downloads[(repo, path)] += 1
        self._send(status, blob.data[start:end], headers)

    # --- metadata -------------------------------------------------------------------------------------------

    def model_info(self, repo: str, rev: str | None, query, body) -> None:
        found = self._repo_at(repo, rev or "main")
        if found is None:
            return
        repository, commit = found
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, blob in sorted(repository.commits[commit].items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling |= {"size": blob.size, "blobId": blob.oid}
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        self._json({"id": repo, "modelId": repo, "sha": commit, "private": repository.private,
                    "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

    def paths_info(self, repo: str, rev: str, query, body) -> None:
        found = self._repo_at(repo, rev)
        if found is None:
            return
        repository, commit = found
        wanted = parse_qs(body.decode()).get("paths", [])
        tree = repository.commits[commit]
        result = []
        for path in wanted:
            blob = tree.get(path)
            if blob is None:
                continue
            entry = {"type": "file", "path": path, "size": blob.size, "oid": blob.oid}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
            result.append(entry)
        self._json(result)


    # --- uploads --------------------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        """Writes need the server's token when it has one; answers 401 as the hub does for a bad token."""
        token = self.server_state.token
        if token is None or self.headers.get("Authorization") == f"Bearer {token}":
            return True
        self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        return False

    def create_repo(self, query, body) -> None:
        if not self._authorized():
            return
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        if repo_id in self.server_state.repos:
            self._error(409, "RepoExists", "You already created this model repo",
                        url=f"{self.server_state.endpoint}/{repo_id}")  # the hub says where it is
            return
        self.server_state.create_repo(repo_id, private=request.get("visibility") == "private")
        self._json({"url": f"{self.server_state.endpoint}/{repo_id}", "name": repo_id})

    def validate_yaml(self, query, body) -> None:
        content = json.loads(body)["content"]
        if content.startswith("---\n") and "\n---\n" not in content[3:]:
            self._json({"errors": [{"message": "front matter is not closed by ---"}]}, status=400)
            return
        self._json({"errors": [], "warnings": []})

    def create_branch(self, repo: str, branch: str, query, body) -> None:
        if not self._authorized():
            return
        found = self._repo_at(repo, json.loads(body or b"{}").get("startingPoint") or "main")
        if found is None:
            return
        repository, start = found
        branch = unquote(branch)
        if branch in repository.branches:
            self._error(409, "BranchExists", f"branch {branch} already exists")
            return
        with self.server_state.lock:
            repository.branches[branch] = start
        self._json({})

    def preupload(self, repo: str, rev: str, query, body) -> None:
        found = self._repo_at(repo, rev)
        if found is None:
            return
        repository, commit = found
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].lower().endswith(_LFS_SUFFIXES) or f["size"] > 10 * 2**20 or b"\0" in sample
            existing = repository.commits[commit].get(f["path"])
            oid = None if existing is None else existing.sha256 if existing.lfs else existing.oid
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json({"files": files, "commitOid": commit})

    def lfs_batch(self, repo: str, query, body) -> None:
        if not self._authorized() or self._repo_at(repo, "main") is None:
            return
        request = json.loads(body)
        objects = []
        for obj in request["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.server_state.lfs_objects:  # no actions = already stored, nothing to send
                base = self.server_state.endpoint
                answer["actions"] = {"upload": {"href": f"{base}/lfs-objects/{obj['oid']}"},
                                     "verify": {"href": f"{base}/lfs-verify/{obj['oid']}"}}
            objects.append(answer)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_put(self, oid: str, query, body) -> None:
        with self.server_state.lock:
            self.server_state.lfs_objects[oid] = body
        self._send(200)

    def lfs_verify(self, oid: str, query, body) -> None:
        claimed = json.loads(body)
        data = self.server_state.lfs_objects.get(oid)
        if data is None or hashlib.sha256(data).hexdigest() != oid or len(data) != claimed["size"]:
            with self.server_state.lock:
                self.server_state.lfs_objects.pop(oid, None)
            self._error(422, "LfsVerifyFailed", f"object {oid} is missing or does not match its sha256")
            return
        self._json({})

    def commit(self, repo: str, rev: str, query, body) -> None:
        if not self._authorized():
            return
        found = self._repo_at(repo, rev)
        if found is None:
            return
        repository, _ = found
        if unquote(rev) not in repository.branches:
            self._error(404, "RevisionNotFound", f"commits go to a branch; {rev} is not one")
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        changes: dict[str, Blob | None] = {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                changes[value["path"]] = Blob(data, False, hashlib.sha256(data).hexdigest())
            elif key == "lfsFile":
                data = self.server_state.lfs_objects.get(value["oid"])
                if data is None:
                    self._error(422, "LfsFileMissing", f"{value['path']}: LFS object {value['oid']} was not uploaded")
                    return
                changes[value["path"]] = Blob(data, True, value["oid"])
            elif key == "deletedFile":
                changes[value["path"]] = None
        with self.server_state.lock:
            sha = repository.commit(unquote(rev), changes, header.get("summary", ""))
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.server_state.endpoint}/{repo}/commit/{sha}",
                    "pullRequestUrl": None})


@pytest.fixture
def hub_server(monkeypatch) -> HubServer:
    """A running local hub; `HF_ENDPOINT` points at it for the duration of the test."""
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    yield server
    server.stop()
