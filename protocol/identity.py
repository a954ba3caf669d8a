"""A peer's persistent identity: its libp2p key (fixes the peer id) and its RSA signing key (owns its DHT subkeys).

Both live in one folder (mode 0700, files 0600), by default under the user's config dir, so a restarted peer keeps
its peer id and can still renew and withdraw its own claims. Without a folder, a throwaway identity is made.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import IslesError
from .files import atomic_write_bytes

logger = logging.getLogger(__name__)

P2P_KEY_FILE = "p2p.key"  # libp2p private key (protobuf), the form the p2p daemon reads
SIGNING_KEY_FILE = "signing.key"  # RSA private key (PKCS#8 PEM) that signs our DHT records


def default_identity_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("isles")) / "identity"


@dataclass(frozen=True)
class Identity:
    """Who a peer is. `folder` is None for a throwaway identity (tests, `isles status`)."""

    folder: Path | None
    private_key: object  # hivemind.utils.crypto.RSAPrivateKey

    @property
    def p2p_key_path(self) -> Path | None:
        return None if self.folder is None else self.folder / P2P_KEY_FILE

    @property
    def public_key(self) -> bytes:
        """Our public key in the `[owner:...]` form that protects DHT subkeys."""
        from hivemind.dht.crypto import RSASignatureValidator

        raw = self.private_key.get_public_key().to_bytes()
        return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", raw)

    @property
    def peer_id(self) -> str | None:
        """The libp2p peer id this identity will have (None for a throwaway identity: the daemon picks one)."""
        if self.folder is None:
            return None
        from hivemind.p2p import PeerID

        return PeerID.from_identity(self.p2p_key_path.read_bytes()).to_base58()


def ephemeral_identity() -> Identity:
    from hivemind.utils.crypto import RSAPrivateKey

    return Identity(folder=None, private_key=RSAPrivateKey())


def load_identity(folder: str | os.PathLike | None = None) -> Identity:
    """Load the identity in `folder` (default: the user's config dir), creating its keys the first time."""
    from cryptography.hazmat.primitives import serialization
    from hivemind.utils.crypto import RSAPrivateKey

    root = Path(folder).expanduser() if folder is not None else default_identity_dir()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IslesError(f"cannot create the identity folder {root}: {exc}", hint="pass --identity DIR") from None
    p2p_key, signing_key = root / P2P_KEY_FILE, root / SIGNING_KEY_FILE
    if not p2p_key.exists():
        _write_secret(p2p_key, _new_p2p_key())
        logger.info("Created a new peer identity in %s", root)
    if not signing_key.exists():
        key = RSAPrivateKey()
        pem = key._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_secret(signing_key, pem)
    for path in (p2p_key, signing_key):
        _check_private(path)
    try:
        loaded = serialization.load_pem_private_key(signing_key.read_bytes(), password=None)
        private_key = RSAPrivateKey.__new__(RSAPrivateKey)  # wrap the loaded key; the constructor makes a new one
        private_key._private_key = loaded
        identity = Identity(folder=root, private_key=private_key)
        identity.peer_id  # noqa: B018 (parses the libp2p key: fail here, not inside the daemon)
    except (ValueError, TypeError, OSError) as exc:
        raise IslesError(
            f"the identity in {root} is damaged: {exc}",
            hint=f"move {root} away to make a new identity (a new peer id), or pass --identity DIR",
        ) from None
    return identity


def _new_p2p_key() -> bytes:
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    proto = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes())
    return proto.SerializeToString()


def _write_secret(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o600)


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s was readable by others (mode %o); restricting it to 0600", path, mode)
        os.chmod(path, 0o600)
