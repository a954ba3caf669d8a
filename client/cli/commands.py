"""The list of command groups the `isles` app is built from; each module's `register(app)` adds its commands."""

from __future__ import annotations

from . import swarm

REGISTRY = [
    swarm.register,
]
