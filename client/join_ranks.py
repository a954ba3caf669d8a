"""`isles join --gpus N`: one volunteer on N GPUs. torchrun starts N ranks; rank 0 is the volunteer (DHT, leases,
store, display) and, before it trains a unit, tells the other ranks which one, so that all N train it data-parallel
in lockstep (experts/distributed.py). A rank's stop (SIGTERM, a lost lease) reaches the others at the same step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from isles.experts.distributed import World, broadcast, leave

log = logging.getLogger("isles.join")
WAIT_PERIOD = 7 * 24 * 3600.0  # how long followers may wait for the next unit (rank 0 may wait long for a lease)


class Leader:
    """Rank 0's trainer: announce the unit to the followers, then train it with them."""

    def __init__(self, volunteer, world: World):
        self.volunteer, self.world = volunteer, world

    def __call__(self, task, recipe, unit_dir, **kwargs):
        from isles.experts.trainer import train

        job = {
            "manifest": self.volunteer.manifest,
            "unit": Path(unit_dir).name,
            "unit_dir": str(unit_dir),
            "recipe": recipe,
            "micro_batch": kwargs.get("micro_batch"),
        }
        broadcast(job, self.world)
        return train(task, recipe, unit_dir, **kwargs)

    def finish(self) -> None:
        """No more units: the followers exit."""
        broadcast(None, self.world)


def follow(config, world: World, device: str) -> int:
    """A follower rank: train each unit rank 0 announces, in lockstep with it, until it says there is no more.
    Returns the number of units trained."""
    from isles.experts.trainer import train

    from .run_access import unit_task

    trained = 0
    while True:
        job = broadcast(None, world)
        if job is None:
            return trained
        # The shards were pulled and the checkpoint to resume from installed by rank 0, on this machine's disk.
        manifest = job["manifest"]
        task, _ = unit_task(manifest, job["unit"], [], Path(config.work_dir) / manifest.run_id / "shards")
        log.info("rank %d: training %s with rank 0", world.rank, job["unit"])
        train(task, job["recipe"], job["unit_dir"], device=device, micro_batch=job["micro_batch"])
        trained += 1


def run_ranks(config, console, stop):
    """`isles join`'s body: the volunteer alone, or under torchrun its rank 0 with N-1 followers. Returns rank 0's
    outcomes, or None on a follower."""
    import torch

    from isles.experts.distributed import init_from_env, local_device

    from .join import Volunteer
    from .machine import resolve_device

    device = local_device(config.device)
    world = World()
    if "WORLD_SIZE" in os.environ:
        from .lifetime import die_with_parent

        die_with_parent()  # a killed torchrun takes its ranks along
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        world = init_from_env("cuda" if cuda else "cpu", WAIT_PERIOD)
    if world.size == 1:
        return Volunteer(config, console, stop=stop).run()
    config = replace(config, device=device)
    if not world.leader:
        follow(config, world, resolve_device(device))
        leave(world)
        return None
    leader = Leader(None, world)
    leader.volunteer = Volunteer(config, console, stop=stop, trainer=leader)
    outcomes = leader.volunteer.run()  # on an error, rank 0 exits and torchrun stops the followers
    leader.finish()
    leave(world)
    return outcomes
