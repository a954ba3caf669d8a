"""The list of command groups the `isles` app is built from; each module's `register(app)` adds its commands."""

from __future__ import annotations

from . import aggregate, demo, eval, join, partition, sample, swarm, train

REGISTRY = [
    swarm.register,
    partition.register,
    sample.register,
    join.register,
    aggregate.register,
    demo.register,
    train.register,
    eval.register,
]
