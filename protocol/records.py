"""Every record type of isles, re-exported from its own module (protocol/record_types.py lists the per-peer ones;
the run manifest and the runs index live in protocol/record_manifest.py): `from isles.protocol.records import Claim`.

pydantic.v1 models with strict types on the `Record` base (protocol/record_base.py); readers ignore unknown fields.
"""

from __future__ import annotations

# `x as x`: explicit re-exports; each record type's home is its own module.
from .record_base import MAX_ATTEMPT as MAX_ATTEMPT
from .record_base import MAX_RECORD_BYTES as MAX_RECORD_BYTES
from .record_base import Attempt as Attempt
from .record_base import looks_like_peer_id as looks_like_peer_id
from .record_base import parse_record as parse_record
from .record_checkpoint import CheckpointPointer as CheckpointPointer
from .record_claim import Claim as Claim
from .record_claim import FencingToken as FencingToken
from .record_ensemble import Ensemble as Ensemble
from .record_manifest import MAX_AGGREGATORS as MAX_AGGREGATORS
from .record_manifest import MAX_MANIFEST_BYTES as MAX_MANIFEST_BYTES
from .record_manifest import ROUTER_UNIT as ROUTER_UNIT
from .record_manifest import RUN_ID_CHARS as RUN_ID_CHARS
from .record_manifest import UNHASHED as UNHASHED
from .record_manifest import EvalRecipe as EvalRecipe
from .record_manifest import ExpertRecipe as ExpertRecipe
from .record_manifest import RouterRecipe as RouterRecipe
from .record_manifest import RunIndexEntry as RunIndexEntry
from .record_manifest import RunManifest as RunManifest
from .record_manifest import ShardRef as ShardRef
from .record_manifest import TextEncoderRef as TextEncoderRef
from .record_manifest import TrainingRecipe as TrainingRecipe
from .record_manifest import VaeRef as VaeRef
from .record_manifest import compute_run_id as compute_run_id
from .record_manifest import expert_unit as expert_unit
from .record_manifest import load_manifest_json as load_manifest_json
from .record_manifest import recipe_steps as recipe_steps
from .record_manifest import signed_content as signed_content
from .record_presence import PeerPresence as PeerPresence
from .record_presence import PresenceState as PresenceState
from .record_rejection import Rejection as Rejection
from .record_release import Release as Release
