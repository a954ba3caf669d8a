"""`isles bootstrap` and `isles status`: keep the swarm findable and show it at a glance."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
