"""A unit's checkpoint chain: every checkpoint a holder pushes is linked by hash to the one before, and its release
carries the chain, so "trained by this volunteer, on this shard" is checked against what the aggregators verified.

link_0 = H("isles-chain-1/run_id/unit"); link_i = H(link_{i-1} / sha256 of checkpoint i / its step). A pointer carries
its checkpoint's link and the one before (a commitment to the history so far, made when it is pushed); a release
carries the head, signed with the record, and publishes the links (CHAIN_FILE) and the checkpoint of the recipe's last
step (FINAL_CHECKPOINT), whose EMA weights are the exported model's. client/release_checks.py checks all of it.

    chain = Chain(run_id, unit); link = chain.add(step, sha256)    # per pushed checkpoint, then the final one
    chain.write(folder / CHAIN_FILE); release.chain_head = chain.head
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import IslesError
from .files import atomic_write_json

FORMAT = "isles-chain-1"
CHAIN_FILE = "chain.json"
FINAL_CHECKPOINT = "final.isles"  # the checkpoint at the recipe's last step, published beside the exported model
MAX_LINKS = 4096  # ~8 days of training at one pushed checkpoint every 3 minutes; the file stays under ~400 KB
MAX_CHAIN_BYTES = 128 * MAX_LINKS
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def genesis(run_id: str, unit: str) -> str:
    """The link before any checkpoint: binds the chain to one unit of one run."""
    return hashlib.sha256(f"{FORMAT}/{run_id}/{unit}".encode()).hexdigest()


def next_link(prev: str, sha256: str, step: int) -> str:
    return hashlib.sha256(f"{prev}/{sha256}/{int(step)}".encode()).hexdigest()


@dataclass(frozen=True)
class Link:
    step: int
    sha256: str  # of the checkpoint file
    link: str  # the chain's hash after this checkpoint
    prev: str  # ... and before it


@dataclass
class Chain:
    """The checkpoints of one unit's training, oldest first (the first may be the one a resumer started from)."""

    run_id: str
    unit: str
    links: list[Link] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.links[-1].link if self.links else genesis(self.run_id, self.unit)

    def add(self, step: int, sha256: str) -> Link:
        """Append a checkpoint; steps only grow and the chain is bounded (an IslesError otherwise)."""
        if not _SHA256.match(sha256):
            raise IslesError(f"not a sha256: {sha256!r}")
        if self.links and step <= self.links[-1].step:
            raise IslesError(f"checkpoint chain of {self.unit}: step {step} after step {self.links[-1].step}")
        if len(self.links) >= MAX_LINKS:
            raise IslesError(f"checkpoint chain of {self.unit} is full ({MAX_LINKS} links)")
        prev = self.head
        link = Link(int(step), sha256, next_link(prev, sha256, step), prev)
        self.links.append(link)
        return link

    def find(self, step: int) -> Link | None:
        return next((link for link in self.links if link.step == step), None)

    def write(self, path: Path) -> None:
        links = [[x.step, x.sha256] for x in self.links]
        atomic_write_json(path, {"format": FORMAT, "run_id": self.run_id, "unit": self.unit, "links": links})

    @classmethod
    def read(cls, path: Path, run_id: str, unit: str) -> Chain:
        """A published chain file, its links recomputed; anything malformed, oversized or of another unit is an
        IslesError."""
        bad = "the checkpoint chain file"
        try:
            if path.stat().st_size > MAX_CHAIN_BYTES:
                raise IslesError(f"{bad} is larger than {MAX_CHAIN_BYTES} bytes")
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise IslesError(f"{bad} is unreadable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise IslesError(f"{bad} is not of format {FORMAT}")
        if doc.get("run_id") != run_id or doc.get("unit") != unit:
            raise IslesError(f"{bad} is of {doc.get('unit')!r} of run {doc.get('run_id')!r}")
        pairs = doc.get("links")
        if not isinstance(pairs, list) or not pairs:
            raise IslesError(f"{bad} holds no checkpoints")
        chain = cls(run_id, unit)
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int and isinstance(pair[1], str)):
                raise IslesError(f"{bad} holds a link that is not [step, sha256]")
            if pair[0] <= 0:
                raise IslesError(f"{bad} holds step {pair[0]}")
            chain.add(pair[0], pair[1])
        return chain
