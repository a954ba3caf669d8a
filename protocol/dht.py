"""Open a hivemind DHT with isles' validators attached: every record schema-checked on store and on read, and signed.

`open_dht(DHTConfig(...))` is the one way any isles command joins the swarm. A run's schema is registered with
`node.register_run(manifest)` once its units are known; until then that run's keys are stored unchecked.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import pydantic.v1 as pydantic

from . import keys, record_manifest
from .errors import IslesError
from .identity import Identity, ephemeral_identity, load_identity
from .record_manifest import RunManifest
from .record_types import RUN_RECORDS

logger = logging.getLogger(__name__)
DEFAULT_PORT = 31337
SCAN_BEAM = 5  # hivemind stores each value on the 5 nodes nearest its key (num_replicas)


@dataclass(frozen=True)
class DHTConfig:
    """How to join the swarm. `identity_dir` None means a throwaway identity (a new peer id every time)."""

    initial_peers: tuple[str, ...] = ()
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    client_mode: bool = False  # outbound only: for peers behind NAT, and for readers such as `isles status`
    identity_dir: Path | None = None
    startup_timeout: float = 30.0  # the p2p daemon and the first contact with the initial peers
    wait_timeout: float = 5.0  # one DHT request


def parse_multiaddr(text: str, need_peer_id: bool = True) -> str:
    """Check one multiaddr typed by a user; an unparseable one is an IslesError saying what one looks like."""
    example = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... (copy it from the line `isles bootstrap` prints)"
    text = text.strip()
    # Cheap checks first: importing hivemind takes seconds, a typo should not.
    if not text.startswith("/"):
        raise IslesError(
            f"cannot parse the multiaddr {text!r}: it must begin with /", hint=f"a peer address looks like {example}"
        )
    if need_peer_id and "/p2p/" not in text:
        raise IslesError(f"the multiaddr {text!r} has no /p2p/<peer id> part", hint=f"use the full address: {example}")
    from hivemind.utils.multiaddr import Multiaddr

    try:
        maddr = Multiaddr(text)
    except Exception as exc:  # the multiaddr library raises several unrelated types
        raise IslesError(
            f"cannot parse the multiaddr {text!r}: {exc}", hint=f"a peer address looks like {example}"
        ) from None
    return str(maddr)


def _run_schema(run_id: str, units: tuple[str, ...]) -> type[pydantic.BaseModel]:
    """A pydantic model whose fields are the run's key names (hivemind's SchemaValidator maps key -> field)."""
    from hivemind.dht.schema import BytesWithPublicKey

    def signed(record: type) -> object:
        return dict[BytesWithPublicKey, record] | None

    annotations, validators = record_manifest.schema_fields(run_id)
    for kind in RUN_RECORDS:  # the record types (protocol/record_types.py), each subkey signed by its writer
        if not kind.per_unit:
            annotations[kind.field_name()] = signed(kind.model)
    for unit in units:
        for kind in RUN_RECORDS:
            if kind.per_unit:
                annotations[kind.field_name(unit)] = signed(kind.model)

    namespace = {
        "__annotations__": annotations,
        "Config": type("Config", (), {"extra": pydantic.Extra.forbid}),
        **validators,
        **{name: None for name in annotations},
    }
    return type(f"IslesRun_{run_id}", (pydantic.BaseModel,), namespace)


def _schema_validator_class():
    from hivemind.dht.schema import SchemaValidator

    class RunSchemaValidator(SchemaValidator):
        """The schema of one run; pickles as its recipe, since its model class is built at run time."""

        def __init__(self, run_id: str, units: tuple[str, ...]):
            self.run_id, self.units = run_id, tuple(units)
            super().__init__(_run_schema(run_id, self.units), allow_extra_keys=True, prefix=keys.run_prefix(run_id))

        def __reduce__(self):
            return make_run_validator, (self.run_id, self.units)

    return RunSchemaValidator


def make_run_validator(run_id: str, units: tuple[str, ...]):
    return _schema_validator_class()(run_id, units)


async def _add_validators(_dht, node, validators) -> None:
    node.protocol.record_validator.extend(validators)


async def _scan(_dht, node, keys: list[str]) -> dict:
    return await node.get_many(keys, sufficient_expiration_time=float("inf"), beam_size=SCAN_BEAM)


async def _count_peers(_dht, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


class DHTNode:
    """A running DHT peer with its identity; `dht` is the hivemind.DHT (background process) for raw access."""

    def __init__(self, dht, identity: Identity, config: DHTConfig):
        self.dht, self.identity, self.config = dht, identity, config
        self.peer_id: str = dht.peer_id.to_base58()
        self.manifests: dict[str, RunManifest] = {}  # the runs registered: their manifests (the run authority)
        # hivemind.DHT talks to its process over one pipe, which is not thread-safe: heartbeat threads and the main
        # loop share this peer, so requests are sent under a lock and awaited outside it.
        self._send_lock = threading.Lock()

    def store(self, key: str, value, expiration_time: float, subkey=None) -> bool:
        with self._send_lock:
            future = self.dht.store(key, value, expiration_time, subkey=subkey, return_future=True)
        return bool(future.result())

    def get(self, key: str, latest: bool = True):
        with self._send_lock:
            future = self.dht.get(key, latest=latest, return_future=True)
        return future.result()

    def scan(self, keys: list[str]) -> dict:
        """The latest value of each key as found on the nodes nearest to it, in one traversal of the DHT with a beam
        of `SCAN_BEAM` nodes (hivemind's reads use 20): a cheap look at many keys, for choices that a full `get`
        confirms before anything depends on them (which unit to claim)."""
        from functools import partial

        return self.run_coroutine(partial(_scan, keys=list(keys)))

    def run_coroutine(self, coro):
        with self._send_lock:
            future = self.dht.run_coroutine(coro, return_future=True)
        return future.result()

    def register_run(self, manifest: RunManifest) -> None:
        """Check this run's records from now on (both what peers ask us to store and what lookups return).

        Takes the manifest, not just its id: a schema registered without the units would leave every per-unit key
        (claims, checkpoints, releases) unchecked, and a run is registered only once."""
        if manifest.run_id in self.manifests:
            return
        from functools import partial

        validator = make_run_validator(manifest.run_id, tuple(manifest.units))
        self.run_coroutine(partial(_add_validators, validators=[validator]))
        self.manifests[manifest.run_id] = manifest

    def visible_maddrs(self) -> list[str]:
        from hivemind.dht.dht import DHT

        return [str(m) for m in self.run_coroutine(DHT._get_visible_maddrs)]

    def num_peers(self) -> int:
        """Peers in our routing table (the peers we know of, not the whole swarm)."""
        return self.run_coroutine(_count_peers)

    def shutdown(self) -> None:
        with self._send_lock:
            self.dht.shutdown()
            # The DHT process ignores SIGINT/SIGTERM (see open_dht), so hivemind's "hard way" (SIGTERM) cannot stop
            # it when its daemon is already gone (a Ctrl-C reaches the whole process group): SIGKILL it instead.
            if self.dht.is_alive():
                self.dht.kill()
                self.dht.join(5)

    def __enter__(self) -> DHTNode:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def open_dht(config: DHTConfig) -> DHTNode:
    """Start a DHT peer with the schema and signature validators; known failures become an IslesError."""
    import hivemind
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.schema import SchemaValidator
    from hivemind.p2p import P2PDaemonError

    _quiet_hivemind_logs()
    identity = load_identity(config.identity_dir) if config.identity_dir is not None else ephemeral_identity()
    validators = [
        SchemaValidator(record_manifest.IndexSchema, allow_extra_keys=True, prefix=keys.PREFIX),
        RSASignatureValidator(identity.private_key),
    ]
    kwargs = dict(
        initial_peers=list(config.initial_peers) or None,
        host_maddrs=list(config.host_maddrs),
        client_mode=config.client_mode,
        startup_timeout=config.startup_timeout,
        bootstrap_timeout=config.startup_timeout,
        wait_timeout=config.wait_timeout,
        # Every isles read asks for the latest value, which never stops at a cached copy: caching each result on the
        # nearest node would only add one write per read (a third of a claim race's DHT traffic).
        cache_nearest=0,
        record_validators=validators,
        identity_path=str(identity.p2p_key_path) if identity.p2p_key_path else None,
    )
    if config.announce_maddrs:
        kwargs["announce_maddrs"] = list(config.announce_maddrs)
    # The DHT process and its p2p daemon are forked now and would get a terminal's Ctrl-C or a SIGTERM sent to the
    # whole process group and die before we could withdraw our leases: they inherit both ignored (and not a handler
    # of ours, which would swallow the signal in the child); we handle them here and shut the DHT down.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    )
    try:
        dht = hivemind.DHT(start=True, **kwargs)
    except P2PDaemonError as exc:
        raise _daemon_error(exc, identity, config) from None
    except RuntimeError as exc:
        if "bootstrap failed" in str(exc) or "initial_peers" in str(exc):
            raise unreachable_error(config.initial_peers) from None
        raise
    except ValueError as exc:  # e.g. port 0 in announce_maddrs
        raise IslesError(f"cannot start the DHT: {exc}", hint="check --host-maddrs and --announce-maddrs") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        identity.forget_key_file()  # a throwaway key file: the daemon has read it (or failed to)
    node = DHTNode(dht, identity, config)
    if node.peer_id != identity.peer_id:  # readers bind records to the peer id of their signing key
        node.shutdown()
        raise IslesError(f"the p2p daemon took peer id {node.peer_id}, not {identity.peer_id} of our signing key")
    return node


def _quiet_hivemind_logs() -> None:
    """Send hivemind's logs through our handlers (it installs its own at import) and keep its INFO chatter out."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("hivemind").setLevel(logging.DEBUG if verbose else logging.WARNING)


def unreachable_error(peers: tuple[str, ...]) -> IslesError:
    shown = ", ".join(peers) if peers else "(none)"
    return IslesError(
        f"could not reach any of the peers {shown}",
        hint=(
            "check, in order:\n"
            "  1. the bootstrap node is running (`isles bootstrap` prints the address to use);\n"
            "  2. the address is copied whole, including /p2p/<peer id>, and the peer id matches the node's;\n"
            "  3. this machine can open a TCP connection to that host and port (firewall, VPN, Docker networking);\n"
            "  4. a node in Docker or behind NAT was started with --announce-maddrs set to its public address."
        ),
    )


def _daemon_error(exc: Exception, identity: Identity, config: DHTConfig) -> IslesError:
    text = str(exc)
    if "already taken" in text:
        return IslesError(
            f"the identity in {identity.folder} is already used by another running peer",
            hint="stop that peer, or give this one its own folder with --identity DIR "
            "(cloned machines or containers must not share an identity)",
        )
    if "address already in use" in text.lower():
        return IslesError(
            f"cannot listen on {' '.join(config.host_maddrs)}: the port is already in use",
            hint="stop the other node on that port, or choose another one (--port or --host-maddrs)",
        )
    if "bootstrap peers" in text:
        return unreachable_error(config.initial_peers)
    if "failed to start" in text:
        return IslesError(
            f"the p2p daemon (p2pd, hivemind's libp2p daemon) did not start in {config.startup_timeout:.0f} s",
            hint=(
                "check, in order:\n"
                f"  1. a busy machine: run again with --startup-timeout {max(120, 4 * config.startup_timeout):.0f};\n"
                "  2. the daemon runs here: `isles doctor` starts one and says what failed;\n"
                "  3. hivemind's install is whole: pip install --force-reinstall hivemind==1.1.12;\n"
                "  4. /tmp is writable and not full (the daemon's control socket lives there)."
            ),
        )
    return IslesError(f"the p2p daemon failed: {text}", hint=f"check --host-maddrs {' '.join(config.host_maddrs)}")
