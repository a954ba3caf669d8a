"""The list of command groups the `isles` app is built from; each module's `register(app)` adds its commands.

The order is the order of `isles --help`: a newcomer's first command, then a volunteer's, then the run owner's.
"""

from __future__ import annotations

from . import aggregate, demo, doctor, eval, join, partition, sample, swarm, train, verify

REGISTRY = [
    demo.register,
    join.register,
    doctor.register,
    swarm.register,
    aggregate.register,
    verify.register,
    partition.register,
    train.register,
    sample.register,
    eval.register,
]
