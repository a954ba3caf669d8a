"""A run's state at a glance, read from the DHT: per unit open / claimed / released, owner, progress, rate and ETA;
peers online; the ensemble; rejected releases. What `isles status` prints (as a table, or as JSON with --json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .leases import LeaseSettings, live_claims, owner_of, progress_of, stalled_claims
from .record_ensemble import Ensemble
from .record_presence import PeerPresence
from .record_rejection import Rejection
from .records import RunManifest
from .swarm import Swarm, dht_time


@dataclass
class UnitView:
    unit: str
    state: str  # "open" | "claimed" | "released"
    owner: str | None = None  # peer id of the lease owner (or of the first accepted release)
    attempt: int | None = None
    step: int = 0
    steps: int = 0
    samples_per_s: float = 0.0
    eta_s: float | None = None  # seconds to the end of training at the current rate
    heartbeat_age_s: float | None = None
    claimants: int = 0  # live claims, the owner's included (more than one only during a race)
    stalled: list[str] = field(default_factory=list)  # holders of live claims with no progress in time (ignored)
    checkpoint_step: int | None = None
    releases: int = 0
    rejected: int = 0


@dataclass
class RunView:
    run_id: str
    name: str
    dataset: str
    units: list[UnitView]
    peers_online: list[str] = field(default_factory=list)
    presence: list[dict] = field(default_factory=list)
    ensemble: dict | None = None
    rejections: list[dict] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counts = {"open": 0, "claimed": 0, "released": 0}
        for unit in self.units:
            counts[unit.state] += 1
        return counts

    def to_json(self) -> dict:
        return {**asdict(self), "counts": self.counts}


def read_run(
    swarm: Swarm, run_id: str, manifest: RunManifest | None = None, settings: LeaseSettings | None = None
) -> RunView | None:
    """The run's current state, or None if its manifest cannot be found in the swarm. Claims are judged as a
    claimant would (`settings`, default: the run's progress timeout): backdated claims by when they were first seen,
    stalled holders not owners."""
    manifest = manifest or swarm.get_manifest(run_id)
    if manifest is None:
        return None
    settings = settings or LeaseSettings(progress_timeout=manifest.progress_timeout)
    rejections = swarm.get_rejections(run_id)
    rejected = {(r.unit, r.revision, r.token.attempt, r.token.owner) for r in rejections}
    batches = [r.global_batch for r in manifest.experts] + [manifest.router.global_batch]
    units, claim_peers = [], set()
    now = dht_time()
    for unit, global_batch in zip(manifest.units, batches, strict=True):
        view = UnitView(unit=unit, state="open")
        entries = swarm.get_claims(run_id, unit)
        live = live_claims(entries, now)
        claim_peers.update(e.record.peer_id for e in live)
        view.claimants = len(live)
        progress = progress_of(swarm, run_id, unit)
        view.stalled = [e.peer_id for e in stalled_claims(entries, now, progress, settings.progress_timeout)]
        checkpoint = swarm.latest_checkpoint(run_id, unit)
        view.checkpoint_step = checkpoint.step if checkpoint else None
        releases = swarm.get_releases(run_id, unit)
        accepted = [r for r in releases if (unit, r.revision, r.token.attempt, r.token.owner) not in rejected]
        view.releases, view.rejected = len(accepted), len(releases) - len(accepted)
        owner = owner_of(entries, now, settings.backdate_grace, progress, settings.progress_timeout)
        if accepted:
            view.state, view.owner, view.attempt = "released", accepted[0].token.owner, accepted[0].token.attempt
            view.step = view.steps = accepted[0].steps
        elif owner is not None:
            claim = owner.record
            view.state, view.owner, view.attempt = "claimed", claim.peer_id, claim.attempt
            view.step, view.steps, view.samples_per_s = claim.step, claim.steps, claim.samples_per_s
            view.heartbeat_age_s = max(0.0, now - claim.heartbeat_time)
            if claim.samples_per_s > 0 and claim.steps > 0:
                view.eta_s = (claim.steps - claim.step) * global_batch / claim.samples_per_s
        units.append(view)
    presence = swarm.get_presence(run_id)
    online = {p.peer_id for p in presence if p.state != "OFFLINE"} | claim_peers
    ensemble = swarm.latest_ensemble(run_id)
    return RunView(
        run_id=run_id,
        name=manifest.name,
        dataset=manifest.dataset,
        units=units,
        peers_online=sorted(online),
        presence=[_presence_json(p) for p in presence],
        ensemble=_ensemble_json(ensemble) if ensemble else None,
        rejections=[_rejection_json(r) for r in rejections],
    )


def _presence_json(presence: PeerPresence) -> dict:
    return {"peer_id": presence.peer_id, "state": presence.state, "unit": presence.unit, "hardware": presence.hardware}


def _ensemble_json(ensemble: Ensemble) -> dict:
    return {
        "repo": ensemble.repo,
        "revision": ensemble.revision,
        "experts": [t.unit for t in ensemble.experts],
        "complete": ensemble.complete,
    }


def _rejection_json(rejection: Rejection) -> dict:
    return {
        "unit": rejection.unit,
        "revision": rejection.revision,
        "owner": rejection.token.owner,
        "reason": rejection.reason,
    }


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
