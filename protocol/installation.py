"""This installation of isles: its version, read from the package metadata (pyproject.toml is the one place it is
written), and the per-user folder where commands keep their working files when not given --work-dir.
"""

from __future__ import annotations

from pathlib import Path

DISTRIBUTION = "isles"


def isles_version() -> str:
    """The installed distribution's version, e.g. '0.1.0': `isles --version`, presence records, model cards."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree put on sys.path by hand, never installed
        return "0+unknown"


def default_work_dir(command: str) -> Path:
    """Where `isles <command>` keeps its files without --work-dir: `<user data dir>/isles/<command>`, never the
    current folder (~/.local/share/isles/join on Linux, or under $XDG_DATA_HOME when that is set)."""
    import platformdirs

    return Path(platformdirs.user_data_dir(DISTRIBUTION)) / command
