"""The node's two identities, created on first use and kept in its home folder.

* ``node.key`` / ``node.pub``: the Ed25519 key that signs every delta (federation layer);
  the coordinator's registry maps the node id to ``node.pub`` (``ruvdllm-coordinator enroll
  node.pub --node-id ID``). Without a configured ``node.id`` the id is derived from the key
  as the coordinator does: ``"n-" + sha256(raw public key)[:16 hex]``.
* ``flower.key`` / ``flower.pub`` (only where ``supernode.auth_private_key`` is configured
  and missing): the EC P-384 key with which the SuperNode authenticates to the SuperLink,
  private in OpenSSH PEM and public as an OpenSSH ``ecdsa-sha2-nistp384`` line, the formats
  ``flower-supernode`` and ``flwr supernode register`` read.

Private files are written with mode 0600; an existing key is never overwritten.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import (
    generate_key,
    load_private_key,
    public_key_bytes,
    save_private_key,
    save_public_key,
)
from node_agent.config import NodeConfig

log = logging.getLogger(__name__)


def derived_node_id(key: Ed25519PrivateKey) -> str:
    """The node id the coordinator assigns to a key enrolled without ``--node-id``."""
    return "n-" + hashlib.sha256(public_key_bytes(key)).hexdigest()[:16]


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def ensure_flower_key(private_path: Path) -> Path:
    """Create an EC P-384 SuperNode auth key pair if missing; returns the public key path."""
    public_path = private_path.with_suffix(".pub")
    if private_path.exists():
        return public_path
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private_path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), 0o600)
    if not public_path.exists():
        _write(public_path, key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", 0o644)
    log.info("created SuperNode auth key %s (register %s with the SuperLink)", private_path,
             public_path)
    return public_path


@dataclass(frozen=True)
class Identity:
    """The signing key, its public file, the node id and the Flower auth public key file."""

    key: Ed25519PrivateKey
    public_path: Path
    node_id: str
    flower_public_path: Path | None


def ensure_identity(cfg: NodeConfig) -> Identity:
    """Load the node's keys, creating any that are missing; fills in a derived node id."""
    home = cfg.node.home
    home.mkdir(parents=True, exist_ok=True)
    private, public = home / "node.key", home / "node.pub"
    if private.exists():
        key = load_private_key(private)
    else:
        key = generate_key()
        save_private_key(key, private)
        log.info("created node signing key %s", private)
    if not public.exists():
        save_public_key(key, public)
    node_id = cfg.node.id or derived_node_id(key)
    flower_pub = None
    if cfg.supernode.auth_private_key is not None:
        flower_pub = ensure_flower_key(cfg.supernode.auth_private_key)
    return Identity(key, public, node_id, flower_pub)
