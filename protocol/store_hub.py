"""The Hugging Face Hub artifact store (`hf://<namespace>`): one commit per publish, verified and resumable pulls.

Uses its own `HfApi(endpoint=..., token=...)`, never huggingface_hub's module globals, so tests point it at
tests/hub_server.py. The token is kept private: it appears in no repr, log line or error message.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from .artifacts import (
    MAX_JSON_BYTES,
    ArtifactError,
    ArtifactNotFound,
    ArtifactStore,
    Kind,
    StoreUnavailable,
    check_expected,
    check_file_path,
    check_kind,
    check_repo,
    check_size,
    folder_files,
    install_folder,
    matches,
    staging_dir,
    verify_files,
)
from .errors import IslesError
from .files import sha256_file

log = logging.getLogger(__name__)
T = TypeVar("T")

LOGIN_HINT = "run `hf auth login` (or set HF_TOKEN) with a token that has write access"
# The repo's first commit on the Hub (it only adds .gitattributes): not a published revision.
_INITIAL_COMMIT = "initial commit"


def _transient(exc: BaseException) -> bool:
    """Network trouble or a server-side failure: worth retrying. Anything else (4xx, bad input) is not."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        return status is None or status >= 500 or status in (408, 429)
    if isinstance(exc, LocalEntryNotFoundError):  # hf_hub_download could not reach the server
        return True
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, (ConnectionError, TimeoutError)) or module in ("httpx", "httpx2", "httpcore", "requests")


