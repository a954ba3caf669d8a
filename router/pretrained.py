"""Where a pretrained component (text encoder, VAE, CLIP) comes from: a local folder, or a Hub repo pinned to a commit
with one metadata call, falling back to the local cache when the Hub cannot be reached; and the one-line error for a
load that failed. Used by router/text_encoder.py, router/vae.py and router/clip_score.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from isles.protocol.errors import IslesError

HUB_TIMEOUT = 10.0  # seconds for the one metadata call that pins a Hub id to a commit


@dataclass(frozen=True)
class ModelSource:
    """A local folder, or a Hub repo pinned to a commit. `offline`: the Hub was unreachable, load from the cache."""

    path: str  # what from_pretrained takes: a folder or a repo id
    hub: bool
    revision: str | None  # the resolved commit for Hub repos, None for folders
    files: tuple[str, ...] | None = None  # the repo's files when the Hub answered
    offline: bool = False

    @property
    def spec_id(self) -> str:
        return f"hf:{self.path}" if self.hub else self.path

    def load_kwargs(self) -> dict:
        return {"revision": self.revision, "local_files_only": self.offline} if self.hub else {}

    def has_file(self, filename: str) -> bool:
        """Whether the folder or repo holds `filename` (offline: whether the cache does)."""
        if not self.hub:
            return (Path(self.path) / filename).is_file()
        if self.files is not None:
            return filename in self.files
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(self.path, filename, revision=self.revision), str)

    def pinned_revision(self, filename: str = "config.json") -> str | None:
        """The commit to record: the Hub's answer; offline, the cached snapshot that `filename` came from."""
        if not self.hub or not self.offline:
            return self.revision
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.path, filename, revision=self.revision)
        parts = Path(cached).parts if isinstance(cached, str) else ()
        return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else self.revision


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(name: str, revision: str | None, what: str, hint: str) -> ModelSource:
    """'hf:<id>', a bare repo id or a local folder -> a ModelSource; Hub ids are pinned with one metadata call.

    `what` names the component in errors ("text encoder", "VAE"); `hint` is the way out when the name is wrong.
    """
    if not name.startswith("hf:"):
        folder = Path(name).expanduser()
        if folder.is_dir():
            return ModelSource(path=str(folder), hub=False, revision=None)
        if not _REPO_ID.match(name):
            raise IslesError(f"no {what} folder {name!r}", hint=hint)
    repo_id = name.removeprefix("hf:")
    if not _REPO_ID.match(repo_id):
        raise IslesError(f"bad Hub id {repo_id!r} for the {what}", hint=hint)
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        raise IslesError(
            f"the {what} {repo_id!r} is gated on the Hub",
            hint=f"accept its terms on https://huggingface.co/{repo_id}, then run `hf auth login`",
        ) from None
    except RevisionNotFoundError:
        raise IslesError(
            f"the {what} {repo_id!r} has no revision {revision!r}", hint="use a branch, tag or commit the repo has"
        ) from None
    except RepositoryNotFoundError:
        raise IslesError(f"no {what} {repo_id!r} on the Hub", hint=hint) from None
    except Exception:  # unreachable, offline mode, a server error: fall back to what the cache holds
        return ModelSource(path=repo_id, hub=True, revision=revision, offline=True)
    files = tuple(s.rfilename for s in info.siblings) if info.siblings is not None else None
    return ModelSource(path=repo_id, hub=True, revision=info.sha or revision, files=files)


def load_error(what: str, name: str, source: ModelSource, exc: BaseException, hint: str) -> IslesError:
    """One line for a failed from_pretrained (never a traceback): the first line of the library's message."""
    if source.offline:
        return IslesError(
            f"cannot reach the Hub and the {what} {source.path!r} is not in the local cache",
            hint=f"check the network, or {hint}",
        )
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return IslesError(f"cannot load the {what} {name!r}: {reason}", hint=hint)
