"""Shard leases over the DHT, without a coordinator: claim, settle, re-read, proceed only as the owner.

A unit belongs to the earliest live claim (by claimed time, then peer id), where a claim may look no older than the
reader saw it, give or take `backdate_grace`; a claim whose holder shows no progress (checkpoint pointers of its own,
advancing) for `progress_timeout` counts for nothing. The owner renews from a heartbeat thread; a peer that stops
renewing loses the unit after `ttl_period`. The DHT gives no compare-and-swap, so two owners are possible in rare
splits: results carry the lease's fencing token.

    manager = LeaseManager(swarm, run_id, LeaseSettings())
    lease = manager.acquire(manifest.units)        # None: every unit is owned by someone else
    lease.update_progress(step, steps, samples_per_s); ...; lease.withdraw()
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .record_base import MAX_ATTEMPT
from .record_claim import Claim, FencingToken
from .swarm import MAX_CLOCK_SKEW, Signed, Swarm, dht_time

logger = logging.getLogger(__name__)

# Claims are self-reported: a claim may live at most this long past its own heartbeat, and may not be dated in the
# future, so one peer cannot hold a unit for years with a single write.
MAX_TTL_PERIOD = 3600.0
MIN_SETTLE_POLL = 0.25  # while settling, look for a claim that beats ours at most this often (seconds)


@dataclass(frozen=True)
class LeaseSettings:
    ttl_period: float = 60.0  # a claim not renewed for this long is dead; its unit is open again
    heartbeat_period: float = 15.0  # renew this often (well under the TTL, so a slow renewal is not fatal)
    settle_period: float = 3.0  # after writing a claim, wait this long for racing claims to land, then re-read
    # A holder must show progress (a new, verified checkpoint) this often, counted from when a reader first saw its
    # claim or its last progress, or others may take the unit. Volunteers take the run manifest's.
    progress_timeout: float = 900.0

    @property
    def backdate_grace(self) -> float:
        """How much older than first seen a claim may say it is: racing honest claims land within a settle period."""
        return 2 * self.settle_period + 2 * MAX_CLOCK_SKEW

    def __post_init__(self):
        if not 0 < self.heartbeat_period < self.ttl_period:
            raise ValueError("the heartbeat period must be positive and shorter than the lease TTL")
        if self.ttl_period > MAX_TTL_PERIOD:
            raise ValueError(f"the lease TTL cannot exceed {MAX_TTL_PERIOD:.0f} s")
        if self.settle_period < 0:
            raise ValueError("the settle period cannot be negative")
        if self.progress_timeout <= 0:
            raise ValueError("the progress timeout must be positive")


def rendezvous_rank(units: Iterable[str], peer_id: str) -> list[str]:
    """Units in this peer's order of preference: racing peers start on different units, so they rarely collide."""
    return sorted(units, key=lambda unit: hashlib.sha256(f"{peer_id}/{unit}".encode()).digest())


def live_claims(entries: list[Signed], now: float) -> list[Signed]:
    def plausible(e: Signed) -> bool:
        c = e.record
        return (
            c.claimed_time <= c.heartbeat_time <= now + MAX_CLOCK_SKEW
            and e.expiration_time <= c.heartbeat_time + MAX_TTL_PERIOD
        )

    return [e for e in entries if e.record.state == "claimed" and e.expiration_time > now and plausible(e)]


def claimed_time_of(entry: Signed, grace: float = 0.0) -> float:
    """A claim's place in line: its stated time, unless that is more than `grace` before this reader first saw it
    (a backdated claim, or an old one a newcomer just found): then when it was first seen."""
    stated = entry.record.claimed_time
    return stated if stated >= entry.first_seen - grace else entry.first_seen


def stalled(entry: Signed, now: float, last_progress: float | None, timeout: float | None) -> bool:
    """No progress from this claim's holder for `timeout` seconds, counted from when this reader first saw any claim
    of that holder on the unit (a fresh claim or attempt every few seconds does not reset it) or its last pointer."""
    return timeout is not None and now - max(entry.holder_since, last_progress or 0.0) > timeout


