"""A volunteer's checkpoint chain (protocol/chain.py) that survives its own restarts, and which checkpoints it may
resume from so that its release's chain will hold at the aggregator (client/release_checks.py).

The chain of an attempt is kept in `<unit dir>/chain-attempt-<N>.json`, rewritten (atomically) with every link. A
volunteer killed and restarted within its lease keeps its attempt: it resumes from its newest local checkpoint and
continues the same chain, so the checkpoints the aggregator verified before the crash stay on it with the links it
verified. Any other starting point is inherited (another holder's checkpoint, or an older attempt's of our own) and
must be one the run's aggregators verified, once they verify: the release names it (`resumed_from_step`) and its
chain starts there. A local checkpoint that is neither is discarded: the aggregator would refuse what follows it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from isles.protocol.chain import Chain, Link
from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_json

log = logging.getLogger("isles.join")
FORMAT = "isles-own-chain-1"


class KeptChain(Chain):
    """A Chain written to `path` after every link, with the step it inherited its start from (None: step 0)."""

    def __init__(self, run_id: str, unit: str, path: Path, inherited_from: int | None = None):
        super().__init__(run_id, unit)
        self.path, self.inherited_from = Path(path), inherited_from

    def add(self, step: int, sha256: str) -> Link:
        link = super().add(step, sha256)
        self._save()
        return link

    def _save(self) -> None:
        atomic_write_json(self.path, {"format": FORMAT, "run_id": self.run_id, "unit": self.unit,
                                      "inherited_from": self.inherited_from,
                                      "links": [[x.step, x.sha256] for x in self.links]})  # fmt: skip

    def truncated_after(self, step: int) -> KeptChain:
        """The chain up to and including `step` (a restart retrains what came after), saved."""
        kept = KeptChain(self.run_id, self.unit, self.path, self.inherited_from)
        kept.links = [x for x in self.links if x.step <= step]
        kept._save()
        return kept


def chain_path(unit_dir: Path, attempt: int) -> Path:
    return Path(unit_dir) / f"chain-attempt-{int(attempt)}.json"


def load_kept(run_id: str, unit: str, unit_dir: Path, attempt: int) -> KeptChain | None:
    """This attempt's chain from before a restart, or None (none kept, or unreadable: then it is started anew)."""
    path = chain_path(unit_dir, attempt)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or doc.get("run_id") != run_id or doc.get("unit") != unit:
            raise ValueError("another run, unit or format")
        inherited = doc.get("inherited_from")
        chain = KeptChain(run_id, unit, path, int(inherited) if inherited is not None else None)
        for step, sha256 in doc["links"]:
            Chain.add(chain, int(step), str(sha256))  # rebuilt without rewriting the file at every link
        return chain
    except (OSError, ValueError, TypeError, KeyError, IslesError) as exc:
        log.warning("ignoring the kept checkpoint chain %s: %s", path, exc)
        return None


class ResumePolicy:
    """Which checkpoints a volunteer may start from, given this attempt's kept chain and what the run verified."""

    def __init__(self, swarm, run_id: str, unit: str, kept: KeptChain | None):
        from isles.protocol.witness import get_verified, run_verifies

        self.kept = kept
        verified = get_verified(swarm, run_id, unit)
        self.verifies = bool(verified) or run_verifies(swarm, run_id)
        self.verified = {(v.step, v.sha256) for v in verified}

    def continues(self, step: int, sha256: str) -> bool:
        """Whether (step, sha256) is on this attempt's own chain: resuming there continues it."""
        found = self.kept.find(step) if self.kept is not None else None
        return found is not None and found.sha256 == sha256

    def allows(self, step: int, sha256: str) -> bool:
        return self.continues(step, sha256) or not self.verifies or (step, sha256) in self.verified

    def chain(self, run_id: str, unit: str, path: Path, step: int | None, sha256: str | None) -> KeptChain:
        """The chain this training extends: the kept one cut at `step`, one inheriting (step, sha256), or a new one
        from step 0."""
        if step is not None and sha256 is not None and self.continues(step, sha256):
            return self.kept.truncated_after(step)
        chain = KeptChain(run_id, unit, path, inherited_from=step)
        if step is not None and sha256 is not None:
            chain.add(step, sha256)
        else:
            chain._save()
        return chain
