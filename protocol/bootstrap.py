"""The bootstrap node: a long-lived DHT peer on a fixed port that volunteers join through, and that keeps run
manifests alive by re-announcing them. `isles bootstrap` (client/cli/swarm.py) is a thin wrapper around it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass

from .dht import DHTConfig, DHTNode, open_dht
from .records import RunManifest
from .swarm import MANIFEST_PERIOD, Swarm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapSettings:
    announce_period: float = MANIFEST_PERIOD / 6  # re-announce manifests well before they expire
    log_period: float = 60.0  # how often to log the number of peers and runs
    # Keep alive the runs its own identity signed that other nodes published too (a second node started with the
    # owner's identity backs the first up), never a stranger's: at most `max_runs` runs in all.
    adopt_runs: bool = True
    max_runs: int = 64


def join_maddr(maddrs: list[str]) -> str:
    """The address to show volunteers: a public one if we have it, then a private one, loopback last."""

    def rank(maddr: str) -> int:
        parts = maddr.split("/")
        if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
            return 1  # dns names: announced on purpose
        try:
            ip = ipaddress.ip_address(parts[2])
        except ValueError:
            return 3
        return 4 if ip.is_loopback else 2 if ip.is_private else 0

    return sorted(maddrs, key=rank)[0]


class BootstrapNode:
    """A DHT peer that announces manifests every `announce_period` until `stop` is set."""

    def __init__(self, config: DHTConfig, manifests: list[RunManifest], settings: BootstrapSettings):
        self.config, self.manifests, self.settings = config, list(manifests), settings
        self.node: DHTNode | None = None
        self.swarm: Swarm | None = None
        self.stop = threading.Event()

    def start(self) -> None:
        self.node = open_dht(self.config)
        self.swarm = Swarm(self.node)
        for manifest in self.manifests:
            self.node.register_run(manifest)
        self.announce()

    @property
    def maddrs(self) -> list[str]:
        return self.node.visible_maddrs()

    def join_line(self) -> str:
        return f"To join: isles join --peers {join_maddr(self.maddrs)}"

    def adopt(self) -> None:
        """Take over announcing runs this node's owner signed that other nodes published (a manifest is checked
        against its run id and its owner's signature on read); a stranger's runs are left to their own nodes."""
        known = {m.run_id for m in self.manifests}
        mine = self.node.identity.owner_key
        for entry in self.swarm.list_runs()[: self.settings.max_runs * 4]:
            if len(self.manifests) >= self.settings.max_runs:
                logger.warning("announcing %d runs already: adopting no more", len(self.manifests))
                return
            if entry.run_id in known:
                continue
            manifest = self.swarm.get_manifest(entry.run_id)
            if manifest is not None and manifest.owner == mine:
                logger.info("adopting run %s (%s): announcing it from this node too", manifest.run_id, manifest.name)
                self.manifests.append(manifest)

    def announce(self) -> None:
        if self.settings.adopt_runs:
            self.adopt()
        for manifest in self.manifests:
            if not self.swarm.publish_manifest(manifest, expiration_period=MANIFEST_PERIOD):
                logger.warning("run %s: no peer accepted the manifest yet; will retry", manifest.run_id)

    def status_line(self) -> str:
        runs = self.swarm.list_runs()
        return f"{self.node.num_peers()} peers in the routing table, {len(runs)} runs announced in the swarm"

    def serve(self) -> None:
        """Re-announce and log until `stop` is set (by a signal handler, or a test)."""
        tick = min(self.settings.announce_period, self.settings.log_period)
        since_announce = since_log = 0.0
        while not self.stop.wait(tick):
            since_announce += tick
            since_log += tick
            try:
                if since_announce >= self.settings.announce_period:
                    self.announce()
                    since_announce = 0.0
                if since_log >= self.settings.log_period:
                    logger.info(self.status_line())
                    since_log = 0.0
            except Exception as exc:  # keep the node up: a failed announce is retried at the next tick
                logger.warning("periodic announce failed: %s", exc)

    def shutdown(self) -> None:
        self.stop.set()
        if self.node is not None:
            self.node.shutdown()
            self.node = None
