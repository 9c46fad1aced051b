"""Merged adapter versions: the coordinator packs and signs them, nodes verify and unpack.

A `MergedAdapter` carries the dense merged tensors of every bank (float32, little-endian),
the FFA-LoRA seed from which nodes derive the frozen A matrices (Sun et al. 2024), and two
integrity fields:

    sha256    = SHA-256(canonical_bytes(adapter without sha256 and signature))
    signature = Ed25519_coordinator(canonical_bytes(adapter without signature))

so stores address a version by content and nodes accept only what the coordinator signed.
"""

import hashlib
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation.errors import Reason, Rejected
from federation.signing import canonical_bytes, sign_message, verify_message
from proto import ruvdllm_pb2 as pb


def adapter_digest(adapter: pb.MergedAdapter) -> bytes:
    """SHA-256 content address of an adapter (independent of `sha256` and `signature`)."""
    return hashlib.sha256(canonical_bytes(adapter, exclude=("sha256", "signature"))).digest()


def pack_adapter(
    banks: Mapping[str, Mapping[str, np.ndarray]],
    *,
    version: int,
    round: int,
    parent_version: int,
    ffa_seed: int,
    contributors: Sequence[str],
    key: Ed25519PrivateKey,
    created_unix: float | None = None,
) -> pb.MergedAdapter:
    """Build, hash and sign a MergedAdapter from per-bank dense tensors."""
    adapter = pb.MergedAdapter(
        version=version,
        round=round,
        parent_version=parent_version,
        ffa_seed=ffa_seed,
        contributors=sorted(contributors),
        created_unix=time.time() if created_unix is None else created_unix,
    )
    for bank in sorted(banks):
        bank_msg = adapter.banks.add(bank=bank)
        for name in sorted(banks[bank]):
            array = np.asarray(banks[bank][name], dtype="<f4")
            if array.ndim == 0 or not np.isfinite(array).all():
                raise ValueError(
                    f"adapter tensor {bank}/{name} must be a finite array with a shape"
                )
            bank_msg.tensors.add(name=name, shape=list(array.shape), data=array.tobytes())
    adapter.sha256 = adapter_digest(adapter)
    sign_message(adapter, key)
    return adapter


def unpack_adapter(
    adapter: pb.MergedAdapter, public_key: Ed25519PublicKey
) -> dict[str, dict[str, np.ndarray]]:
    """Verify digest and coordinator signature, then return {bank: {name: float32 array}}.

    Raises `Rejected` with BAD_DIGEST, BAD_SIGNATURE or MALFORMED.
    """
    verify_message(adapter, public_key)
    if adapter.sha256 != adapter_digest(adapter):
        raise Rejected(
            Reason.BAD_DIGEST, f"adapter version {adapter.version} does not match its sha256"
        )
    out: dict[str, dict[str, np.ndarray]] = {}
    for bank in adapter.banks:
        tensors = out.setdefault(bank.bank, {})
        for t in bank.tensors:
            shape = tuple(int(s) for s in t.shape)
            if not shape or len(t.data) != 4 * math.prod(shape):
                raise Rejected(
                    Reason.MALFORMED,
                    f"tensor {bank.bank}/{t.name} holds {len(t.data)} bytes for shape {shape}",
                )
            tensors[t.name] = np.frombuffer(t.data, dtype="<f4").reshape(shape).astype(np.float32)
    return out
