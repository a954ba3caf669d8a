"""Shard leases over the DHT, without a coordinator: claim, settle, re-read, proceed only as the owner.

A unit belongs to the earliest live claim (by claimed time, then peer id), where a claim may look no older than the
reader saw it, give or take `backdate_grace`; a claim whose holder shows no progress (checkpoint pointers of its own,
advancing) for `progress_timeout` counts for nothing. The owner renews from a heartbeat thread; a peer that stops
renewing loses the unit after `ttl_period`. The DHT gives no compare-and-swap, so two owners are possible in rare
splits: a lease reads the unit once more a settle period after it was taken (a racer whose write took longer than the
settle period shows up then), and results carry the lease's fencing token.

The way to a lease is kept short (benchmarks/claims.py): the settle period counts from when the claim was dated, a
peer new to the run writes its first claim while it reads the unit, a claimant gives up as soon as a claim that beats
its own shows up, and losers look up every unit's claims at once and spread over the free units by a matching that
every racer computes alike.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .record_base import MAX_ATTEMPT
from .record_claim import Claim, FencingToken
from .swarm import MAX_CLOCK_SKEW, Signed, Swarm, dht_time

logger = logging.getLogger(__name__)

# Claims are self-reported: a claim may live at most this long past its own heartbeat, and may not be dated in the
# future, so one peer cannot hold a unit for years with a single write.
MAX_TTL_PERIOD = 3600.0
MIN_SETTLE_POLL = 0.25  # while settling, look for a claim that beats ours at most this often (seconds)
# A peer whose claim or withdrawal is this many settle periods old still counts as racing for a unit.
CONTENDER_WINDOW_SETTLES = 4
READ_ESTIMATE_WEIGHT = 0.3  # how much the newest read's duration moves the estimate of the next one


@dataclass(frozen=True)
class LeaseSettings:
    ttl_period: float = 60.0  # a claim not renewed for this long is dead; its unit is open again
    heartbeat_period: float = 15.0  # renew this often (well under the TTL, so a slow renewal is not fatal)
    settle_period: float = 3.0  # after dating a claim (then writing it), wait this long for racers' claims to land
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


def _place_of(claim: Claim) -> tuple:
    """Our own claim's place in line (we saw it when we wrote it)."""
    return (claim.claimed_time, claim.claimed_time, claim.peer_id)


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
        self.confirmed = threading.Event()  # set after the read one settle period in (then `lost` tells the outcome)
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
        self.confirm()
        return True

    def confirm(self) -> bool:
        """Read the unit's claims: still ours? Sets `lost` when an earlier claim shows up (e.g. a racer whose write
        was still travelling when we settled). Lost only when our claim is visible and an earlier one beats it: a
        claim missing from one read is a glitch."""
        entries = self.manager.swarm.get_claims(self.run_id, self.unit)
        mine = self.manager.swarm.subkey()
        owner = self.manager.owner_entry(self.unit, entries, exempt=mine)
        if owner is not None and owner.subkey != mine and any(e.subkey == mine for e in entries):
            logger.warning("lost %s to %s (an earlier claim appeared)", self.unit, owner.record.peer_id)
            self.lost.set()
        return not self.lost.is_set()

    def _heartbeat(self) -> None:
        settings = self.manager.settings
        # One more read a settle period after taking the lease: a racer's write slower than the settle period (a
        # burst of peers on a busy network) is seen then, within seconds of training, not a heartbeat later.
        if not self._stop.wait(min(settings.settle_period, settings.heartbeat_period)):
            self._beat(self.confirm)
        self.confirmed.set()
        # The first renewal comes a heartbeat after the claim was written (it expires a TTL after that), however
        # long the settle period and the read above took.
        first = max(0.0, self._expiration_time - settings.ttl_period + settings.heartbeat_period - dht_time())
        while not self.lost.is_set() and not self._stop.wait(first):
            if not self._beat(self.renew):
                return
            first = settings.heartbeat_period

    def _beat(self, action) -> bool:
        """Run one heartbeat action; False when the DHT went away (stop beating: the lease will expire)."""
        try:
            action()
        except Exception as exc:  # the DHT went away (shutdown, crash): stop renewing, the lease will expire
            if self._stop.is_set():
                return False
            logger.warning("lease heartbeat for %s failed: %s", self.unit, exc)
            if isinstance(exc, (OSError, EOFError, BrokenPipeError)):
                return False
        return True

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

    def __init__(
        self,
        swarm: Swarm,
        run_id: str,
        settings: LeaseSettings = LeaseSettings(),
        hardware: str = "",
        new_to_run: bool = False,
    ):
        """`new_to_run`: this peer cannot hold a claim in the run from before (a first start, not a restart), so its
        first claim is written at once and the unit's claims are read while the write travels (one read fewer on
        the way to a lease). A restarted peer reads first, to renew its old claim and keep its place in line."""
        self.swarm, self.run_id, self.settings, self.hardware = swarm, run_id, settings, hardware
        self.leases: list[Lease] = []
        self._closed = threading.Event()
        self._written: dict[str, float] = {}  # unit -> expiration of our newest claim record (a store must outlive it)
        self._write_first = new_to_run  # only for the first claim: a peer that read nothing yet would write blindly
        self._read_s = 0.0  # how long a read of a unit's claims takes now (an estimate, from this manager's reads)

    def choose_units(self, units: Iterable[str]) -> list[str]:
        return rendezvous_rank(units, self.swarm.peer_id)

    def owner(self, unit: str) -> Claim | None:
        owner = self.owner_entry(unit, self.swarm.get_claims(self.run_id, unit))
        return None if owner is None else owner.record

    def owner_entry(
        self,
        unit: str,
        entries: list[Signed],
        exempt: bytes | None = None,
        progress_read: dict | None = None,
        grace: float | None = None,
    ) -> Signed | None:
        """The owning claim as this peer judges it (its own claim, `exempt`, never counts as stalled to itself).
        `progress_read` (unit -> progress) keeps the progress read for a unit, for callers that judge it again soon;
        `grace` replaces the settings' backdate grace (infinite: rank by stated times alone)."""
        now, timeout = dht_time(), self.settings.progress_timeout
        # Progress matters only for a holder seen longer than the timeout: skip two DHT reads in the common case.
        old = any(now - e.holder_since > timeout for e in live_claims(entries, now) if e.subkey != exempt)
        progress: dict = {}
        if old and progress_read is not None and unit in progress_read:
            progress = dict(progress_read[unit])
        elif old:
            progress = progress_of(self.swarm, self.run_id, unit)
            if progress_read is not None:
                progress_read[unit] = dict(progress)
        if exempt is not None:
            progress.update({(e.peer_id, e.record.attempt): dht_time() for e in entries if e.subkey == exempt})
        grace = self.settings.backdate_grace if grace is None else grace
        return owner_of(entries, now, grace, progress, timeout)

    def acquire(self, units: Iterable[str]) -> Lease | None:
        """Claim one of `units`: the first won, or None if all are owned by others.

        A peer new to the run writes its first claim at once, on its first unit in rendezvous order (which spreads
        racing peers). Otherwise, and after each lost race, it looks up every unit's claims in one go and claims a
        free unit: first the one that a matching of racing peers to free units, which every racer computes alike,
        gives it, so that peers that lost a race together rarely collide again."""
        units = list(units)
        tried: set[str] = set()
        progress_read: dict = {}  # holders' progress, read at most once per unit in this call
        if self._write_first and units:
            first = self.choose_units(units)[0]
            tried.add(first)
            if (lease := self.claim(first)) is not None:
                return lease
        while not self._closed.is_set():
            view = self.swarm.scan_claims(self.run_id, units)
            order = [unit for unit in self._claim_order(view, progress_read) if unit not in tried]
            if not order:
                return None
            tried.add(order[0])
            # The scan is a hint and may miss a record: the claim is dated only after a full read of its unit, as
            # a claim without the scan would be.
            if (lease := self.claim(order[0])) is not None:
                return lease
        return None

    def _claim_order(self, view: dict[str, list[Signed]], progress_read: dict | None = None) -> list[str]:
        """Units to try, given every unit's claims: one we already own (from before a restart), then the free unit
        this peer is matched to, then the other free ones in rendezvous order; units others own are left out."""
        mine, now = self.swarm.subkey(), dht_time()
        owners = {unit: self.owner_entry(unit, entries, progress_read=progress_read) for unit, entries in view.items()}
        ours = [unit for unit, owner in owners.items() if owner is not None and owner.subkey == mine]
        free = [unit for unit, owner in owners.items() if owner is None]
        # Racing: peers with a claim or a withdrawal of the last few settle periods that own no unit (losers of a
        # race withdraw at once, so a withdrawal counts too). Everyone who reads the same claims gets the same list.
        recent = now - CONTENDER_WINDOW_SETTLES * max(self.settings.settle_period, MIN_SETTLE_POLL)
        owning = {owner.peer_id for owner in owners.values() if owner is not None}
        racing = {e.peer_id for entries in view.values() for e in entries if e.record.heartbeat_time >= recent}
        racing = sorted((racing - owning) | {self.swarm.peer_id})
        shared = sorted(free, key=lambda unit: hashlib.sha256(f"{self.run_id}/{unit}".encode()).digest())
        matched = [shared[racing.index(self.swarm.peer_id) % len(shared)]] if shared else []
        return ours + matched + [unit for unit in self.choose_units(free) if unit not in matched]

    def claim(self, unit: str) -> Lease | None:
        """Claim `unit`: write, settle, re-read; a Lease if we are the owner, else None (our claim is withdrawn)."""
        if self._write_first:
            self._write_first = False
            return self._claim_writing_first(unit)
        return self._claim(unit, self._read_claims(unit))

    def _read_claims(self, unit: str) -> list[Signed]:
        began = time.monotonic()
        entries = self.swarm.get_claims(self.run_id, unit)
        took, weight = time.monotonic() - began, READ_ESTIMATE_WEIGHT if self._read_s else 1.0
        self._read_s += weight * (took - self._read_s)
        return entries

    def _claim(self, unit: str, entries: list[Signed]) -> Lease | None:
        mine = self.swarm.subkey()
        owner = self.owner_entry(unit, entries)
        if owner is not None and owner.subkey != mine:
            return None  # taken: an earlier live claim would beat ours anyway
        if owner is not None:  # our own claim from before a restart: renew it, keeping its place in line
            claim = self._new_claim(unit, owner.record.claimed_time, owner.record.attempt)
        else:
            claim = self._new_claim(unit, attempt=self._next_attempt(unit, entries))
        # Racing claims dated before ours were being written when ours was dated: the settle period counts from then.
        settled = time.monotonic() + self.settings.settle_period
        expiration = self._expiration(unit, entries)
        if not self.swarm.put_claim(claim, expiration):
            return None
        self._written[unit] = expiration
        return self._settle_and_take(claim, expiration, settled, renewed=owner is not None)

    def _claim_writing_first(self, unit: str) -> Lease | None:
        """A peer new to the run: write the claim and read the unit's claims at the same time, then do what `_claim`
        does with what the read found (give up to an earlier owner, take a later attempt number)."""
        mine = self.swarm.subkey()
        claim = self._new_claim(unit, attempt=1)
        settled = time.monotonic() + self.settings.settle_period
        expiration = self._expiration(unit, [])
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"read-{unit}") as reader:
            read = reader.submit(self._read_claims, unit)
            stored = self.swarm.put_claim(claim, expiration)
            try:
                entries = read.result()
            except Exception:
                if stored:  # no read, no judgment: give the unit back rather than hold it blind
                    self._written[unit] = expiration
                    self._withdraw(claim, expiration)
                raise
        if not stored:
            return None
        self._written[unit] = expiration
        # Whatever this read found was there when ours was dated (the read began then), however late this reader
        # first saw it: we give way to any live claim among them that states an earlier time than ours. (Ranked by
        # first-seen times, a long-standing owner would rank behind a racer dated just after us, and then us.)
        others = [e for e in entries if e.subkey != mine]
        owner = self.owner_entry(unit, others, grace=float("inf"))
        if owner is not None and (owner.record.claimed_time, owner.peer_id) < (claim.claimed_time, claim.peer_id):
            logger.debug("%s is owned by %s; withdrawing the claim written before reading", unit, owner.peer_id)
            self._withdraw_in_background(claim, expiration)
            return None
        attempt = self._next_attempt(unit, others)
        if attempt > claim.attempt:  # an earlier holder's attempt lapsed: ours is the next, in the same place in line
            claim, expiration = self._rewrite(claim, attempt, expiration)
        return self._settle_and_take(claim, expiration, settled)

    def _new_claim(self, unit: str, claimed_time: float | None = None, attempt: int = 1) -> Claim:
        now = dht_time()
        return Claim(
            run_id=self.run_id,
            unit=unit,
            peer_id=self.swarm.peer_id,
            attempt=attempt,
            claimed_time=now if claimed_time is None else claimed_time,
            heartbeat_time=now,
            hardware=self.hardware,
        )

    def _expiration(self, unit: str, entries: list[Signed]) -> float:
        """A store wins only with a later expiration: outlive our own earlier record (e.g. a fresh withdrawal)."""
        mine = self.swarm.subkey()
        previous = [e.expiration_time for e in entries if e.subkey == mine] + [self._written.get(unit, 0.0)]
        return max([dht_time() + self.settings.ttl_period, *(t + 0.001 for t in previous)])

    def _settle_and_take(self, claim: Claim, expiration: float, settled: float, renewed: bool = False) -> Lease | None:
        """Settle until `settled` (monotonic), then read again: a Lease if our claim is still the earliest.

        A new claim (not one `renewed` after a restart) also looks, while it settles, for checkpoints of its attempt
        number or a later one: an old attempt's checkpoints would make ours a repeat."""
        unit, mine = claim.unit, self.swarm.subkey()
        if renewed:
            won = self._settle(claim, settled)
        else:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"checkpoints-{unit}") as pool:
                past = pool.submit(self._past_checkpoints, claim, expiration)
                won = self._settle(claim, settled)
                claim, expiration = past.result()
        if not won:
            self._withdraw_in_background(claim, expiration)
            return None
        owner = self.owner_entry(unit, self._read_claims(unit), exempt=mine)
        if owner is None or owner.subkey != mine:
            logger.debug("lost the race for %s to %s", unit, owner.record.peer_id if owner else "nobody")
            self._withdraw_in_background(claim, expiration)
            return None
        lease = Lease(self, claim, expiration)
        self.leases.append(lease)
        logger.info("claimed %s (attempt %d)", unit, claim.attempt)
        return lease

    def _settle(self, claim: Claim, until: float) -> bool:
        """Wait until `until` (monotonic) for racing claims to land; False as soon as one that beats ours shows up
        (losing is certain then: the earliest claim never gives way to a later one, so the unit stays owned) or the
        manager closes. Racers that lose learn it a read after the winner's claim lands, not a settle period later."""
        period = max(MIN_SETTLE_POLL, self.settings.settle_period / 4)
        ours = _place_of(claim)
        while until - time.monotonic() > self._read_s:  # a read started later would end after the settle period
            polled = time.monotonic()
            entries = self._read_claims(claim.unit)
            owner = self.owner_entry(claim.unit, entries, exempt=self.swarm.subkey())
            if owner is not None and owner.peer_id != claim.peer_id and _place(owner, self.settings) < ours:
                logger.debug("lost the race for %s to %s while settling", claim.unit, owner.record.peer_id)
                return False
            if self._closed.wait(max(0.0, min(polled + period, until) - time.monotonic())):
                return False
        return not self._closed.wait(max(0.0, until - time.monotonic()))

    def _next_attempt(self, unit: str, entries: list[Signed]) -> int:
        return min(max((e.record.attempt for e in entries), default=0) + 1, MAX_ATTEMPT)

    def _past_checkpoints(self, claim: Claim, expiration: float) -> tuple[Claim, float]:
        """Checkpoints outlive claims: if one carries our attempt or a later one, claim again with the next attempt
        (same claimed time, so the same place in line)."""
        tokens = [e.record.token.attempt for e in self.swarm.get_checkpoints(self.run_id, claim.unit)]
        if max(tokens, default=0) < claim.attempt:
            return claim, expiration
        return self._rewrite(claim, min(max(tokens) + 1, MAX_ATTEMPT), expiration)

    def _rewrite(self, claim: Claim, attempt: int, expiration: float) -> tuple[Claim, float]:
        """Write our claim again with a later attempt (same claimed time: the same place in line); the claim in force
        and the expiration a later store must outlive."""
        renewed = claim.copy(update=dict(attempt=attempt))
        expiration += 0.001
        if self.swarm.put_claim(renewed, expiration):
            self._written[claim.unit] = expiration
            return renewed, expiration
        return claim, expiration

    def _withdraw_in_background(self, claim: Claim, expiration_time: float) -> None:
        """A lost race: the tombstone need not land before this peer tries its next unit (another key)."""
        threading.Thread(
            target=self._store_tombstone,
            args=self._tombstone(claim, expiration_time),
            name=f"withdraw-{claim.unit}",
            daemon=True,
        ).start()

    def _withdraw(self, claim: Claim, expiration_time: float) -> None:
        self._store_tombstone(*self._tombstone(claim, expiration_time))

    def _tombstone(self, claim: Claim, expiration_time: float) -> tuple[Claim, float]:
        """The withdrawn claim and its expiration, already counted as written (a later claim must outlive it)."""
        # A store only wins with a later expiration than the stored one, so the tombstone outlives the claim a bit.
        withdrawn = claim.copy(update=dict(state="withdrawn", heartbeat_time=dht_time()))
        expiration = max(expiration_time, dht_time()) + 1.0
        self._written[claim.unit] = max(self._written.get(claim.unit, 0.0), expiration)
        return withdrawn, expiration

    def _store_tombstone(self, withdrawn: Claim, expiration: float) -> None:
        try:
            self.swarm.put_claim(withdrawn, expiration)
        except Exception as exc:  # the DHT is gone: the claim will expire on its own
            logger.debug("could not withdraw %s: %s", withdrawn.unit, exc)

    def _forget(self, lease: Lease) -> None:
        if lease in self.leases:
            self.leases.remove(lease)

    def close(self) -> None:
        """Stop claiming and withdraw every lease this manager holds."""
        self._closed.set()
        for lease in list(self.leases):
            lease.withdraw()
