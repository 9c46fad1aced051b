"""Ed25519 keys, canonical bytes, signatures and replay rejection.

Nodes sign their `LoRADelta`s and the coordinator signs each `MergedAdapter`; the other
side verifies with the enrolled public key. What is signed is `canonical_bytes(message)`:

    canonical(m) = "ruvdllm/canonical/v1" 0x00 full_name(m) 0x00 body(m)
    body(m)      = for every field f of m by ascending number, except the excluded ones:
                   u32(number(f)) ‖ enc(f)
    enc: integer/enum -> 9-byte big-endian two's complement; bool -> 1 byte;
         float -> IEEE-754 binary32 big-endian; double -> binary64 big-endian;
         string (UTF-8) and bytes -> u32(length) ‖ data;
         repeated -> u32(count) ‖ enc(item)...; map -> u32(count) ‖ (enc(key) ‖ enc(value))
         by ascending key; sub-message -> presence byte ‖ body(sub).

Every field is written, defaults included, in an order fixed by the schema, so the encoding
is injective and independent of protobuf's serialiser (whose output is not canonical across
implementations). Replays are refused by `ReplayGuard` (nonce per node, rounds monotonic).
"""

import os
import re
import secrets
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from federation.errors import Reason, Rejected

NONCE_BYTES = 16
SIGNATURE_BYTES = 64
_DOMAIN = b"ruvdllm/canonical/v1\x00"
_INTEGER_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_ENUM,
}


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _scalar(field: FieldDescriptor, value: Any) -> bytes:
    if field.type in _INTEGER_TYPES:
        return int(value).to_bytes(9, "big", signed=True)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return b"\x01" if value else b"\x00"
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return struct.pack(">f", value)
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return struct.pack(">d", value)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _body(value, ())
    data = value.encode("utf-8") if field.type == FieldDescriptor.TYPE_STRING else bytes(value)
    return _u32(len(data)) + data


def _body(message: Message, exclude: Iterable[str]) -> bytes:
    descriptor: Descriptor = message.DESCRIPTOR
    out = bytearray()
    for field in sorted(descriptor.fields, key=lambda f: f.number):
        if field.name in exclude:
            continue
        out += _u32(field.number)
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            out += _u32(len(value))
            for key in sorted(value):
                out += _scalar(key_field, key) + _scalar(value_field, value[key])
        elif field.is_repeated:
            out += _u32(len(value)) + b"".join(_scalar(field, item) for item in value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            present = message.HasField(field.name)
            out += b"\x01" + _body(value, ()) if present else b"\x00"
        else:
            out += _scalar(field, value)
    return bytes(out)


def canonical_bytes(message: Message, exclude: Iterable[str] = ("signature",)) -> bytes:
    """Deterministic encoding of `message` without the top-level fields named in `exclude`."""
    return (
        _DOMAIN + message.DESCRIPTOR.full_name.encode() + b"\x00" + _body(message, tuple(exclude))
    )


def sign_message(message: Message, key: Ed25519PrivateKey) -> None:
    """Set `message.signature` to the Ed25519 signature of its canonical bytes."""
    message.signature = key.sign(canonical_bytes(message))  # type: ignore[attr-defined]


def verify_message(message: Message, public_key: Ed25519PublicKey) -> None:
    """Raise `Rejected(BAD_SIGNATURE)` unless `message.signature` signs its canonical bytes."""
    signature = bytes(message.signature)  # type: ignore[attr-defined]
    try:
        public_key.verify(signature, canonical_bytes(message))
    except InvalidSignature:
        raise Rejected(
            Reason.BAD_SIGNATURE, f"{message.DESCRIPTOR.name} signature does not verify"
        ) from None


def new_nonce() -> bytes:
    """A fresh random nonce for one upload."""
    return secrets.token_bytes(NONCE_BYTES)


def generate_key() -> Ed25519PrivateKey:
    """A new Ed25519 signing key."""
    return Ed25519PrivateKey.generate()


_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is 1-128 ASCII letters, digits, ``-`` or ``_``, else raise.

    Ids name nodes in signed messages, SQLite rows, logs and metric labels: one charset on
    both sides keeps a newline or a path from reaching any of them.
    """
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ValueError(f"node id {node_id!r} must be 1-128 ASCII letters, digits, - or _")
    return node_id


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key (as in `NodeInfo.public_key` and enrollment records)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """Parse a raw 32-byte Ed25519 public key; refuse anything else with ValueError."""
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def save_private_key(key: Ed25519PrivateKey, path: str | Path) -> None:
    """Write the key as unencrypted PKCS#8 PEM, readable by its owner only (mode 0600)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(Path(path), pem)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a key written by `save_private_key`; refuse group/world-accessible files like ssh."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"private key {path} has mode {mode:04o}; run chmod 600 {path}")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def save_public_key(key: Ed25519PrivateKey | Ed25519PublicKey, path: str | Path) -> None:
    """Write the public key as SubjectPublicKeyInfo PEM (mode 0600 like every key file)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_private(Path(path), pem)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read a public key written by `save_public_key`."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} does not hold an Ed25519 public key")
    return key


class ReplayGuard:
    """Refuse replayed uploads: a node's rounds never go back and a nonce is used once.

    Keeps, per node, the newest round it has been admitted for and the nonces seen in that
    round, so memory stays O(nodes). Call `admit` after the signature verifies (so forged
    messages cannot poison the state). A restarted coordinator rebuilds the guard by
    admitting the (node, round, nonce) records of its store again.
    """

    def __init__(self) -> None:
        self._latest: dict[str, tuple[int, set[bytes]]] = {}

    def admit(self, node_id: str, round: int, nonce: bytes) -> None:
        """Record the upload, or raise `Rejected(STALE_ROUND | REPLAYED_NONCE)`."""
        latest_round, nonces = self._latest.get(node_id, (-1, set()))
        if round < latest_round:
            raise Rejected(
                Reason.STALE_ROUND,
                f"node {node_id!r} sent round {round} after round {latest_round}",
            )
        if round == latest_round and nonce in nonces:
            raise Rejected(
                Reason.REPLAYED_NONCE, f"node {node_id!r} reused a nonce in round {round}"
            )
        if round > latest_round:
            nonces = set()
            self._latest[node_id] = (round, nonces)
        nonces.add(nonce)
