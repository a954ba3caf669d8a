"""What an aggregator has judged, kept in its work folder as one atomic JSON file: a restarted aggregator neither
downloads nor loads a rejected release again (so a release that crashed or filled it once cannot do so twice), and
keeps the order in which it first saw each unit's releases (the first valid one wins, whatever times they state).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from isles.protocol.files import atomic_write_json

log = logging.getLogger("isles.aggregate")

JUDGMENTS_FILE = "judgments.json"
MAX_FILE_BYTES = 16 << 20
MAX_ENTRIES = 20_000  # releases remembered per run (a flood beyond this is judged again after a restart)
ACCEPTED = "accepted"


def release_id(release) -> str:
    """One release, as text: unit, attempt, signer's peer id, revision."""
    return json.dumps([release.unit, release.token.attempt, release.token.owner, release.revision])


class Judgments:
    """Verdicts (release id -> "accepted" or the rejection reason) and the first-seen order of release ids."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / JUDGMENTS_FILE
        self.verdicts: dict[str, str] = {}
        self.order: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            data = json.loads(self.path.read_text())
            verdicts, order = data["verdicts"], data["order"]
            if not (isinstance(verdicts, dict) and isinstance(order, list)):
                raise ValueError("not the judgments layout")
            self.verdicts = {str(k): str(v) for k, v in verdicts.items()}
            self.order = {str(k): i for i, k in enumerate(order)}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable %s (%s): every release is judged again", self.path, exc)
            self.verdicts, self.order = {}, {}

    def save(self) -> None:
        order = sorted(self.order, key=self.order.get)[-MAX_ENTRIES:]
        verdicts = {k: v for k, v in self.verdicts.items() if k in set(order)}
        atomic_write_json(self.path, {"verdicts": verdicts, "order": order})

    def in_observed_order(self, releases: list) -> list:
        """`releases` ordered by when this aggregator first saw them (new ones after, in the order given)."""
        new = [r for r in releases if release_id(r) not in self.order]
        for r in new:
            self.order[release_id(r)] = len(self.order) + max(self.order.values(), default=0) + 1
        if new:
            self.save()
        return sorted(releases, key=lambda r: self.order[release_id(r)])

    def rejected(self, release) -> str | None:
        """The reason this release was rejected before (None if it was not, or was accepted)."""
        verdict = self.verdicts.get(release_id(release))
        return None if verdict in (None, ACCEPTED) else verdict

    def record(self, release, verdict: str) -> None:
        self.verdicts[release_id(release)] = verdict
        self.save()