def owner_of(
    entries: list[Signed],
    now: float,
    grace: float = float("inf"),
    progress: dict[tuple[str, int], float] | None = None,
    progress_timeout: float | None = None,
) -> Signed | None:
    """The claim that owns the unit: the earliest live one that is not stalled, ties broken by peer id.

    `progress` maps (holder peer id, attempt) to when this reader first saw that holder's newest progress."""
    progress = progress or {}
    live = [
        e
        for e in live_claims(entries, now)
        if not stalled(e, now, progress.get((e.peer_id, e.record.attempt)), progress_timeout)
    ]
    return min(live, key=lambda e: (claimed_time_of(e, grace), e.record.claimed_time, e.record.peer_id), default=None)


def _place(entry: Signed, settings: LeaseSettings) -> tuple:
    """A claim's place in line, as `owner_of` orders claims."""
    return (claimed_time_of(entry, settings.backdate_grace), entry.record.claimed_time, entry.record.peer_id)


def stalled_claims(entries: list[Signed], now: float, progress: dict, progress_timeout: float) -> list[Signed]:
    """Live claims whose holders showed no progress in time: what `isles status` and the aggregator report."""
    return [
        e
        for e in live_claims(entries, now)
        if stalled(e, now, progress.get((e.peer_id, e.record.attempt)), progress_timeout)
    ]


def progress_of(swarm: Swarm, run_id: str, unit: str) -> dict[tuple[str, int], float]:
    """(holder peer id, attempt) -> when this reader first saw the holder's newest progress on the unit: checkpoints
    the run's aggregators verified (loads into the recipe's model, advances), once they verify any; before that, the
    holder's own valid pointers (each new step is a new pointer, first seen when it appears)."""
    from .witness import run_verifies, verified_entries

    progress: dict[tuple[str, int], float] = {}
    verified = verified_entries(swarm, run_id, unit)
    if verified or run_verifies(swarm, run_id):
        for e in verified:
            key = (e.record.holder, e.record.attempt)
            progress[key] = max(progress.get(key, 0.0), e.first_seen)
        return progress
    for e in swarm.valid_checkpoints(run_id, unit):
        key = (e.peer_id, e.record.token.attempt)
        progress[key] = max(progress.get(key, 0.0), e.first_seen)
    return progress


