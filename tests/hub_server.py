"""A Hub-compatible HTTP server (standard library) that the real huggingface_hub client can publish to and pull from.

Use the `hub_server` fixture (`from tests.hub_server import hub_server` in a test module, or import `HubServer`):
it yields a running server; pass `server.url` as `endpoint=` (or HF_ENDPOINT to a child process). Fault knobs:
`upload_mode`, `fail(match, times, status)`, `drop(match, times)`, `tamper` (file paths served with a flipped byte),
`token` (required on writes when set). Import it with `from hub_server import HubServer, hub_server  # noqa: F401`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import pytest

_API = re.compile(
    r"^/api/(models|datasets)/([^/]+/[^/]+?)(?:/(revision|preupload|commit|tree|commits|refs)(?:/(.*))?)?$"
)
_RESOLVE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_LFS_BATCH = re.compile(r"^/(datasets/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    title: str
    date: str
    files: dict[str, tuple[bytes, bool]]  # path -> (content, stored as LFS)


@dataclass
class Repo:
    kind: str  # "model" | "dataset"
    repo_id: str
    commits: list[Commit] = field(default_factory=list)  # oldest first; the last one is main

    def resolve(self, revision: str) -> Commit | None:
        if revision in ("main", "refs/heads/main"):
            return self.commits[-1]
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass
class Fault:
    match: str  # a substring of "METHOD /path"
    action: str  # "status" or "drop"
    times: int = 1
    status: int = 500


class _Reject(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """In-memory repos, commits and LFS objects behind the Hub's HTTP API. Thread-safe; one instance per test."""

    def __init__(self, upload_mode: str = "regular"):
        self.upload_mode = upload_mode  # "regular": content inline in the commit; "lfs": the plain LFS batch API
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.tamper: set[str] = set()  # file paths whose downloads get one byte flipped
        self.requests: list[str] = []  # "METHOD /path" of every request, in order
        self.token: str | None = None  # when set, writes without "Authorization: Bearer <token>" get 401
        # whoami answers by token; any other "hf_<user>_..." token is a write token of <user>
        self.accounts: dict[str, dict] = {}
        self.cut_downloads = 0  # this many file downloads send 7/8 of their body, then close the connection
        self.ranges: list[str] = []  # Range headers of file downloads (a resumed download asks for the rest)
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # Fault injection --------------------------------------------------------------------------------------------

    def fail(self, match: str = "", times: int = 1, status: int = 500) -> None:
        """Answer the next `times` requests whose "METHOD /path" contains `match` with `status`."""
        self.faults.append(Fault(match, "status", times, status))

    def drop(self, match: str = "", times: int = 1) -> None:
        """Close the connection without answering the next `times` matching requests."""
        self.faults.append(Fault(match, "drop", times))

    def _fault_for(self, request: str) -> Fault | None:
        with self.lock:
            self.requests.append(request)
            for fault in self.faults:
                if fault.times > 0 and fault.match in request:
                    fault.times -= 1
                    return fault
        return None

    # Helpers for tests --------------------------------------------------------------------------------------------

    def repo(self, repo_id: str, kind: str = "model") -> Repo:
        return self.repos[(kind, repo_id)]

    def _commit(self, repo: Repo, title: str, files: dict[str, tuple[bytes, bool]]) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else ""
        listing = json.dumps({p: hashlib.sha256(c).hexdigest() for p, (c, _) in sorted(files.items())})
        oid = hashlib.sha1(f"{parent}\n{title}\n{time.time_ns()}\n{listing}".encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        commit = Commit(oid, title, date, files)
        repo.commits.append(commit)
        return commit


def _handler_for(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args) -> None:  # quiet: pytest shows failures, not every request
            pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("HEAD")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _serve(self, method: str) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            query = parse_qs(url.query)
            body = self._body() if method in ("POST", "PUT") else b""
            fault = server._fault_for(f"{method} {path}")
            if fault is not None and fault.action == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if fault is not None:
                self._json({"error": "injected failure"}, status=fault.status)
                return
            try:
                # LFS uploads go to a pre-signed URL without the Hub token, as on the real Hub.
                if server.token and method in ("POST", "PUT") and not path.startswith("/lfs-upload/"):
                    if self.headers.get("Authorization") != f"Bearer {server.token}":
                        raise _Reject(401, "Invalid credentials in Authorization header")
                with server.lock:
                    self._route(method, path, query, body)
            except _Reject as exc:
                headers = {"X-Error-Code": exc.code} if exc.code else {}
                self._json({"error": exc.message}, status=exc.status, headers=headers)

        def _repo(self, kind: str, repo_id: str) -> Repo:
            repo = server.repos.get((kind, repo_id))
            if repo is None:
                raise _Reject(404, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
            return repo

        def _commit(self, repo: Repo, revision: str) -> Commit:
            commit = repo.resolve(unquote(revision or "main"))
            if commit is None:
                raise _Reject(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return commit

        def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
            if method == "POST" and path == "/api/repos/create":
                return self._create(json.loads(body))
            if method == "GET" and path == "/api/whoami-v2":
                return self._whoami()
            if method == "POST" and path == "/api/validate-yaml":  # asked before committing a README with metadata
                return self._json({"errors": [], "warnings": []})
            if method == "PUT" and path.startswith("/lfs-upload/"):
                oid = path.rsplit("/", 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    raise _Reject(400, "LFS object does not match its oid")
                server.lfs_objects[oid] = body
                return self._send(200)
            if m := _LFS_BATCH.match(path):
                return self._lfs_batch("dataset" if m[1] else "model", m[2], json.loads(body))
            if m := _RESOLVE.match(path):
                return self._resolve("dataset" if m[1] else "model", m[2], m[3], m[4])
            if m := _API.match(path):
                kind, repo_id, action, rest = m[1][:-1], m[2], m[3], m[4] or ""
                repo = self._repo(kind, repo_id)
                if action in (None, "revision"):
                    return self._info(repo, self._commit(repo, rest))
                if action == "preupload":
                    return self._preupload(self._commit(repo, rest), json.loads(body))
                if action == "commit":
                    return self._apply_commit(repo, rest, body)
                if action == "tree":
                    revision, _, prefix = rest.partition("/")
                    return self._tree(self._commit(repo, revision), prefix, query)
                if action == "commits":
                    self._commit(repo, rest)
                    return self._commits(repo, self._commit(repo, rest))
                if action == "refs":
                    head = repo.commits[-1].oid
                    return self._json({"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": head}],
                                       "tags": [], "converts": []})  # fmt: skip
            raise _Reject(404, f"no route for {method} {path}")

        def _whoami(self) -> None:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if token in server.accounts:
                return self._json(server.accounts[token])
            parts = token.split("_")
            if len(parts) < 3 or parts[0] != "hf":
                raise _Reject(401, "Invalid credentials in Authorization header")
            self._json({"type": "user", "name": parts[1], "orgs": [], "auth": {"accessToken": {"role": "write"}}})

        def _create(self, payload: dict) -> None:
            kind = payload.get("type") or "model"
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            url = f"{server.url}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
            if (kind, repo_id) in server.repos:
                return self._json({"error": "You already created this repo", "url": url}, status=409)
            repo = server.repos[(kind, repo_id)] = Repo(kind, repo_id)
            server._commit(repo, "initial commit", {".gitattributes": (b"*.safetensors filter=lfs\n", False)})
            self._json({"url": url, "name": repo_id, "id": repo_id})

        def _info(self, repo: Repo, commit: Commit) -> None:
            siblings = [{"rfilename": p} for p in sorted(commit.files)]
            self._json({"id": repo.repo_id, "sha": commit.oid, "private": False, "siblings": siblings,
                        "lastModified": commit.date})  # fmt: skip

        def _preupload(self, commit: Commit, payload: dict) -> None:
            files = []
            for item in payload["files"]:
                mode = "regular" if server.upload_mode == "regular" or item["size"] == 0 else "lfs"
                entry = {"path": item["path"], "uploadMode": mode, "shouldIgnore": False}
                if item["path"] in commit.files:
                    content, _ = commit.files[item["path"]]
                    entry["oid"] = hashlib.sha256(content).hexdigest() if mode == "lfs" else git_blob_sha1(content)
                files.append(entry)
            self._json({"files": files, "commitOid": commit.oid})

        def _apply_commit(self, repo: Repo, revision: str, body: bytes) -> None:
            # All or nothing: the new file set is built aside and only appended as a commit when every line is valid.
            files = dict(self._commit(repo, revision).files)
            title = "commit"
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    title = value.get("summary") or title
                elif key == "file":
                    files[value["path"]] = (base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    if value["oid"] not in server.lfs_objects:
                        raise _Reject(422, f"LFS object {value['oid']} was not uploaded")
                    files[value["path"]] = (server.lfs_objects[value["oid"]], True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                else:
                    raise _Reject(400, f"unsupported commit operation {key}")
            commit = server._commit(repo, title, files)
            prefix = "datasets/" if repo.kind == "dataset" else ""
            commit_url = f"{server.url}/{prefix}{repo.repo_id}/commit/{commit.oid}"
            self._json({"commitOid": commit.oid, "commitUrl": commit_url, "pullRequestUrl": None, "success": True})

        def _tree(self, commit: Commit, prefix: str, query: dict) -> None:
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            prefix = prefix.strip("/")
            entries, folders = [], set()
            for path, (content, lfs) in sorted(commit.files.items()):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                rel = path[len(prefix) + 1 :] if prefix else path
                parts = rel.split("/")
                for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                    folders.add("/".join(([prefix] if prefix else []) + parts[:i]))
                if len(parts) > 1 and not recursive:
                    continue
                entry = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)}
                if lfs:
                    entry["lfs"] = {
                        "oid": hashlib.sha256(content).hexdigest(),
                        "size": len(content),
                        "pointerSize": 130,
                    }
                entries.append(entry)
            entries += [{"type": "directory", "path": f, "oid": git_blob_sha1(f.encode()), "size": 0} for f in folders]
            self._json(entries)

        def _commits(self, repo: Repo, head: Commit) -> None:
            history = repo.commits[: repo.commits.index(head) + 1]
            self._json([{"id": c.oid, "title": c.title, "message": "", "authors": [{"user": "isles"}], "date": c.date}
                        for c in reversed(history)])  # fmt: skip

        def _resolve(self, kind: str, repo_id: str, revision: str, path: str) -> None:
            commit = self._commit(self._repo(kind, repo_id), revision)
            if path not in commit.files:
                raise _Reject(404, f"Entry not found: {path}", "EntryNotFound")
            content, lfs = commit.files[path]
            etag = hashlib.sha256(content).hexdigest() if lfs else git_blob_sha1(content)
            if path in server.tamper and content:
                content = bytes([content[0] ^ 0xFF]) + content[1:]
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            status = 200
            if self.headers.get("Range"):
                server.ranges.append(self.headers["Range"])
            if m := re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start = int(m[1])
                end = int(m[2]) if m[2] else len(content) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                content, status = content[start : end + 1], 206
            if self.command == "GET" and server.cut_downloads > 0 and len(content) > 1:
                server.cut_downloads -= 1
                self.send_response(status)
                self.send_header("Content-Length", str(len(content)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(content[: len(content) * 7 // 8])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(status, content, headers, ctype="application/octet-stream")

        def _lfs_batch(self, kind: str, repo_id: str, payload: dict) -> None:
            self._repo(kind, repo_id)
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in server.lfs_objects:
                    entry["actions"] = {"upload": {"href": f"{server.url}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            self._json({"transfer": "basic", "objects": objects})

    return Handler


@pytest.fixture
def hub_server(monkeypatch):
    """A running HubServer (upload_mode "regular"; set `hub_server.upload_mode = "lfs"` for plain LFS uploads).

    xet is disabled for the test, as the server speaks plain LFS: huggingface_hub reads HF_HUB_DISABLE_XET at import,
    so its constant is patched here, and the variable set for child processes (which also need HF_ENDPOINT=url)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()
