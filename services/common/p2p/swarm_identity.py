"""Stable libp2p identities for a private Petals swarm, derived from one secret seed.

A multiaddr that peers bootstrap from (``/dns4/<host>/tcp/31337/p2p/<peer id>``) names the
server's peer id, which is the multihash of its public key: it is known only once the server has
a key. The Helm chart generates one random seed per release (a Secret, kept across upgrades) and
mounts it into the swarm servers and the inference replicas. From that seed every process derives
the same Ed25519 key for a label (the model's name): the bootstrap server writes it as its
``--identity_path`` file, everyone else computes its peer id. No multiaddr is copied by hand.

Syntax understood by ``python -m services.swarm.serve`` and the inference service's
INITIAL_PEERS: ``--identity_path derived:<label>`` and ``.../p2p/derived:<label>``.

The file format is go-libp2p's marshalled private key (a ``PrivateKey`` protobuf: type Ed25519,
data = 32-byte seed + 32-byte public key), which the p2pd daemon reads with ``-id``. The peer id
of an Ed25519 key is the identity multihash of its marshalled public key (base58: ``12D3KooW...``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

DERIVED = "derived:"
_LABEL = r"[A-Za-z0-9._-]{1,128}"
_DERIVED_PEER = re.compile(rf"/p2p/{DERIVED}(?P<label>{_LABEL})$")
_KEY_TYPE_ED25519 = 1
_CONTEXT = b"petals-chat swarm identity v1\x00"
MIN_SEED_BYTES = 16


class IdentityError(ValueError):
    """A seed that is missing or too short, or a label that is not allowed."""


def read_seed(path: str | Path) -> bytes:
    """The seed in ``path`` (surrounding whitespace removed); at least 16 bytes."""
    try:
        seed = Path(path).read_bytes().strip()
    except OSError as error:
        raise IdentityError(f"cannot read the swarm identity seed {path}: {error.strerror}") from None
    if len(seed) < MIN_SEED_BYTES:
        raise IdentityError(f"the swarm identity seed {path} has {len(seed)} bytes, needs at least {MIN_SEED_BYTES}")
    return seed


def _private_bytes(seed: bytes, label: str) -> bytes:
    if not re.fullmatch(_LABEL, label):
        raise IdentityError(f"identity label must be 1-128 letters, digits or '._-', got {label!r}")
    return hmac.new(seed, _CONTEXT + label.encode(), hashlib.sha256).digest()


def _public_bytes(private: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _protobuf_key(data: bytes) -> bytes:
    """``{key_type: Ed25519, data: data}`` in protobuf's wire format (fields 1 varint, 2 bytes)."""
    assert len(data) < 128
    return bytes([0x08, _KEY_TYPE_ED25519, 0x12, len(data)]) + data


def identity_file_bytes(seed: bytes, label: str) -> bytes:
    """The private key file of ``label``'s identity (what ``--identity_path`` points to)."""
    private = _private_bytes(seed, label)
    return _protobuf_key(private + _public_bytes(private))


def peer_id(seed: bytes, label: str) -> str:
    """The base58 peer id of ``label``'s identity."""
    import base58

    public_key = _protobuf_key(_public_bytes(_private_bytes(seed, label)))
    return base58.b58encode(bytes([0x00, len(public_key)]) + public_key).decode()


def is_derived(value: str) -> bool:
    """Whether a multiaddr or identity path uses the ``derived:`` syntax."""
    return value.startswith(DERIVED) or _DERIVED_PEER.search(value) is not None


def resolve_multiaddr(addr: str, seed: bytes | None) -> str:
    """``addr`` with a trailing ``/p2p/derived:<label>`` replaced by that identity's peer id."""
    match = _DERIVED_PEER.search(addr)
    if match is None:
        if DERIVED in addr:
            raise IdentityError(f"a derived peer must end the multiaddr as /p2p/{DERIVED}<label>, got {addr!r}")
        return addr
    if seed is None:
        raise IdentityError(f"{addr} names a derived peer id: SWARM_SEED_FILE must point to the swarm's seed")
    return addr[: match.start()] + "/p2p/" + peer_id(seed, match["label"])
