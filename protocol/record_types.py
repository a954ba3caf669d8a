"""The registry of a run's record types: protocol/dht.py builds each run's schema validator from this list.

Adding a record type: write its module (schema, `RECORD = RecordType(...)`, key builder and put/get functions that
take the Swarm; protocol/witness.py or protocol/record_presence.py are short examples), import it here and add its
`RECORD` to RUN_RECORDS. Nothing else changes: keys.py, dht.py and swarm.py need no edit.
"""

from __future__ import annotations

from . import (
    record_checkpoint,
    record_claim,
    record_ensemble,
    record_presence,
    record_rejection,
    record_release,
    witness,
)
from .record_base import RecordType

RUN_RECORDS: tuple[RecordType, ...] = (
    record_presence.RECORD,  # peers
    record_ensemble.RECORD,  # ensemble
    record_rejection.RECORD,  # rejections
    witness.RECORD,  # verified_<unit>
    record_claim.RECORD,  # claims_<unit>
    record_checkpoint.RECORD,  # checkpoints_<unit>
    record_release.RECORD,  # releases_<unit>
)
