"""The local-folder artifact store: the embedded default, for the demo, for tests and for anyone without a Hub account.

Layout: `<root>/<kind>s/<repo>/revisions/<rev>/<files>` and `<root>/<kind>s/<repo>/refs/log` (one JSON line per new
revision, oldest first). A revision is the content hash of its file list, written to a temp dir and renamed into
place, read-only once there: re-publishing unchanged content makes no new revision.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from .artifacts import (
    MAX_JSON_BYTES,
    ArtifactNotFound,
    ArtifactStore,
    IntegrityError,
    Kind,
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
from .files import CHUNK, atomic_writer, canonical_json, sha256_file


def revision_of(files: Mapping[str, str]) -> str:
    """The revision id of a set of files: 40 hex digits of the sha256 of their canonical {path: sha256} list."""
    return hashlib.sha256(canonical_json(dict(files))).hexdigest()[:40]


def _copy_hashing(src: Path, out) -> str:
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


class LocalStore(ArtifactStore):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.expanduser(os.fspath(root))).absolute()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    # Paths -------------------------------------------------------------------------------------------------------

    def _repo_dir(self, repo: str, kind: str) -> Path:
        return self.root / f"{check_kind(kind)}s" / check_repo(repo)

    def _revision_dir(self, repo: str, revision: str, kind: str) -> Path:
        repo_dir = self._repo_dir(repo, kind)
        if not (repo_dir / "refs" / "log").is_file():
            raise ArtifactNotFound(
                f"{kind} repo {repo!r} not found in {self.uri}",
                hint=f"check the repo name and store; `ls {self.root / (kind + 's')}` lists the repos there",
            )
        if not isinstance(revision, str) or not revision.isalnum():
            raise ArtifactNotFound(f"revision {revision!r} not found in {kind} repo {repo!r} ({self.uri})")
        rev_dir = repo_dir / "revisions" / revision
        if not rev_dir.is_dir():
            raise ArtifactNotFound(
                f"revision {revision[:12]} not found in {kind} repo {repo!r} ({self.uri})",
                hint="the record names a revision this store does not hold; check the store URI",
            )
        return rev_dir

    def _log(self, repo_dir: Path) -> list[str]:
        try:
            lines = (repo_dir / "refs" / "log").read_text().splitlines()
        except FileNotFoundError:
            return []
        revisions = []
        for line in lines:
            try:
                revisions.append(json.loads(line)["revision"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn line from a crash mid-append: the revision it named was never announced
        return revisions

    # Interface ---------------------------------------------------------------------------------------------------

    def publish(self, repo: str, folder: str | os.PathLike, kind: Kind = "model", message: str = "") -> str:
        repo_dir = self._repo_dir(repo, kind)
        files = folder_files(folder)
        revision = revision_of(files)
        revisions = repo_dir / "revisions"
        rev_dir = revisions / revision
        revisions.mkdir(parents=True, exist_ok=True)
        if not rev_dir.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=revisions))
            try:
                for path, digest in files.items():
                    target = tmp / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "wb") as out:
                        copied = _copy_hashing(Path(folder) / path, out)
                        out.flush()
                        os.fsync(out.fileno())
                    if copied != digest:
                        raise IslesError(
                            f"{Path(folder) / path} changed while it was being published",
                            hint="publish a folder nothing else is writing to",
                        )
                    os.chmod(target, 0o444)
                try:
                    os.rename(tmp, rev_dir)
                except OSError:
                    if not rev_dir.is_dir():  # not a concurrent publisher of the same content: a real failure
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        log = self._log(repo_dir)
        if not log or log[-1] != revision:
            line = json.dumps({"revision": revision, "time": time.time(), "message": message}, sort_keys=True)
            (repo_dir / "refs").mkdir(exist_ok=True)
            # One O_APPEND write per revision: concurrent publishers never interleave inside a line.
            fd = os.open(repo_dir / "refs" / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return revision

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
        dest = Path(dest)
        if dest.is_dir() and matches(dest, expected):
            return dest
        rev_dir = self._revision_dir(repo, revision, kind)
        for path in expected:
            if not (rev_dir / path).is_file():
                raise ArtifactNotFound(
                    f"{self.uri} {repo}@{revision[:12]}: file {path} named by the record is not in the revision",
                    hint="the store does not hold what the record says; the artifact cannot be used",
                )
        sizes = {path: (rev_dir / path).stat().st_size for path in expected}
        check_size(sizes, max_bytes, f"{self.uri} {repo}@{revision[:12]}")
        staging = staging_dir(dest)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for path in expected:
                src = rev_dir / path
                (staging / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, staging / path)
            verify_files(staging, expected, f"{self.uri} {repo}@{revision[:12]}")
            install_folder(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
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
        dest = Path(dest)
        if dest.is_file() and sha256_file(dest) == sha256:
            return dest
        src = self._revision_dir(repo, revision, kind) / path
        if not src.is_file():
            raise ArtifactNotFound(f"file {path} not found in {kind} repo {repo!r} at {revision[:12]} ({self.uri})")
        with atomic_writer(dest) as out:
            actual = _copy_hashing(src, out)
            if actual != sha256:  # raising inside the writer removes the temp file: nothing appears at dest
                raise IntegrityError(
                    f"{self.uri} {repo}@{revision[:12]}: file {path} has sha256 {actual[:16]}..., "
                    f"the record says {sha256[:16]}...",
                    hint="the stored bytes differ from the record (tampered or corrupted); the file was not used",
                )
        return dest

    def read_bytes(
        self, repo: str, revision: str, path: str, kind: Kind = "model", max_bytes: int = MAX_JSON_BYTES
    ) -> bytes:
        src = self._revision_dir(repo, revision, kind) / check_file_path(path)
        if not src.is_file():
            raise ArtifactNotFound(f"file {path} not found in {kind} repo {repo!r} at {revision[:12]} ({self.uri})")
        if src.stat().st_size > max_bytes:
            raise IslesError(f"{path} is larger than {max_bytes} bytes", hint="use pull_file for large files")
        return src.read_bytes()

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as exc:
            raise IslesError(
                f"cannot write to the local store {self.uri} ({exc.strerror})",
                hint="choose a folder you can write to with --store",
            ) from None

    def list_revisions(self, repo: str, kind: Kind = "model") -> list[str]:
        repo_dir = self._repo_dir(repo, kind)
        log = self._log(repo_dir)
        if not log:
            raise ArtifactNotFound(
                f"{kind} repo {repo!r} not found in {self.uri}", hint="check the repo name and the store URI"
            )
        # Keep each revision once, at its latest position, so the last one is always the newest.
        seen: dict[str, None] = {}
        for rev in log:
            seen.pop(rev, None)
            seen[rev] = None
        return [rev for rev in seen if (repo_dir / "revisions" / rev).is_dir()]

    def exists(self, repo: str, revision: str | None = None, kind: Kind = "model") -> bool:
        repo_dir = self._repo_dir(repo, kind)
        if not (repo_dir / "refs" / "log").is_file():
            return False
        return revision is None or (isinstance(revision, str) and (repo_dir / "revisions" / revision).is_dir())
