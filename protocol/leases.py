"""Shard leases over the DHT, without a coordinator: claim, settle, re-read, proceed only as the owner.

A unit belongs to the earliest live claim (by claimed_time, then peer id). The owner renews its claim from a
heartbeat thread, carrying its progress; a peer that stops renewing loses the unit after `ttl_period`. The DHT
gives no compare-and-swap, so two owners are possible in rare splits: results carry the lease's fencing token.

    manager = LeaseManager(swarm, run_id, LeaseSettings())
    lease = manager.acquire(manifest.units)        # None: every unit is owned by someone else
    lease.update_progress(step, steps, samples_per_s); ...; lease.withdraw()
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from .records import Claim, FencingToken
from .swarm import Signed, Swarm, dht_time

logger = logging.getLogger(__name__)

# Claims are self-reported: a claim may live at most this long past its own heartbeat, and may not be dated in the
# future, so one peer cannot hold a unit for years with a single write.
MAX_TTL_PERIOD = 3600.0
MAX_CLOCK_SKEW = 3.0  # hivemind's MAX_DHT_TIME_DISCREPANCY_SECONDS


@dataclass(frozen=True)
class LeaseSettings:
    ttl_period: float = 60.0  # a claim not renewed for this long is dead; its unit is open again
    heartbeat_period: float = 15.0  # renew this often (well under the TTL, so a slow renewal is not fatal)
    settle_period: float = 3.0  # after writing a claim, wait this long for racing claims to land, then re-read

    def __post_init__(self):
        if not 0 < self.heartbeat_period < self.ttl_period:
            raise ValueError("the heartbeat period must be positive and shorter than the lease TTL")
        if self.ttl_period > MAX_TTL_PERIOD:
            raise ValueError(f"the lease TTL cannot exceed {MAX_TTL_PERIOD:.0f} s")
        if self.settle_period < 0:
            raise ValueError("the settle period cannot be negative")


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


def owner_of(entries: list[Signed], now: float) -> Signed | None:
    """The claim that owns the unit: the earliest live one, ties broken by peer id."""
    live = live_claims(entries, now)
    return min(live, key=lambda e: (e.record.claimed_time, e.record.peer_id), default=None)


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
        owner = owner_of(entries, dht_time())
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

    def choose_units(self, units: Iterable[str]) -> list[str]:
        return rendezvous_rank(units, self.swarm.peer_id)

    def owner(self, unit: str) -> Claim | None:
        owner = owner_of(self.swarm.get_claims(self.run_id, unit), dht_time())
        return None if owner is None else owner.record

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
        mine = self.swarm.subkey()
        now = dht_time()
        entries = self.swarm.get_claims(self.run_id, unit)
        owner = owner_of(entries, now)
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
        previous = [e.expiration_time for e in entries if e.subkey == mine]
        expiration = max([now + self.settings.ttl_period, *(t + 0.001 for t in previous)])
        if not self.swarm.put_claim(claim, expiration):
            return None
        if self._closed.wait(self.settings.settle_period):
            self._withdraw(claim, expiration)
            return None
        owner = owner_of(self.swarm.get_claims(self.run_id, unit), dht_time())
        if owner is None or owner.subkey != mine:
            logger.debug("lost the race for %s to %s", unit, owner.record.peer_id if owner else "nobody")
            self._withdraw(claim, expiration)
            return None
        lease = Lease(self, claim, expiration)
        self.leases.append(lease)
        logger.info("claimed %s (attempt %d)", unit, attempt)
        return lease

    def _next_attempt(self, unit: str, entries: list[Signed]) -> int:
        previous = [e.record.attempt for e in entries]
        checkpoint = self.swarm.latest_checkpoint(self.run_id, unit)
        if checkpoint is not None:
            previous.append(checkpoint.token.attempt)
        return max(previous, default=0) + 1

    def _withdraw(self, claim: Claim, expiration_time: float) -> None:
        # A store only wins with a later expiration than the stored one, so the tombstone outlives the claim a bit.
        withdrawn = claim.copy(update=dict(state="withdrawn", heartbeat_time=dht_time()))
        try:
            self.swarm.put_claim(withdrawn, max(expiration_time, dht_time()) + 1.0)
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
