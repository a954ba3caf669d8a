"""A unit's checkpoints on their way into and out of a volunteer: the one it starts training from (its own newest,
or the furthest another peer pushed that checks out) and the folders it publishes (a pushed checkpoint, a release).

    step, sha256 = restore_checkpoint(swarm, store, run_id, unit, unit_dir, task, recipe, policy, display.event)
    staging = stage_checkpoint(path, step); folder = stage_release(export_dir, checkpoint, step, chain)
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from isles.protocol.errors import IslesError

log = logging.getLogger("isles.join")


def restore_checkpoint(
    swarm, store, run_id: str, unit: str, unit_dir: Path, task, recipe, policy, event: Callable[[str], None]
) -> tuple[int | None, str | None]:
    """Make the newest checkpoint we may start from the trainer's starting point: ours, or the furthest anyone
    pushed; returns its step and sha256 ((None, None): step 0).

    `policy` (client/training_chain.py) says which: once the run's aggregators verify checkpoints, only verified
    ones or this attempt's own chain, as the release's chain must show. A pushed checkpoint comes from another
    peer: it is installed only if it is whole and of this unit's recipe and task, so a foreign or broken one
    cannot stop every later volunteer of the unit (the trainer refuses it). `event` tells the volunteer's display."""

    import torch

    from isles.experts import checkpoints
    from isles.experts.trainer import check_resumable
    from isles.protocol.files import sha256_file

    ckpt_dir = unit_dir / "checkpoints"
    local_step, local_sha = 0, None
    # Our newest whole checkpoint that the policy allows. Newer ones go: unverified and not on this attempt's
    # chain (never pushed before a crash, or an older attempt's), a release built on them would be refused.
    for step, path in sorted(checkpoints.list_checkpoints(ckpt_dir), reverse=True) if ckpt_dir.is_dir() else []:
        if not checkpoints.verify_checkpoint(path):
            continue  # not whole (the trainer skips it too)
        sha = sha256_file(path)
        if policy.allows(step, sha):
            local_step, local_sha = step, sha
            break
        event(f"dropping the local checkpoint of {unit} at step {step}: nobody verified it")
        path.unlink()
    with torch.device("meta"):  # the recipe's model, for the checks below: nothing is allocated
        model = task.build_model()
    # Furthest first, skipping any that does not check out (signed by its holder, inside the recipe's steps).
    for pointer in swarm.checkpoints_to_resume(run_id, unit):
        if pointer.step <= local_step:
            break
        if not policy.allows(pointer.step, pointer.files.get(checkpoints.checkpoint_name(pointer.step), "")):
            continue
        staging = unit_dir / "pulled"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            store.pull(pointer.repo, pointer.revision, staging, pointer.files, max_bytes=checkpoints.size_bound(model))
            pulled = checkpoints.latest_checkpoint(staging)
            if pulled is None:
                raise IslesError(f"{pointer.repo}@{pointer.revision[:12]} holds no whole checkpoint")
            if checkpoints.check_foreign(pulled, model, recipe.steps) != pointer.step:
                raise IslesError(f"{pointer.repo}@{pointer.revision[:12]} is not at the step its pointer says")
            check_resumable(pulled, task, recipe)
            pulled_sha = sha256_file(pulled)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for entry in staging.iterdir():  # the checkpoint's file(s), as the trainer wrote them
                target = ckpt_dir / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                entry.replace(target)
            local_step, local_sha = pointer.step, pulled_sha
            event(f"pulled the checkpoint of {unit} at step {pointer.step} ({pointer.token.owner})")
            break
        except IslesError as exc:
            log.warning("cannot use the checkpoint of %s from %s (%s)", unit, pointer.token.owner, exc)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return (local_step, local_sha) if local_step else (None, None)


def stage_checkpoint(path: Path, step: int) -> Path:
    """Hard-link (or copy) the checkpoint's file(s) into a folder of their own: the trainer may prune the originals
    while the upload runs in the background."""
    staging = path.parent.parent / f"push-{step:09d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    parts = [path] if path.is_dir() else list(path.parent.glob(f"{path.stem}.*"))  # companions of one name too
    for part in parts:
        if part.is_dir():
            shutil.copytree(part, staging / part.name)
            continue
        _link_or_copy(part, staging / part.name)
    return staging


def stage_release(export_dir: Path, checkpoint: Path, step: int, chain) -> Path:
    """The folder to publish as a release (beside `export_dir`): the exported model, the checkpoint of the last step
    (its EMA weights are the model's) and the chain that ends in it, so the aggregator can check that the weights
    follow from the training it verified (client/release_checks.py). Extends `chain` by that checkpoint."""
    from isles.protocol.chain import CHAIN_FILE, FINAL_CHECKPOINT
    from isles.protocol.files import sha256_file

    chain.add(step, sha256_file(checkpoint))
    folder = Path(export_dir).parent / "release"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(export_dir, folder)
    _link_or_copy(checkpoint, folder / FINAL_CHECKPOINT)
    chain.write(folder / CHAIN_FILE)
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no second copy of a large checkpoint), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
