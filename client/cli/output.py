"""Where the CLI writes: logs and progress to stderr, results to stdout; progress bars only on a terminal."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr; rich formatting on a terminal, plain timestamped lines otherwise (CI, pipes, files)."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=stderr, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    if not sys.stderr.isatty():
        # huggingface_hub reads this when it is first imported (commands import it lazily, after this point).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # hivemind installs its own handler on its loggers; route them through ours and keep them quiet, along with the
    # HTTP clients' per-request lines.
    for name in ("hivemind", "p2p", "httpx", "httpx2", "httpcore", "huggingface_hub", "filelock", "urllib3"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def progress(transient: bool = False) -> Progress:
    """A rich progress bar with ETA on stderr; disabled (prints nothing) when stderr is not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=transient,
        disable=not stderr.is_terminal,
    )


def print_json(obj: Any) -> None:
    """One JSON document on stdout, for scripts."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
