"""The artifact store: one interface over the Hugging Face Hub and a local folder, addressed by (repo, revision, path).

`open_store("hf://<namespace>" | "<path>" | "file://<path>")` returns an `ArtifactStore`. Every pull is verified
against the sha256 of the record that named it; nothing is left at the destination when a file disagrees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from .errors import IslesError
from .files import sha256_file, sha256_folder

Kind = Literal["model", "dataset"]
KINDS = ("model", "dataset")

# The Hub's repo-name rule (letters, digits, '-', '_', '.'; no '--' or '..'), with an optional "namespace/" prefix.
_REPO_NAME = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Files the stores accept: relative posix paths without '..', hidden parts or backslashes.
_FILE_PATH = re.compile(r"^(?!.*(?:^|/)\.)(?!.*//)[^\\\x00]+$")
# What may be parsed after a pull: weights as safetensors, everything else as JSON (never pickles or code).
LOADABLE_SUFFIXES = (".safetensors", ".json")
MAX_JSON_BYTES = 16 << 20

STORE_URI_HINT = "use hf://<namespace> for the Hugging Face Hub, or a folder path (or file:///abs/path) locally"


class ArtifactError(IslesError):
    """A store operation failed in a way the caller may want to tell apart from other errors."""


class ArtifactNotFound(ArtifactError):
    """The repo, revision or file does not exist in the store."""


class IntegrityError(ArtifactError):
    """A pulled file's sha256 differs from the record: the artifact was tampered with or corrupted. Never retried."""


class TooLarge(IntegrityError):
    """The files a record names are larger than the caller's bound: refused before anything is downloaded."""


def check_size(sizes: Mapping[str, int], max_bytes: int | None, where: str) -> None:
    """Refuse a pull whose files (as the store reports their sizes) exceed `max_bytes` in all."""
    total = sum(sizes.values())
    if max_bytes is not None and total > max_bytes:
        raise TooLarge(
            f"{where}: the record's files are {total / 2**20:.1f} MiB, over the bound of {max_bytes / 2**20:.1f} MiB",
            hint="an artifact of this run cannot be that large: the record is not trustworthy",
        )


class StoreUnavailable(ArtifactError):
    """The store could not be reached or kept failing after retries; trying again later may work."""


