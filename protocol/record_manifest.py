"""The run manifest (a run's data, shards and recipes, signed by its owner) and the runs index: one record type in one
home, as the others (protocol/record_types.py): schemas, keys, the checks a run's validator adds, and the accessors.

The manifest is not a per-peer record: it lives under its run's `manifest` key, one subkey (the run id), and carries
its owner's signature inside (`RunManifest.owner`, `signature`), so any peer may store or re-announce it and nobody
can alter it. The runs index (`isles_runs`) lists runs by id so `isles status` can find them.

    publish_manifest(swarm, manifest); get_manifest(swarm, run_id); list_runs(swarm)
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Literal

import pydantic.v1 as pydantic
from pydantic.v1 import StrictBool, StrictFloat, StrictStr

from . import keys
from .errors import IslesError
from .files import canonical_json
from .record_base import NonNegInt, PositiveInt, Record, _plain, dht_time, parse_record

if TYPE_CHECKING:
    from .swarm import Swarm

RUN_ID_CHARS = 16  # hex characters of sha256 kept as the run id: 64 bits, enough to never collide by accident
# The run features this isles understands. A manifest records the lowest version that trains it as its owner meant
# (`RunManifest.requires_protocol`), and a client that understands less refuses the run (client/run_access.py)
# instead of training something else: records allow fields they do not know, so an older client would otherwise
# ignore, say, a text-aware router. 1: class / text / unconditional experts, fm and ddpm; 2: text-aware routers and
# ddpm-v experts.
PROTOCOL_VERSION = 2
ROUTER_UNIT = "router"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # ~10k shards


def expert_unit(index: int) -> str:
    return f"expert-{index}"


# --- the run manifest ---------------------------------------------------------------------------------------------


class ShardRef(Record):
    """One shard of the partitioned data set, as published to the artifact store."""

    repo: StrictStr
    revision: StrictStr
    path: StrictStr
    sha256: StrictStr
    items: NonNegInt
    val_items: NonNegInt
    cluster: NonNegInt


class TrainingRecipe(Record):
    """The optimisation every claimant of a unit runs exactly, whatever its hardware: same steps, same global batch."""

    steps: PositiveInt
    global_batch: PositiveInt
    lr: StrictFloat
    warmup_steps: NonNegInt = 0
    ema_decay: StrictFloat = 0.999
    seed: NonNegInt = 0


class ExpertRecipe(TrainingRecipe):
    """How to train the expert of one shard."""

    preset: StrictStr
    objective: Literal["fm", "ddpm", "ddpm-v"] = "fm"
    channels: PositiveInt
    resolution: PositiveInt
    frames: PositiveInt | None = None  # video: frames per clip (items are [C, F, H, W]); None: images [C, H, W]
    num_classes: PositiveInt | None = None
    # What the expert is conditioned on: a class, a caption (token embeddings carried by the shard), or nothing.
    conditioning: Literal["class", "text", "none"] = "class"
    text_width: PositiveInt | None = None  # the caption embeddings' width and length (text conditioning only)
    text_length: PositiveInt | None = None
    # Labels or captions replaced by the null condition this often, so classifier-free guidance works (Paris: 0.1).
    cond_dropout: StrictFloat = 0.1
    # Random horizontal flips of the items (only where the data allows: not when captions say "left" or "right").
    hflip: StrictBool = False

    @pydantic.root_validator(skip_on_failure=True)
    def _check_conditioning(cls, values: dict) -> dict:
        kind, classes, width = values["conditioning"], values["num_classes"], values["text_width"]
        if kind == "class" and classes is None and width is None:
            values["conditioning"] = "none"  # a class recipe without classes (older manifests) is unconditional
        elif kind == "text" and (width is None or values["text_length"] is None or classes is not None):
            raise ValueError("a text-conditioned recipe needs text_width and text_length, and no num_classes")
        elif kind != "text" and width is not None:
            raise ValueError(f"a {kind}-conditioned recipe takes no text_width")
        if not 0.0 <= values["cond_dropout"] < 1.0:
            raise ValueError("cond_dropout must be in [0, 1)")
        return values


class RouterRecipe(TrainingRecipe):
    """How to train the router (a classifier of noisy inputs over the K clusters)."""

    preset: StrictStr
    # r(x_t, t, c) when the data has labels: k-means clusters mix classes, so the router must see the class asked for.
    class_conditional: StrictBool = True
    # r(x_t, t, caption) for a text run (`partition --router-text`): the router also reads the prompt's pooled
    # embedding. The papers' router does not; false keeps their design and the records of older runs.
    text_aware: StrictBool = False

    def dict(self, **kwargs) -> dict:
        # Left out while false: a manifest's run_id hashes this dict, and manifests from before text-aware routers
        # have no such key; with it, every run published until then would no longer match its own id.
        out = super().dict(**kwargs)
        if not out.get("text_aware", True):
            del out["text_aware"]
        return out

    # Train on at most this many items of each shard (None: all); the router costs a few % of the experts' FLOPs.
    items_per_shard: PositiveInt | None = None


class EvalRecipe(Record):
    """How the aggregator checks a release's quality on the shard's held-out split."""

    # A release's held-out loss must be below this fraction of an untrained model's (measured on digits: an honest
    # unet-tiny after 150 steps ~0.3, one trained on noise ~0.85); the router's cross-entropy likewise.
    max_val_loss_fraction: StrictFloat = 0.6
    max_router_loss_fraction: StrictFloat = 0.8
    # The loss a release reports may differ from the aggregator's own measurement by at most this fraction.
    val_loss_tolerance: StrictFloat = 0.1
    num_samples: NonNegInt = 0
    sample_steps: PositiveInt = 50


class TextEncoderRef(Record):
    """The transformers text encoder that embedded the captions at partition time; samplers embed prompts with it."""

    id: StrictStr  # "minilm" (the offline default), a Hub repo id, or a local folder
    revision: StrictStr | None = None
    width: PositiveInt
    max_length: PositiveInt


class VaeRef(Record):
    """The diffusers VAE whose latents the shards hold: an AutoencoderKL, z = (E(x) - shift_factor) * scaling_factor;
    or a video AutoencoderKLWan, z = (E(x) - channel_mean) / channel_std per latent channel."""

    id: StrictStr
    revision: StrictStr | None = None
    scaling_factor: StrictFloat
    shift_factor: StrictFloat = 0.0
    latent_channels: PositiveInt
    downsample: PositiveInt
    temporal_downsample: PositiveInt = 1  # video VAEs: frames per latent frame after the first (Wan 2.1: 4)
    channel_mean: list[StrictFloat] | None = None
    channel_std: list[StrictFloat] | None = None


class RunManifest(Record):
    """A run: its data, shards and recipes. `run_id` is the short sha256 of everything else, so it cannot change."""

    class Config:
        max_bytes = MAX_MANIFEST_BYTES

    run_id: StrictStr
    name: StrictStr
    dataset: StrictStr
    description: StrictStr = ""
    store: StrictStr
    shards: list[ShardRef]
    experts: list[ExpertRecipe]
    router: RouterRecipe
    eval: EvalRecipe = EvalRecipe()
    # The run authority: the owner's public key (`[owner:ssh-rsa ...]`), which signs the manifest, and the keys whose
    # ensembles and rejections count (`isles partition --aggregator KEY`; the owner's alone by default).
    owner: StrictStr
    aggregators: list[StrictStr]
    signature: StrictStr  # the owner's signature of every other field but run_id (run_id covers the same fields)
    created_time: StrictFloat = 0.0
    # A lease holder without (verified) progress for this long loses its unit: part of the run, so every reader (the
    # volunteers, the aggregator, `isles status`) judges holders alike. Longer than a shard download + a checkpoint.
    progress_timeout: StrictFloat = 900.0
    text_encoder: TextEncoderRef | None = None  # set when the experts are text-conditioned
    vae: VaeRef | None = None  # set when the shards hold latents
    requires_protocol: PositiveInt = 1  # the lowest PROTOCOL_VERSION that trains this run (set by `create`)

    def dict(self, **kwargs) -> dict:
        return _without_default_protocol(super().dict(**kwargs))

    @pydantic.root_validator(skip_on_failure=True)
    def _check_content(cls, values: dict) -> dict:
        from .identity import verify_signature

        if not values["progress_timeout"] >= 1.0:
            raise ValueError("progress_timeout must be at least 1 s")
        if not values["aggregators"] or len(values["aggregators"]) > MAX_AGGREGATORS:
            raise ValueError(f"a run names 1 to {MAX_AGGREGATORS} aggregator keys")
        if len(values["experts"]) != len(values["shards"]):
            raise ValueError(f"{len(values['shards'])} shards but {len(values['experts'])} expert recipes")
        encoder = values.get("text_encoder")
        for e in values["experts"]:
            if e.conditioning == "text" and (encoder is None or e.text_width != encoder.width):
                raise ValueError("text-conditioned experts need the manifest's text_encoder, of their text_width")
        if values["router"].text_aware and not all(e.conditioning == "text" for e in values["experts"]):
            raise ValueError("a text-aware router needs text-conditioned experts (captions to read)")
        expected = compute_run_id(hashed_content(values))
        if values["run_id"] != expected:
            raise ValueError(f"run_id {values['run_id']!r} does not match the manifest's content ({expected})")
        if not verify_signature(values["owner"], signed_content(values), values["signature"]):
            raise ValueError("the manifest is not signed by the owner it names")
        return values

    @property
    def units(self) -> list[str]:
        """The units of work: one expert per shard, then the router."""
        return [expert_unit(i) for i in range(len(self.shards))] + [ROUTER_UNIT]

    def may_aggregate(self, owner_key: bytes | None) -> bool:
        """Whether records signed by `owner_key` (a subkey's `[owner:...]`) speak for the run's aggregators."""
        return owner_key is not None and owner_key.decode(errors="replace") in self.aggregators

    @classmethod
    def create(cls, signer, aggregators: list[str] | tuple[str, ...] = (), **fields: Any) -> RunManifest:
        """Build a manifest owned and signed by `signer` (an Identity), with its run_id filled in; the aggregators
        are the owner alone unless named."""
        fields = {k: v for k, v in fields.items() if k not in (*UNHASHED, "owner")}
        fields.update(owner=signer.owner_key, aggregators=list(aggregators) or [signer.owner_key])
        needed = needed_protocol(fields.get("experts", []), fields.get("router"))
        fields["requires_protocol"] = max(fields.get("requires_protocol", 1), needed)
        draft = _plain(cls.construct(**fields).dict())  # defaults filled in, validators not run yet
        for name in UNHASHED:
            draft.pop(name, None)
        signature = signer.sign(signed_content(draft))
        return cls.parse_obj({**draft, "signature": signature, "run_id": compute_run_id(draft)})


UNHASHED = ("run_id", "signature")
MAX_AGGREGATORS = 16


def needed_protocol(experts: list, router) -> int:
    """The lowest PROTOCOL_VERSION that trains these recipes as written (see PROTOCOL_VERSION)."""
    if (router is not None and router.text_aware) or any(e.objective == "ddpm-v" for e in experts):
        return 2
    return 1


def check_protocol(manifest: RunManifest) -> None:
    """Refuse a run that needs a newer isles than this one: its recipes would be trained as something else."""
    if manifest.requires_protocol > PROTOCOL_VERSION:
        raise IslesError(
            f"run {manifest.run_id} needs isles protocol {manifest.requires_protocol}; this isles speaks "
            f"{PROTOCOL_VERSION}",
            hint="upgrade isles (pip install -U isles) and join again",
        )


def signed_content(fields: dict) -> bytes:
    """The bytes the owner signs: the manifest's canonical JSON without run_id and signature."""
    return canonical_json(hashed_content(fields))


def hashed_content(fields: dict) -> dict:
    """What run_id and the signature cover: every field but those two, as `RunManifest.dict` writes them."""
    return _plain(_without_default_protocol({k: v for k, v in fields.items() if k not in UNHASHED}))


def _without_default_protocol(fields: dict) -> dict:
    """`fields` without requires_protocol where it is 1, the version of every manifest from before the field: their
    run_id hashes a dict without it, and they must keep it."""
    if fields.get("requires_protocol") == 1:
        fields = {k: v for k, v in fields.items() if k != "requires_protocol"}
    return fields


def compute_run_id(fields_without_run_id: dict) -> str:
    return hashlib.sha256(canonical_json(fields_without_run_id)).hexdigest()[:RUN_ID_CHARS]


def load_manifest_json(text: str, source: str = "manifest") -> RunManifest:
    """Parse a manifest file (RunManifest's JSON form); any problem is an IslesError naming the field."""
    try:
        return RunManifest.parse_raw(text)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise IslesError(
            f"{source} is not a valid run manifest: {where}: {first['msg']}",
            hint="write manifests with `isles partition`, and do not edit them by hand: the run id covers every field",
        ) from None
    except ValueError as exc:
        raise IslesError(
            f"{source} is not JSON: {exc}", hint="pass the manifest.json written by `isles partition`"
        ) from None


class RunIndexEntry(Record):
    """An entry of the runs index (one subkey per run), so `isles status` can list runs without knowing their ids."""

    run_id: StrictStr
    name: StrictStr
    units: NonNegInt
    published_time: StrictFloat


def recipe_steps(manifest: RunManifest, unit: str) -> int:
    """A unit's training steps as the manifest's recipe says (never as a record says)."""
    if unit == manifest.units[-1]:
        return manifest.router.steps
    return manifest.experts[manifest.units.index(unit)].steps


# --- keys, the checks a run's schema adds, and accessors -----------------------------------------------------------

MANIFEST = "manifest"  # the run's schema field of its manifest (one subkey: the run id)
RUNS_INDEX = f"{keys.PREFIX}_runs"  # one subkey per run id: RunIndexEntry
MANIFEST_PERIOD = 3600.0  # manifests and index entries live this long unless re-announced (the bootstrap node does)


def manifest_key(run_id: str) -> str:
    return keys.run_key(run_id, MANIFEST)


class IndexSchema(pydantic.BaseModel):
    """The runs index's schema, for hivemind's SchemaValidator (protocol/dht.py)."""

    runs: dict[pydantic.StrictStr, RunIndexEntry]  # subkey: run id

    class Config:  # its own Config: SchemaValidator sets `extra = forbid` on it
        extra = pydantic.Extra.forbid


def schema_fields(run_id: str) -> tuple[dict[str, object], dict[str, object]]:
    """The manifest's field in a run's schema (protocol/dht.py) and its validator: a valid manifest of another run
    must not sit under this run's key."""

    def check_manifest(cls, value):
        for subkey, manifest in (value or {}).items():
            if subkey != run_id or manifest.run_id != run_id:
                raise ValueError(f"manifest of run {manifest.run_id} stored under run {run_id}")
        return value

    annotations = {MANIFEST: dict[pydantic.StrictStr, RunManifest] | None}  # subkey: the run id (not a dict value)
    return annotations, {"_check_manifest": pydantic.validator(MANIFEST, allow_reuse=True)(check_manifest)}


def publish_manifest(swarm: Swarm, manifest: RunManifest, expiration_period: float = MANIFEST_PERIOD) -> bool:
    """Store the manifest under its run's key and add it to the runs index; True if a peer accepted both."""
    swarm.node.register_run(manifest)
    expiration = dht_time() + expiration_period
    stored = swarm._store(manifest_key(manifest.run_id), manifest.to_value(), expiration, manifest.run_id)
    entry = RunIndexEntry(
        run_id=manifest.run_id, name=manifest.name, units=len(manifest.units), published_time=dht_time()
    )
    indexed = swarm._store(RUNS_INDEX, entry.to_value(), expiration, subkey=manifest.run_id)
    return stored and indexed


def get_manifest(swarm: Swarm, run_id: str) -> RunManifest | None:
    """The run's manifest as the DHT holds it (checked: its run id covers its content, its owner signed it), and
    registered on this peer, so the run's records are checked from now on."""
    found = swarm.node.get(manifest_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict) or run_id not in found.value:
        return None
    manifest = parse_record(RunManifest, found.value[run_id].value)
    if manifest is None or manifest.run_id != run_id:
        return None
    swarm.node.register_run(manifest)
    return manifest


def list_runs(swarm: Swarm) -> list[RunIndexEntry]:
    """The runs index, newest first; an entry squatting for longer than any node announces is dropped."""
    from .swarm import MAX_CLOCK_SKEW, MAX_ENTRIES

    found = swarm.node.get(RUNS_INDEX, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    runs, now = [], dht_time()
    for run_id, item in list(found.value.items())[:MAX_ENTRIES]:
        if item.expiration_time > now + MANIFEST_PERIOD + MAX_CLOCK_SKEW:
            continue
        entry = parse_record(RunIndexEntry, item.value)
        if entry is not None and entry.run_id == run_id:
            runs.append(entry)
    return sorted(runs, key=lambda e: (-e.published_time, e.run_id))