class Lease:
    """Ownership of one unit, renewed in the background until `withdraw()`. Check `lost` before publishing."""

    def __init__(self, manager: LeaseManager, claim: Claim, expiration_time: float):
        self.manager, self.run_id, self.unit = manager, claim.run_id, claim.unit
        self._claim, self._expiration_time = claim, expiration_time
        self._lock = threading.Lock()
        self.lost = threading.Event()  # another peer's earlier claim showed up: stop, our work is a duplicate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.unit}", daemon=True)
        self._thread.start()

    @property
    def claim(self) -> Claim:
        return self._claim

    @property
    def fencing_token(self) -> FencingToken:
        return self._claim.token

    @property
    def active(self) -> bool:
        return not self._stop.is_set() and not self.lost.is_set()

    def update_progress(self, step: int, steps: int, samples_per_s: float) -> None:
        """Record progress; the next heartbeat carries it to the swarm (for `isles status`)."""
        with self._lock:
            self._claim = self._claim.copy(
                update=dict(step=int(step), steps=int(steps), samples_per_s=float(samples_per_s))
            )

    def renew(self) -> bool:
        """Write the claim again with a fresh heartbeat; then check nobody earlier owns the unit."""
        now = dht_time()
        with self._lock:
            self._claim = self._claim.copy(update=dict(heartbeat_time=now))
            claim = self._claim
            expiration = max(now + self.manager.settings.ttl_period, self._expiration_time + 0.001)
        if not self.manager.swarm.put_claim(claim, expiration):
            logger.warning("renewing the claim on %s was not accepted by any peer; retrying", self.unit)
            return False
        self._expiration_time = expiration
        entries = self.manager.swarm.get_claims(self.run_id, self.unit)
        mine = self.manager.swarm.subkey()
        owner = self.manager.owner_entry(self.unit, entries, exempt=mine)
        # Lost only when our claim is visible and an earlier one beats it: a claim missing from one read is a glitch.
        if owner is not None and owner.subkey != mine and any(e.subkey == mine for e in entries):
            logger.warning("lost %s to %s (an earlier claim appeared)", self.unit, owner.record.peer_id)
            self.lost.set()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.manager.settings.heartbeat_period):
            try:
                self.renew()
            except Exception as exc:  # the DHT went away (shutdown, crash): stop renewing, the lease will expire
                if self._stop.is_set():
                    return
                logger.warning("lease heartbeat for %s failed: %s", self.unit, exc)
                if isinstance(exc, (OSError, EOFError, BrokenPipeError)):
                    return
            if self.lost.is_set():
                return

    def withdraw(self) -> None:
        """Give the unit back now (before the TTL), e.g. after publishing its release or on a clean exit."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.manager.settings.heartbeat_period + 30)
        self.manager._withdraw(self._claim, self._expiration_time)
        self.manager._forget(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.withdraw()


class LeaseManager:
    """Claims units of one run for this peer. One manager per (peer, run); thread-safe for one claimer at a time."""

    def __init__(self, swarm: Swarm, run_id: str, settings: LeaseSettings = LeaseSettings(), hardware: str = ""):
        self.swarm, self.run_id, self.settings, self.hardware = swarm, run_id, settings, hardware
        self.leases: list[Lease] = []
        self._closed = threading.Event()
        self._written: dict[str, float] = {}  # unit -> expiration of our newest claim record (a store must outlive it)

    def choose_units(self, units: Iterable[str]) -> list[str]:
        return rendezvous_rank(units, self.swarm.peer_id)

    def owner(self, unit: str) -> Claim | None:
        owner = self.owner_entry(unit, self.swarm.get_claims(self.run_id, unit))
        return None if owner is None else owner.record

    def owner_entry(self, unit: str, entries: list[Signed], exempt: bytes | None = None) -> Signed | None:
        """The owning claim as this peer judges it (its own claim, `exempt`, never counts as stalled to itself)."""
        now, timeout = dht_time(), self.settings.progress_timeout
        # Progress matters only for a holder seen longer than the timeout: skip two DHT reads in the common case.
        old = any(now - e.holder_since > timeout for e in live_claims(entries, now) if e.subkey != exempt)
        progress = progress_of(self.swarm, self.run_id, unit) if old else {}
        if exempt is not None:
            progress.update({(e.peer_id, e.record.attempt): dht_time() for e in entries if e.subkey == exempt})
        return owner_of(entries, now, self.settings.backdate_grace, progress, timeout)

    def acquire(self, units: Iterable[str]) -> Lease | None:
        """Try units in this peer's rendezvous order; the first one won, or None if all are owned by others."""
        for unit in self.choose_units(units):
            if self._closed.is_set():
                return None
            lease = self.claim(unit)
            if lease is not None:
                return lease
        return None

    def claim(self, unit: str) -> Lease | None:
        """Claim `unit`: write, settle, re-read; a Lease if we are the owner, else None (our claim is withdrawn)."""
        return self._claim(unit, self.swarm.get_claims(self.run_id, unit))

    def _claim(self, unit: str, entries: list[Signed]) -> Lease | None:
        mine = self.swarm.subkey()
        now = dht_time()
        owner = self.owner_entry(unit, entries)
        if owner is not None and owner.subkey != mine:
            return None  # taken: an earlier live claim would beat ours anyway
        if owner is not None:  # our own claim from before a restart: renew it, keeping its place in line
            claimed_time, attempt = owner.record.claimed_time, owner.record.attempt
        else:
            claimed_time, attempt = now, self._next_attempt(unit, entries)
        claim = Claim(
            run_id=self.run_id,
            unit=unit,
            peer_id=self.swarm.peer_id,
            attempt=attempt,
            claimed_time=claimed_time,
            heartbeat_time=now,
            hardware=self.hardware,
        )
        # A store wins only with a later expiration: outlive our own earlier record (e.g. a fresh withdrawal).
        previous = [e.expiration_time for e in entries if e.subkey == mine] + [self._written.get(unit, 0.0)]
        expiration = max([now + self.settings.ttl_period, *(t + 0.001 for t in previous)])
        if not self.swarm.put_claim(claim, expiration):
            return None
        self._written[unit] = expiration
        settled = time.monotonic() + self.settings.settle_period
        if owner is None:  # while racing claims land: does an old attempt's checkpoint make ours a repeat?
            claim, expiration = self._past_checkpoints(claim, expiration)
        if not self._settle(claim, settled):
            self._withdraw(claim, expiration)
            return None
        owner = self.owner_entry(unit, self.swarm.get_claims(self.run_id, unit), exempt=mine)
        if owner is None or owner.subkey != mine:
            logger.debug("lost the race for %s to %s", unit, owner.record.peer_id if owner else "nobody")
            self._withdraw(claim, expiration)
            return None
        lease = Lease(self, claim, expiration)
        self.leases.append(lease)
        logger.info("claimed %s (attempt %d)", unit, attempt)
        return lease

    def _settle(self, claim: Claim, until: float) -> bool:
        """Wait until `until` (monotonic) for racing claims to land; False as soon as one that beats ours shows up
        (losing is certain then: the earliest claim never gives way to a later one, so the unit stays owned) or the
        manager closes. Racers that lose learn it a read after the winner's claim lands, not a settle period later."""
        period = max(MIN_SETTLE_POLL, self.settings.settle_period / 4)
        ours = (claim.claimed_time, claim.claimed_time, claim.peer_id)
        while (left := until - time.monotonic()) > 0:
            if self._closed.wait(min(period, left)):
                return False
            if until - time.monotonic() <= 0:
                return True
            entries = self.swarm.get_claims(self.run_id, claim.unit)
            owner = self.owner_entry(claim.unit, entries, exempt=self.swarm.subkey())
            if owner is not None and owner.peer_id != claim.peer_id and _place(owner, self.settings) < ours:
                logger.debug("lost the race for %s to %s while settling", claim.unit, owner.record.peer_id)
                return False
        return not self._closed.is_set()

    def _next_attempt(self, unit: str, entries: list[Signed]) -> int:
        return min(max((e.record.attempt for e in entries), default=0) + 1, MAX_ATTEMPT)

    def _past_checkpoints(self, claim: Claim, expiration: float) -> tuple[Claim, float]:
        """Checkpoints outlive claims: if one carries our attempt or a later one, claim again with the next attempt
        (same claimed time, so the same place in line). Read during the settle period, so it costs no time."""
        tokens = [e.record.token.attempt for e in self.swarm.get_checkpoints(self.run_id, claim.unit)]
        if max(tokens, default=0) < claim.attempt:
            return claim, expiration
        renewed = claim.copy(update=dict(attempt=min(max(tokens) + 1, MAX_ATTEMPT)))
        expiration += 0.001
        if self.swarm.put_claim(renewed, expiration):
            self._written[claim.unit] = expiration
            return renewed, expiration
        return claim, expiration

    def _withdraw(self, claim: Claim, expiration_time: float) -> None:
        # A store only wins with a later expiration than the stored one, so the tombstone outlives the claim a bit.
        withdrawn = claim.copy(update=dict(state="withdrawn", heartbeat_time=dht_time()))
        expiration = max(expiration_time, dht_time()) + 1.0
        self._written[claim.unit] = max(self._written.get(claim.unit, 0.0), expiration)
        try:
            self.swarm.put_claim(withdrawn, expiration)
        except Exception as exc:  # the DHT is gone: the claim will expire on its own
            logger.debug("could not withdraw %s: %s", claim.unit, exc)

    def _forget(self, lease: Lease) -> None:
        if lease in self.leases:
            self.leases.remove(lease)

    def close(self) -> None:
        """Stop claiming and withdraw every lease this manager holds."""
        self._closed.set()
        for lease in list(self.leases):
            lease.withdraw()