@contextmanager
def _resumable(staging: Path) -> Iterator[None]:
    """Keep a staging folder's partial downloads only when the store was unreachable (the next pull resumes them);
    after any other failure (bytes that failed verification, a missing repo or file) remove it."""
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _keep_only(staging: Path, expected: Mapping[str, str]) -> None:
    for p in sorted(staging.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
        elif p.relative_to(staging).as_posix() not in expected:
            p.unlink()


class HubStore(ArtifactStore):
    """Repos `<namespace>/<repo>` on the Hub (or on `endpoint`). Revisions are commit ids."""

    def __init__(
        self,
        namespace: str,
        token: str | None = None,
        endpoint: str | None = None,
        retries: int = 5,
        backoff_period: float = 1.0,
    ):
        from huggingface_hub import HfApi, get_token

        if namespace and (not namespace.replace("-", "").replace("_", "").replace(".", "").isalnum()):
            raise IslesError(f"invalid Hub namespace {namespace!r}", hint="use hf://<user or organization name>")
        self.namespace = namespace
        self.uri = f"hf://{namespace}"
        self._token = token or get_token()
        self._api = HfApi(endpoint=endpoint, token=self._token or False, library_name="isles")
        self.endpoint = self._api.endpoint
        self.retries = retries
        self.backoff_period = backoff_period

    def __repr__(self) -> str:  # never the token
        return f"HubStore({self.uri!r}, endpoint={self.endpoint!r}, authenticated={self._token is not None})"

    # Helpers ------------------------------------------------------------------------------------------------------

    def repo_id(self, repo: str) -> str:
        check_repo(repo)
        if "/" in repo:
            return repo
        if not self.namespace:
            raise IslesError(
                f"repo {repo!r} needs a namespace", hint="use hf://<namespace> or a 'namespace/name' repo"
            )
        return f"{self.namespace}/{repo}"

    def _where(self, repo: str, kind: str, revision: str | None = None) -> str:
        at = f"@{revision[:12]}" if revision else ""
        return f"{kind} repo {self.repo_id(repo)}{at} on {self.endpoint}"

    def _call(self, what: str, fn: Callable[[], T], repo: str, kind: str, revision: str | None = None) -> T:
        """Run one Hub call, retrying transient failures with exponential backoff; map errors to IslesError."""
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        for attempt in range(self.retries + 1):
            try:
                return fn()
            except RepositoryNotFoundError:
                raise ArtifactNotFound(
                    f"{kind} repo {self.repo_id(repo)} not found on {self.endpoint} (or not visible to this token)",
                    hint="check the repo name and the store URI; a private repo needs `hf auth login`",
                ) from None
            except RevisionNotFoundError:
                raise ArtifactNotFound(
                    f"revision {(revision or '?')[:12]} not found in {self._where(repo, kind)}",
                    hint="the record names a revision this repo does not hold; check the store URI",
                ) from None
            except RemoteEntryNotFoundError:
                raise ArtifactNotFound(
                    f"a file named by the record is missing from {self._where(repo, kind, revision)}"
                ) from None
            except Exception as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status in (401, 403):
                    raise IslesError(
                        f"the Hub refused to {what} {self._where(repo, kind)} ({status})", LOGIN_HINT
                    ) from None
                if not _transient(exc):
                    if status is None:
                        raise
                    detail = (str(exc).strip().splitlines() or [""])[0]
                    raise ArtifactError(
                        f"the Hub rejected the request to {what} {self._where(repo, kind, revision)} ({status}): "
                        f"{detail}",
                        hint="run again with --debug for details; https://status.huggingface.co shows Hub incidents",
                    ) from None
                if attempt == self.retries:
                    raise StoreUnavailable(
                        f"could not {what} {self._where(repo, kind, revision)} after {attempt + 1} attempts "
                        f"({type(exc).__name__})",
                        hint="check the network and https://status.huggingface.co, then run the command again",
                    ) from None
                wait = self.backoff_period * 2**attempt
                log.warning("%s %s failed (%s); retrying in %.1fs", what, self.repo_id(repo), type(exc).__name__, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _download(self, repo: str, revision: str, path: str, folder: Path, kind: str) -> Path:
        """One file into `folder` (hf_hub_download's local-dir mode: a partial file there resumes next time)."""
        result = self._call(
            "download from",
            lambda: self._api.hf_hub_download(
                self.repo_id(repo), path, repo_type=kind, revision=revision, local_dir=folder
            ),
            repo,
            kind,
            revision,
        )
        return Path(result)

    def _size(self, repo: str, revision: str, path: str, kind: str) -> int:
        """A file's size as the store reports it (a HEAD request: nothing is downloaded)."""
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.repo_id(repo), path, repo_type=kind, revision=revision, endpoint=self.endpoint)
        meta = self._call("read the size of a file in", lambda: self._api.get_hf_file_metadata(url=url), repo, kind)
        if meta.size is None:
            raise ArtifactError(f"{self._where(repo, kind, revision)}: the store does not say how large {path} is")
        return int(meta.size)

    # Interface ---------------------------------------------------------------------------------------------------

    def publish(self, repo: str, folder: str | os.PathLike, kind: Kind = "model", message: str = "") -> str:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        check_kind(kind)
        self.check_writable()
        repo_id = self.repo_id(repo)
        files = folder_files(folder)
        self._call("create", lambda: self._api.create_repo(repo_id, repo_type=kind, exist_ok=True), repo, kind)

        def commit() -> str:
            # The revision holds exactly the folder: files no longer in it are deleted in the same commit. Unchanged
            # files are skipped by the client, and a commit with nothing left to do returns the current head.
            remote = self._api.list_repo_files(repo_id, repo_type=kind)
            ops: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(Path(folder) / p)) for p in files]
            ops += [CommitOperationDelete(path_in_repo=p) for p in remote if p not in files and p != ".gitattributes"]
            info = self._api.create_commit(
                repo_id, operations=ops, commit_message=message or "Publish with isles", repo_type=kind
            )
            return info.oid

        revision = self._call("publish to", commit, repo, kind)
        log.info("published %s to %s", Path(folder).name, self._where(repo, kind, revision))
        return revision

    def check_writable(self) -> None:
        if not self._token:
            raise IslesError(f"no Hugging Face token: publishing to {self.uri} needs one", hint=LOGIN_HINT)

    def pull(
        self,
        repo: str,
        revision: str,
        dest: str | os.PathLike,
        expected: Mapping[str, str],
        kind: Kind = "model",
        max_bytes: int | None = None,
    ) -> Path:
        expected = check_expected(expected)
        check_kind(kind)
        dest = Path(dest)
        if dest.is_dir() and matches(dest, expected):
            return dest
        if max_bytes is not None:
            sizes = {path: self._size(repo, revision, path, kind) for path in expected}
            check_size(sizes, max_bytes, self._where(repo, kind, revision))
        staging = staging_dir(dest)
        staging.mkdir(parents=True, exist_ok=True)
        with _resumable(staging):
            for path in expected:
                self._download(repo, revision, path, staging, kind)
            verify_files(staging, expected, f"{self._where(repo, kind, revision)}")
        _keep_only(staging, expected)  # a resumed staging folder may hold files of an earlier, different pull
        install_folder(staging, dest)
        return dest

    def pull_file(
        self,
        repo: str,
        revision: str,
        path: str,
        dest: str | os.PathLike,
        sha256: str,
        kind: Kind = "model",
    ) -> Path:
        check_expected({path: sha256})
        check_kind(kind)
        dest = Path(dest)
        if dest.is_file() and sha256_file(dest) == sha256:
            return dest
        staging = staging_dir(dest)
        staging.mkdir(parents=True, exist_ok=True)
        with _resumable(staging):
            downloaded = self._download(repo, revision, path, staging, kind)
            verify_files(staging, {path: sha256}, f"{self._where(repo, kind, revision)}")
        os.replace(downloaded, dest)
        shutil.rmtree(staging, ignore_errors=True)
        return dest

    def read_bytes(
        self, repo: str, revision: str, path: str, kind: Kind = "model", max_bytes: int = MAX_JSON_BYTES
    ) -> bytes:
        check_file_path(path)
        with tempfile.TemporaryDirectory(prefix="isles-read-") as tmp:
            downloaded = self._download(repo, revision, path, Path(tmp), check_kind(kind))
            if downloaded.stat().st_size > max_bytes:
                raise IslesError(f"{path} is larger than {max_bytes} bytes", hint="use pull_file for large files")
            return downloaded.read_bytes()

    def list_revisions(self, repo: str, kind: Kind = "model") -> list[str]:
        repo_id = self.repo_id(repo)
        commits = self._call(
            "list revisions of", lambda: self._api.list_repo_commits(repo_id, repo_type=check_kind(kind)), repo, kind
        )
        commits = list(reversed(commits))  # the Hub lists newest first
        if commits and commits[0].title == _INITIAL_COMMIT:
            commits = commits[1:]
        return [c.commit_id for c in commits]

    def exists(self, repo: str, revision: str | None = None, kind: Kind = "model") -> bool:
        repo_id = self.repo_id(repo)
        check_kind(kind)
        if revision is None:
            return self._call("look up", lambda: self._api.repo_exists(repo_id, repo_type=kind), repo, kind)
        try:
            return self._call(
                "look up",
                lambda: self._api.revision_exists(repo_id, revision, repo_type=kind),
                repo,
                kind,
                revision,
            )
        except ArtifactNotFound:
            return False
