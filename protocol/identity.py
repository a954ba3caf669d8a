"""A peer's persistent identity: one RSA key that signs its DHT records and, as its libp2p key, fixes its peer id.

So a reader computes a record signer's peer id from the `[owner:...]` key of its subkey (`peer_id_of`): a record
naming any other peer is a lie. The key lives in a folder (mode 0700, files 0600), by default the user's config dir.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import IslesError
from .files import atomic_write_bytes

logger = logging.getLogger(__name__)

P2P_KEY_FILE = "p2p.key"  # the signing key as a libp2p private key (protobuf), the form the p2p daemon reads
SIGNING_KEY_FILE = "signing.key"  # RSA private key (PKCS#8 PEM) that signs our DHT records
_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")


def default_identity_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("isles")) / "identity"


@dataclass(frozen=True)
class Identity:
    """Who a peer is. `folder` is None for a throwaway identity (tests, `isles status`): its libp2p key file then
    lies in a temporary folder that `forget_key_file` removes once the daemon has read it."""

    folder: Path | None
    private_key: object  # hivemind.utils.crypto.RSAPrivateKey
    key_file: Path | None = None

    @property
    def p2p_key_path(self) -> Path | None:
        return self.key_file or (None if self.folder is None else self.folder / P2P_KEY_FILE)

    def forget_key_file(self) -> None:
        if self.folder is None and self.key_file is not None:
            self.key_file.unlink(missing_ok=True)
            self.key_file.parent.rmdir()

    @property
    def public_key(self) -> bytes:
        """Our public key in the `[owner:...]` form that protects DHT subkeys."""
        from hivemind.dht.crypto import RSASignatureValidator

        raw = self.private_key.get_public_key().to_bytes()
        return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", raw)

    @property
    def owner_key(self) -> str:
        """The public key as text, the form a manifest names its owner and aggregators in (`[owner:ssh-rsa ...]`)."""
        return self.public_key.decode()

    @property
    def peer_id(self) -> str:
        """The libp2p peer id of this identity: the daemon's, since its libp2p key is the signing key."""
        return peer_id_of(self.public_key)

    def sign(self, data: bytes) -> str:
        return self.private_key.sign(data).decode()


def signer_of(subkey: object) -> bytes | None:
    """The `[owner:...]` public key a signed subkey names (hivemind's RSASignatureValidator checked the signature)."""
    if not isinstance(subkey, bytes):
        return None
    found = _OWNER_RE.findall(subkey)
    return b"[owner:" + found[0] + b"]" if len(found) == 1 else None


@functools.lru_cache(maxsize=4096)
def peer_id_of(owner_key: bytes | str) -> str:
    """The libp2p peer id of the holder of `owner_key` (libp2p's rule: sha256 multihash of the protobuf public key);
    "" for something that is not an RSA key."""
    import hashlib

    import multihash
    from cryptography.hazmat.primitives import serialization
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPublicKey

    raw = owner_key.encode() if isinstance(owner_key, str) else owner_key
    match = _OWNER_RE.fullmatch(raw)
    try:
        key = RSAPublicKey.from_bytes(match.group(1) if match else raw)._public_key
    except (ValueError, TypeError, AttributeError):
        return ""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(proto).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def verify_signature(owner_key: str, data: bytes, signature: str) -> bool:
    from hivemind.utils.crypto import RSAPublicKey

    match = _OWNER_RE.fullmatch(owner_key.encode())
    try:
        return RSAPublicKey.from_bytes(match.group(1)).verify(data, signature.encode())
    except (ValueError, TypeError, AttributeError):
        return False


def parse_owner_key(text: str) -> str:
    """A public key a user typed (`ssh-rsa AAAA...`, `[owner:ssh-rsa ...]`, or an identity folder) in the
    `[owner:...]` form records are signed under; anything else is an IslesError."""
    text = text.strip()
    if Path(text).expanduser().is_dir():
        return load_identity(text).owner_key
    key = text if text.startswith("[owner:") else f"[owner:{text}]"
    if not peer_id_of(key):
        raise IslesError(
            f"{text[:40]!r} is not an RSA public key",
            hint="pass the `ssh-rsa AAAA...` key `isles aggregate` prints at start, or that peer's identity folder",
        )
    return key


def ephemeral_identity() -> Identity:
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey()
    key_file = Path(tempfile.mkdtemp(prefix="isles-id-")) / P2P_KEY_FILE
    _write_secret(key_file, _p2p_key_of(key))
    return Identity(folder=None, private_key=key, key_file=key_file)


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
    if not signing_key.exists():
        key = RSAPrivateKey()
        pem = key._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_secret(signing_key, pem)
        logger.info("Created a new peer identity in %s", root)
    _check_private(signing_key)
    try:
        loaded = serialization.load_pem_private_key(signing_key.read_bytes(), password=None)
        private_key = RSAPrivateKey.__new__(RSAPrivateKey)  # wrap the loaded key; the constructor makes a new one
        private_key._private_key = loaded
        identity = Identity(folder=root, private_key=private_key)
        # The libp2p key is the signing key (older identities had two keys: their peer id changes once, here).
        wanted = _p2p_key_of(private_key)
        if not p2p_key.exists() or p2p_key.read_bytes() != wanted:
            _write_secret(p2p_key, wanted)
        _check_private(p2p_key)
        if not identity.peer_id:
            raise ValueError("the signing key is not an RSA key")
    except (ValueError, TypeError, OSError) as exc:
        raise IslesError(
            f"the identity in {root} is damaged: {exc}",
            hint=f"move {root} away to make a new identity (a new peer id), or pass --identity DIR",
        ) from None
    return identity


def _p2p_key_of(private_key) -> bytes:
    from hivemind.proto import crypto_pb2

    proto = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=private_key.to_bytes())
    return proto.SerializeToString()


def _write_secret(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o600)


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s was readable by others (mode %o); restricting it to 0600", path, mode)
        os.chmod(path, 0o600)
