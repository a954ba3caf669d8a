"""The files of a published ensemble: reading and checking ensemble.json (every file's sha256) and pulling an
ensemble from a store into the cache, verified file by file. Nothing here loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from isles.protocol.errors import IslesError
from isles.protocol.files import sha256_file

FORMAT = "isles-ensemble/1"
ENSEMBLE_FILE = "ensemble.json"


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / ENSEMBLE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IslesError(f"{folder / ENSEMBLE_FILE} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IslesError(f"{folder / ENSEMBLE_FILE} is not an isles ensemble (format {FORMAT} expected)")
    return manifest


def broken_files(folder: Path, files: dict[str, str], prefix: str) -> str | None:
    """The first file under `prefix` that is missing or differs from its recorded sha256, described; else None."""
    listed = {p: h for p, h in files.items() if p.startswith(prefix + "/")}
    if not listed:
        return f"{prefix}/ is not listed in {ENSEMBLE_FILE}"
    return next(filter(None, (broken_file(folder, path, digest) for path, digest in sorted(listed.items()))), None)


def broken_file(folder: Path, path: str, digest: str) -> str | None:
    if not (folder / path).is_file():
        return f"{path} is missing"
    if sha256_file(folder / path) != digest:
        return f"{path} is corrupt (sha256 differs from {ENSEMBLE_FILE})"
    return None


def pull_ensemble(store, repo: str, revision: str | None, cache_dir) -> Path:
    """Download a published ensemble into the cache, every file verified against its ensemble.json."""
    import hashlib

    revision = revision or store.list_revisions(repo)[-1]
    raw = store.read_bytes(repo, revision, ENSEMBLE_FILE)
    try:
        manifest = json.loads(raw)
        expected = {**manifest["files"], ENSEMBLE_FILE: hashlib.sha256(raw).hexdigest()}
    except (ValueError, KeyError, TypeError) as exc:
        raise IslesError(f"{repo}@{revision[:12]}: {ENSEMBLE_FILE} is not an isles ensemble ({exc})") from None
    if cache_dir is None:
        from platformdirs import user_cache_dir

        cache_dir = user_cache_dir("isles")
    dest = Path(cache_dir) / "ensembles" / repo.replace("/", "--") / revision
    return Path(store.pull(repo, revision, dest, expected))