def check_repo(repo: str) -> str:
    if not isinstance(repo, str) or not _REPO_NAME.match(repo) or ".." in repo or "--" in repo:
        raise IslesError(
            f"invalid repo name {repo!r}",
            hint="repo names use letters, digits, '-', '_' and '.', optionally prefixed by 'namespace/'",
        )
    return repo


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise IslesError(f"unknown repo kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
    return kind


def check_file_path(path: str) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or not _FILE_PATH.match(path):
        raise IslesError(f"invalid file path {path!r} in an artifact", hint="use a relative path without '..' parts")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise IslesError(f"invalid file path {path!r} in an artifact", hint="use a relative path without '..' parts")
    return path


def folder_files(folder: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256} of a folder about to be published: what a release or checkpoint record carries.

    Refuses symlinks and hidden files, which the stores would not publish the same way.
    """
    root = Path(folder)
    if not root.is_dir():
        raise IslesError(f"{root} is not a folder", hint="publish a folder that holds the files of one artifact")
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise IslesError(f"{p} is a symlink", hint="copy the file into the folder before publishing")
        if any(part.startswith(".") for part in rel.split("/")):
            raise IslesError(f"{p} is hidden", hint="remove hidden files and folders before publishing")
    files = sha256_folder(root)
    if not files:
        raise IslesError(f"{root} is empty", hint="publish a folder that holds the files of one artifact")
    return files


def verify_files(folder: str | os.PathLike, expected: Mapping[str, str], source: str) -> None:
    """Check that every expected file is in `folder` with the expected sha256; IntegrityError names the first that
    is not. `source` says where the files came from and which record they were checked against (for the message)."""
    root = Path(folder)
    for path, digest in sorted(expected.items()):
        target = root / check_file_path(path)
        if not target.is_file():
            raise IntegrityError(
                f"{source}: file {path} is missing",
                hint="the store does not hold what the record says; the artifact cannot be used",
            )
        actual = sha256_file(target)
        if actual != digest:
            raise IntegrityError(
                f"{source}: file {path} has sha256 {actual[:16]}..., the record says {digest[:16]}...",
                hint="the stored bytes differ from the record (tampered or corrupted); the artifact was not used",
            )


def check_loadable(path: str | os.PathLike) -> None:
    """Refuse to parse anything but safetensors and JSON from a pulled artifact (no pickles, no code)."""
    if not os.fspath(path).endswith(LOADABLE_SUFFIXES):
        raise IslesError(
            f"refusing to load {os.fspath(path)!r}: only safetensors and JSON files are loaded from artifacts",
            hint="publish weights as .safetensors and metadata as .json",
        )


def check_expected(expected: Mapping[str, str]) -> dict[str, str]:
    if not expected:
        raise IslesError("nothing to pull: the record lists no files", hint="pass {path: sha256} from the record")
    out = {}
    for path, digest in expected.items():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise IslesError(f"record for {path!r} has no valid sha256", hint="records carry hex sha256 digests")
        out[check_file_path(path)] = digest
    return out


def staging_dir(dest: Path) -> Path:
    """A folder beside `dest` for downloads in progress: same filesystem (so the final rename is atomic) and stable
    across attempts (so an interrupted download resumes)."""
    return dest.parent / f".{dest.name}.isles-partial"


def install_folder(staging: Path, dest: Path) -> None:
    """Move a verified staging folder to `dest`; a previous `dest` is replaced only after the new one is complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        old = dest.parent / f".{dest.name}.isles-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dest)


def matches(dest: Path, expected: Mapping[str, str]) -> bool:
    """True when `dest` already holds every expected file with the expected hash (a previous verified pull)."""
    try:
        verify_files(dest, expected, str(dest))
    except IntegrityError:
        return False
    return True


class ArtifactStore(ABC):
    """Where artifacts live. A repo holds revisions; a revision is an immutable set of files.

    Repos are named without the store's namespace (`"myrun-expert-0"`) or, to reach another namespace on the Hub,
    as `"namespace/name"`. `kind` is "model" (experts, ensembles) or "dataset" (shards).
    """

    uri: str

    @abstractmethod
    def publish(self, repo: str, folder: str | os.PathLike, kind: Kind = "model", message: str = "") -> str:
        """Publish every file of `folder` as one new revision of `repo` (created if needed); return the revision.

        The revision holds exactly the folder's files. Publishing content identical to the newest revision returns
        that revision and makes no new one."""

    @abstractmethod
    def pull(
        self,
        repo: str,
        revision: str,
        dest: str | os.PathLike,
        expected: Mapping[str, str],
        kind: Kind = "model",
        max_bytes: int | None = None,
    ) -> Path:
        """Download the files of `expected` ({path: sha256}, from a record) at `revision` into folder `dest`.

        Returns `dest` once every file is verified. On any mismatch raises IntegrityError and `dest` is untouched
        (absent if it was absent). A `dest` that already holds the verified files is reused without downloading.
        Files over `max_bytes` in all are refused (TooLarge) before any is downloaded."""

    @abstractmethod
    def pull_file(
        self,
        repo: str,
        revision: str,
        path: str,
        dest: str | os.PathLike,
        sha256: str,
        kind: Kind = "model",
    ) -> Path:
        """Download one file (e.g. a shard) to the file path `dest`, verified against `sha256`; returns `dest`."""

    @abstractmethod
    def read_bytes(self, repo: str, revision: str, path: str, kind: Kind = "model", max_bytes: int = MAX_JSON_BYTES):
        """The bytes of one small file, unverified (callers verify or parse with care)."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise IslesError now if `publish` is bound to fail (no token, read-only folder): call it before hours of
        training, not after."""

    @abstractmethod
    def list_revisions(self, repo: str, kind: Kind = "model") -> list[str]:
        """Revisions of `repo`, oldest first (the last one is the newest). ArtifactNotFound if the repo is absent."""

    @abstractmethod
    def exists(self, repo: str, revision: str | None = None, kind: Kind = "model") -> bool:
        """Whether `repo` exists (and holds `revision`, when given)."""

    def read_json(self, repo: str, revision: str, path: str, sha256: str | None = None, kind: Kind = "model") -> Any:
        """Parse a small JSON file of a revision (ensemble.json, config.json); verified when `sha256` is given."""
        import hashlib

        if not path.endswith(".json"):
            raise IslesError(f"{path} is not a JSON file", hint="read_json only parses .json files")
        data = self.read_bytes(repo, revision, check_file_path(path), kind=kind)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(
                f"{self.uri} {repo}@{revision[:12]}: file {path} does not match the sha256 of the record",
                hint="the stored bytes differ from the record (tampered or corrupted); the file was not used",
            )
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{self.uri} {repo}@{revision[:12]}: {path} is not valid JSON ({exc})") from None


def open_store(uri: str | os.PathLike, token: str | None = None, endpoint: str | None = None) -> ArtifactStore:
    """The store a URI names: `hf://<namespace>` (Hugging Face Hub), or a folder path / `file://<path>` (local).

    `token` (Hub only) defaults to HF_TOKEN or the huggingface_hub login; `endpoint` defaults to the Hub
    (or HF_ENDPOINT), and tests point it at tests/hub_server.py.
    """
    text = os.fspath(uri).strip()
    if not text:
        raise IslesError("empty store URI", hint=STORE_URI_HINT)
    scheme, sep, rest = text.partition("://")
    if not sep:
        from .store_local import LocalStore

        return LocalStore(text)
    scheme = scheme.lower()
    if scheme == "file":
        from .store_local import LocalStore

        return LocalStore(rest)
    if scheme in ("hf", "huggingface"):
        from .store_hub import HubStore

        return HubStore(rest.strip("/"), token=token, endpoint=endpoint)
    raise IslesError(f"unknown store URI scheme {scheme + '://'!r} in {text!r}", hint=STORE_URI_HINT)
