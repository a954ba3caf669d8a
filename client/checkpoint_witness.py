"""The aggregator's checkpoint witness: each poll, pull every lease holder's newest pushed checkpoint (size-bounded),
check that it loads into the recipe's model, stops short of the last step and advances, and, given a `replay`, that
training from the holder's previous verified checkpoint on the shard lands on it (experts/replay.py; the unit's
first verified checkpoint is replayed from the recipe's initial weights); then sign a
VerifiedCheckpoint (protocol/witness.py). Resumers install only verified checkpoints; holders whose checkpoints never
verify lose their lease after the progress timeout; a holder whose segment does not replay is verified no more.
A pointer's chain link must hash its checkpoint (protocol/chain.py); what verified is kept (and persisted), so the
aggregator can check that a release's chain carries every checkpoint verified of its holder.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

log = logging.getLogger("isles.aggregate")

MAX_PER_POLL = 4  # downloads per poll: a flood of pointers delays verification, it does not stall the aggregator
MAX_JUDGED = 10_000
LINKS_FILE = "links.json"
_RANDOM = random.SystemRandom()


class CheckpointWitness:
    """Verifies pushed checkpoints for the aggregator; `recipe_model(unit)`: the recipe's model on the meta device."""

    def __init__(self, swarm, manifest, store, work: Path, recipe_model, replay=None, replay_fraction: float = 1.0):
        self.swarm, self.manifest, self.store, self.work = swarm, manifest, store, Path(work)
        self.recipe_model = recipe_model
        self.replay = replay  # replay(unit, start_path, end_path) -> experts.replay.ReplayResult, or None: no replay
        # unit -> ((unit, holder, attempt), its last verified checkpoint): one file per unit, the current holder's
        self.kept: dict[str, tuple[tuple[str, str, int], Path]] = {}
        self.cheaters: set[str] = set()  # holders a segment of which did not replay
        self.replay_fraction = replay_fraction  # segments replayed at random: a holder cannot tell which
        self.done: set[str] = set()  # units with an accepted release: nothing left to verify
        self.judged: dict[tuple[str, str], bool] = {}  # (repo, revision) -> verified
        self.verified_step: dict[tuple[str, str, int], int] = {}  # (unit, holder, attempt) -> newest verified step
        self.stalled: dict[str, list[str]] = {}  # unit -> holders of live claims without verified progress in time
        # (unit, holder, attempt) -> [(step, checkpoint sha256, chain link)] verified here, oldest first; persisted, so
        # a restarted aggregator still holds a release to every checkpoint it verified
        self.links: dict[tuple[str, str, int], list[tuple[int, str, str]]] = self._load_links()

    def poll(self) -> int:
        """Verify up to MAX_PER_POLL new pointers; returns how many were verified."""
        from isles.protocol.swarm import recipe_steps

        budget, verified = MAX_PER_POLL, 0
        for unit in [u for u in self.manifest.units if u not in self.done]:
            holder = self._holder(unit)  # only the lease holder's checkpoints are verified, as this aggregator judges
            newest: dict[tuple[str, int], object] = {}
            for e in self.swarm.valid_checkpoints(self.manifest.run_id, unit):
                key = (e.peer_id, e.record.token.attempt)
                if key == holder and (key not in newest or e.record.step > newest[key].record.step):
                    newest[key] = e
            for (holder, attempt), e in newest.items():
                pointer = e.record
                if (pointer.repo, pointer.revision) in self.judged or budget == 0:
                    continue
                budget -= 1
                sha256 = self._check(unit, pointer, recipe_steps(self.manifest, unit), (unit, holder, attempt))
                self._remember((pointer.repo, pointer.revision), sha256 is not None)
                if sha256 is not None:
                    verified += 1
                    self.verified_step[(unit, holder, attempt)] = pointer.step
                    self._keep_link((unit, holder, attempt), pointer.step, sha256, pointer.chain_link)
                    self._publish(unit, holder, attempt, pointer, sha256)
        return verified

    def _keep_link(self, key: tuple[str, str, int], step: int, sha256: str, link: str) -> None:
        from isles.protocol.chain import MAX_LINKS
        from isles.protocol.files import atomic_write_json

        if key not in self.links and len(self.links) >= MAX_JUDGED:
            del self.links[next(iter(self.links))]
        self.links.setdefault(key, []).append((step, sha256, link))
        del self.links[key][:-MAX_LINKS]
        doc = [[*key, [list(x) for x in links]] for key, links in self.links.items()]
        atomic_write_json(self.work / "verify" / LINKS_FILE, doc)

    def _load_links(self) -> dict:
        path = self.work / "verify" / LINKS_FILE
        try:
            doc = json.loads(path.read_text()) if path.is_file() else []
            return {(u, h, a): [tuple(x) for x in links] for u, h, a, links in doc}
        except (OSError, ValueError, TypeError) as exc:  # our own file: damaged by a crash mid-write, say
            log.warning("cannot read %s (%s): starting without the checkpoints verified before", path, exc)
            return {}

    def _holder(self, unit: str) -> tuple[str, int] | None:
        """(peer id, attempt) of the unit's lease holder, judged as volunteers judge it (first-seen ages, stalled
        holders ignored); logs holders that stall (once each)."""
        from isles.protocol.leases import LeaseSettings, owner_of, progress_of, stalled_claims
        from isles.protocol.swarm import dht_time

        settings, now = LeaseSettings(progress_timeout=self.manifest.progress_timeout), dht_time()
        entries = self.swarm.get_claims(self.manifest.run_id, unit)
        progress = progress_of(self.swarm, self.manifest.run_id, unit)
        stalled = sorted({e.peer_id for e in stalled_claims(entries, now, progress, settings.progress_timeout)})
        for peer_id in set(stalled) - set(self.stalled.get(unit, [])):
            log.warning(
                "%s: %s holds a claim but shows no verified progress: stalled, others may take it", unit, peer_id
            )
        self.stalled[unit] = stalled
        owner = owner_of(entries, now, settings.backdate_grace, progress, settings.progress_timeout)
        return None if owner is None else (owner.peer_id, owner.record.attempt)

    def replay_final(self, unit: str, holder: str, attempt: int, final: Path) -> str | None:
        """Why a release's final checkpoint does not follow from the last checkpoint verified of its holder's attempt
        by training (replayed at the same random rate as other segments), or None. Without it, a holder could
        publish weights fine-tuned after its last verified checkpoint under a made-up final checkpoint."""
        kept = self.kept.get(unit)
        if self.replay is None or kept is None or kept[0] != (unit, holder, attempt):
            return None  # nothing verified of this holder's attempt to replay from (its chain was checked)
        if _RANDOM.random() >= self.replay_fraction:
            return None
        try:
            result = self.replay(unit, kept[1], final)
        except Exception as exc:  # a hostile final checkpoint must not take the aggregator down
            return f"its final checkpoint cannot be replayed: {type(exc).__name__}: {exc}"
        if not result.ok:
            self.cheaters.add(holder)
            return (
                f"training steps {result.start_step}-{result.end_step} on the shard do not land on its final "
                f"checkpoint (relative error {result.relative_error:.3g}): not trained as the recipe says"
            )
        steps = f"{result.start_step}-{result.end_step}"
        log.info("%s: final steps %s of %s replayed (%s)", unit, steps, holder, result.verdict)
        return None

    def forget(self, units) -> None:
        """Stop watching `units` (their releases are accepted): delete what was kept for their replays."""
        for unit in units:
            if unit in self.kept:
                self.kept.pop(unit)[1].unlink(missing_ok=True)
        self.done = set(units)

    def _check(self, unit: str, pointer, steps: int, holder_key) -> str | None:
        """The checkpoint file's sha256 if the pointer verifies, else None."""
        from isles.experts import checkpoints
        from isles.protocol.chain import next_link
        from isles.protocol.errors import IslesError

        if pointer.step <= self.verified_step.get(holder_key, 0) or holder_key[1] in self.cheaters:
            return None  # no progress over what this holder already showed, or it was caught
        model = self.recipe_model(unit)
        folder = self.work / "verify" / pointer.revision[:32]
        try:
            self.store.pull(
                pointer.repo, pointer.revision, folder, pointer.files, max_bytes=checkpoints.size_bound(model)
            )
            path = checkpoints.latest_checkpoint(folder)
            if path is None:
                raise IslesError("no whole checkpoint")
            if checkpoints.check_foreign(path, model, steps) != pointer.step:
                raise IslesError("not at the step its pointer says")
            sha256 = pointer.files.get(path.name, "")  # the pull checked the file against it
            if pointer.chain_link != next_link(pointer.chain_prev, sha256, pointer.step):
                raise IslesError("its chain link does not hash the checkpoint (protocol/chain.py)")
            # The segment to replay starts at this holder's previous verified checkpoint, or at step 0 when the unit
            # has none yet. A later holder's first checkpoint is not replayed: which verified checkpoint it resumed
            # from is its word, and a wrong guess here would brand an honest volunteer a cheater.
            first = unit not in self.kept and not self._ever_verified(unit)
            previous = self.kept[unit][1] if self.kept.get(unit, (None,))[0] == holder_key else None
            if self.replay is not None and (previous is not None or first) and _RANDOM.random() < self.replay_fraction:
                result = self.replay(unit, previous, path)
                if not result.ok:
                    self.cheaters.add(holder_key[1])
                    raise IslesError(
                        f"training steps {result.start_step}-{result.end_step} on the shard do not land on it "
                        f"(relative error {result.relative_error:.3g}): not trained as the recipe says"
                    )
                log.info(
                    "%s: steps %d-%d of %s replayed (%s)",
                    unit,
                    result.start_step,
                    result.end_step,
                    holder_key[1],
                    result.verdict,
                )
            kept = self.work / "verify" / "kept" / f"{unit}.isles"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, kept)  # the start of the next segment to replay
            self.kept[unit] = (holder_key, kept)
            return sha256
        except IslesError as exc:
            log.warning(
                "%s: checkpoint %s@%s from %s does not verify: %s",
                unit,
                pointer.repo,
                pointer.revision[:12],
                pointer.token.owner,
                exc,
            )
            return None
        except Exception as exc:  # anything a hostile file can provoke: refused, never fatal
            log.warning(
                "%s: checkpoint from %s does not verify: %s: %s", unit, pointer.token.owner, type(exc).__name__, exc
            )
            return None
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _ever_verified(self, unit: str) -> bool:
        """Whether the run's aggregators verified a checkpoint of `unit` (before a restart of this one, say): then
        its holder may have resumed from it, and step 0 is no longer where its training started."""
        from isles.protocol.witness import get_verified

        return bool(get_verified(self.swarm, self.manifest.run_id, unit))

    def _publish(self, unit: str, holder: str, attempt: int, pointer, sha256: str) -> None:
        from isles.protocol.swarm import dht_time
        from isles.protocol.witness import VerifiedCheckpoint, put_verified

        record = VerifiedCheckpoint(
            run_id=self.manifest.run_id,
            unit=unit,
            holder=holder,
            attempt=attempt,
            repo=pointer.repo,
            revision=pointer.revision,
            step=pointer.step,
            verified_time=dht_time(),
            peer_id=self.swarm.peer_id,
            sha256=sha256,
            chain_link=pointer.chain_link,
        )
        if put_verified(self.swarm, record):
            log.info("%s: verified the checkpoint of %s at step %d", unit, holder, pointer.step)

    def _remember(self, key: tuple[str, str], ok: bool) -> None:
        if len(self.judged) >= MAX_JUDGED:
            del self.judged[next(iter(self.judged))]
        self.judged[key] = ok


def verified_links(swarm, run_id: str, unit: str, holder: str, attempt: int, local: dict) -> list[tuple]:
    """(step, sha256, chain link) of every checkpoint of this holder's attempt that verified: here (`local`, a
    witness's `links`), or by any of the run's aggregators (their newest per holder, from the DHT)."""
    from isles.protocol.witness import get_verified

    found = set(local.get((unit, holder, attempt), []))
    for v in get_verified(swarm, run_id, unit):
        if v.holder == holder and v.attempt == attempt and v.sha256:
            found.add((v.step, v.sha256, v.chain_link))
    return sorted(found)


def verified_checkpoints(swarm, run_id: str, unit: str, local: dict) -> set[tuple[int, str]]:
    """(step, sha256) of every verified checkpoint of `unit`, whoever held it: where a resumer may have started."""
    from isles.protocol.witness import get_verified

    found = {(step, sha) for key, links in local.items() if key[0] == unit for step, sha, _ in links}
    return found | {(v.step, v.sha256) for v in get_verified(swarm, run_id, unit) if v.sha256}
