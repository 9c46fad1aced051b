"""Delta codec: top-k sparsification, int8 values, varint indices, error feedback.

For each tensor the node encodes y = Δ + e, the change Δ = trained − global plus the residual
e it carried from earlier rounds (error feedback: Seide et al. 2014; Stich et al. 2018;
Karimireddy et al. 2019):

    K  = indices of the k = max(1, ceil(density · size)) largest |y_i|
    s  = max_{i∈K} |y_i| / 127,   q_i = rint(y_i / s) ∈ [−127, 127]
    ŷ_i = s · q_i for i ∈ K, 0 elsewhere;    e ← y − ŷ

so |ŷ_i − y_i| ≤ s/2 on K and |y_i| ≤ min_K |y| off K, and Σ_rounds ŷ = Σ_rounds Δ + e_0 − e_T:
what is dropped is delayed, not lost. Indices are sent as LEB128 varints of the gaps between
ascending positions (one byte per gap below 128, i.e. at densities above ~1%); at density 1
the indices are omitted. The wire format is the protobuf `LoRADelta`, signed by the node.
"""

import hashlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError
from safetensors.numpy import load_file, save_file

from federation.errors import InvalidDelta
from federation.signing import (
    NONCE_BYTES,
    SIGNATURE_BYTES,
    check_node_id,
    new_nonce,
    sign_message,
)
from proto import ruvdllm_pb2 as pb

logger = logging.getLogger(__name__)

DEFAULT_DENSITY = 0.05
MAX_DELTA_BYTES = 256 << 20
MAX_TENSOR_ELEMENTS = 1 << 28
_MAX_VARINT_BYTES = 5


class ErrorFeedback:
    """The node's residual e per tensor (key "bank/name"), persisted as safetensors."""

    def __init__(self, residual: Mapping[str, np.ndarray] | None = None) -> None:
        self.residual: dict[str, np.ndarray] = {
            k: np.asarray(v, np.float32) for k, v in (residual or {}).items()
        }

    def save(self, path: str | Path) -> None:
        """Write the residual atomically (temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.residual, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "ErrorFeedback":
        """Read a residual written by `save`; a missing file means an empty residual."""
        path = Path(path)
        return cls(load_file(str(path)) if path.exists() else None)


@dataclass(frozen=True)
class DecodedDelta:
    """A parsed, structurally valid LoRADelta (signature not yet verified: `message`)."""

    message: pb.LoRADelta
    round: int
    node_id: str
    base_version: int
    example_count: int
    metrics: dict[str, float]
    nonce: bytes
    tensors: dict[str, dict[str, np.ndarray]]
    size_bytes: int
    digest: bytes


def _varints(values: np.ndarray) -> bytes:
    """LEB128-encode non-negative integers below 2**35."""
    v = values.astype(np.uint64)
    shifts = np.arange(_MAX_VARINT_BYTES, dtype=np.uint64) * np.uint64(7)
    groups = (v[:, None] >> shifts) & np.uint64(0x7F)
    length = 1 + np.sum(v[:, None] >= (np.uint64(1) << shifts[1:]), axis=1)
    position = np.arange(_MAX_VARINT_BYTES)
    groups |= np.where(position < (length - 1)[:, None], np.uint64(0x80), np.uint64(0))
    return groups[position < length[:, None]].astype(np.uint8).tobytes()


def _unvarints(data: bytes, count: int) -> np.ndarray:
    """Decode exactly `count` LEB128 integers that fill `data`; InvalidDelta otherwise."""
    b = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if count == 0 or len(ends) != count or ends[-1] != len(b) - 1:
        raise InvalidDelta(f"indices hold {len(ends)} complete varints, expected {count}")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT_BYTES:
        raise InvalidDelta("index varint longer than 5 bytes")
    shifts = (np.arange(len(b)) - np.repeat(starts, lengths)).astype(np.uint64) * np.uint64(7)
    return np.add.reduceat((b & 0x7F).astype(np.uint64) << shifts, starts)


def compress_tensor(name: str, y: np.ndarray, density: float) -> pb.TensorDelta:
    """Top-k + int8 encoding of one tensor (see the module docstring)."""
    flat = np.asarray(y, dtype=np.float64).ravel()
    k = max(1, math.ceil(density * flat.size))
    if k >= flat.size:
        kept = np.arange(flat.size)
    else:
        kept = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
    peak = float(np.max(np.abs(flat[kept])))
    scale = np.float32(peak / 127.0)
    q = np.clip(np.rint(flat[kept] / scale), -127, 127) if scale > 0 else np.zeros(len(kept))
    gaps = np.diff(kept, prepend=-1) - 1
    return pb.TensorDelta(
        name=name,
        shape=list(np.shape(y)),
        indices=b"" if k >= flat.size else _varints(gaps),
        values=q.astype(np.int8).tobytes(),
        scale=float(scale),
    )


_MAX_SCALE = float(np.finfo(np.float32).max) / 127.0  # larger: 127 x scale overflows float32


def decompress_tensor(t: pb.TensorDelta) -> np.ndarray:
    """Dense float32 tensor of a TensorDelta; InvalidDelta if the fields disagree."""
    shape = tuple(int(s) for s in t.shape)
    if not shape or min(shape) < 1 or math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise InvalidDelta(f"tensor {t.name!r} has invalid shape {shape}")
    size = math.prod(shape)
    if not 0.0 <= t.scale <= _MAX_SCALE:  # also refuses NaN
        raise InvalidDelta(f"tensor {t.name!r} has invalid scale {t.scale}: a delta's scale "
                           f"must lie in [0, {_MAX_SCALE:.3g}] so that 127 x scale is a float32")
    q = np.frombuffer(t.values, dtype=np.int8)
    if (q == -128).any():
        raise InvalidDelta(f"tensor {t.name!r} has an int8 value outside [-127, 127]")
    dense = np.zeros(size, dtype=np.float32)
    if not t.indices:
        if len(q) != size:
            raise InvalidDelta(f"dense tensor {t.name!r} has {len(q)} values for {size} elements")
        dense[:] = q * np.float32(t.scale)
    else:
        positions = np.cumsum(_unvarints(t.indices, len(q)) + np.uint64(1)) - np.uint64(1)
        if positions[-1] >= size:
            raise InvalidDelta(f"tensor {t.name!r} has an index beyond its {size} elements")
        dense[positions.astype(np.int64)] = q * np.float32(t.scale)
    return dense.reshape(shape)


def encode_delta(
    banks: Mapping[str, Mapping[str, np.ndarray]],
    *,
    round: int,
    node_id: str,
    base_version: int,
    example_count: int,
    key: Ed25519PrivateKey,
    metrics: Mapping[str, float] | None = None,
    density: float = DEFAULT_DENSITY,
    feedback: ErrorFeedback | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Compress and sign per-bank deltas (trained − global) into LoRADelta bytes.

    With `feedback`, each tensor's residual is added before compression and replaced by
    what compression dropped; the caller persists it with `feedback.save`.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    check_node_id(node_id)
    if nonce is not None and len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    message = pb.LoRADelta(
        round=round,
        node_id=node_id,
        base_version=base_version,
        example_count=example_count,
        metrics=dict(metrics or {}),
        nonce=nonce if nonce is not None else new_nonce(),
    )
    if not banks or not all(banks.values()) or "" in banks:
        raise ValueError("a delta needs at least one named bank, each with at least one tensor")
    residual = {}
    for bank in sorted(banks):
        bank_msg = message.banks.add(bank=bank)
        for name in sorted(banks[bank]):
            y = np.asarray(banks[bank][name], dtype=np.float32)
            if not name or y.ndim == 0 or y.size == 0 or not np.isfinite(y).all():
                raise ValueError(f"delta {bank}/{name!r} must be a named, non-empty, finite array")
            key_name = f"{bank}/{name}"
            if feedback is not None and key_name in feedback.residual:
                if feedback.residual[key_name].shape != y.shape:
                    raise ValueError(
                        f"residual of {key_name} has shape "
                        f"{feedback.residual[key_name].shape}, the delta {y.shape}"
                    )
                y = y + feedback.residual[key_name]
            t = compress_tensor(name, y, density)
            residual[key_name] = y - decompress_tensor(t)
            bank_msg.tensors.append(t)
    if feedback is not None:
        feedback.residual.update(residual)
    sign_message(message, key)
    data = message.SerializeToString(deterministic=True)
    dense = sum(np.size(a) for tensors in banks.values() for a in tensors.values()) * 4
    logger.info(
        "encoded delta round=%d node=%s: %d bytes (%.1fx below %d fp32 bytes)",
        round,
        node_id,
        len(data),
        dense / len(data),
        dense,
    )
    return data


def _tensors(message: pb.LoRADelta) -> dict[str, dict[str, np.ndarray]]:
    banks = [b.bank for b in message.banks]
    if banks != sorted(set(banks)) or "" in banks:
        raise InvalidDelta(f"bank names must be unique, non-empty and sorted, got {banks}")
    out: dict[str, dict[str, np.ndarray]] = {}
    for bank in message.banks:
        names = [t.name for t in bank.tensors]
        if not names or names != sorted(set(names)) or "" in names:
            raise InvalidDelta(
                f"bank {bank.bank!r}: tensor names must be unique, non-empty and sorted"
            )
        out[bank.bank] = {t.name: decompress_tensor(t) for t in bank.tensors}
    return out


def decode_delta(data: bytes) -> DecodedDelta:
    """Parse LoRADelta bytes; raise InvalidDelta (and nothing else) for anything malformed.

    The bytes must be exactly protobuf's deterministic serialisation of what they parse to:
    unknown fields and alternative encodings are refused, so the signed content is the whole
    content. The signature is checked separately (`signing.verify_message`).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidDelta(f"a delta is bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data or len(data) > MAX_DELTA_BYTES:
        raise InvalidDelta(f"delta size {len(data)} outside (0, {MAX_DELTA_BYTES}] bytes")
    try:
        message = pb.LoRADelta.FromString(data)
    except (DecodeError, ValueError, TypeError) as exc:
        raise InvalidDelta(f"not a LoRADelta: {exc}") from None
    if message.SerializeToString(deterministic=True) != data:
        raise InvalidDelta(
            "not the canonical serialisation of a LoRADelta (unknown or reordered fields)"
        )
    if not message.node_id:
        raise InvalidDelta("node_id is empty")
    if len(message.nonce) != NONCE_BYTES or len(message.signature) != SIGNATURE_BYTES:
        raise InvalidDelta(f"nonce must be {NONCE_BYTES} bytes and signature {SIGNATURE_BYTES}")
    if not message.banks:
        raise InvalidDelta("delta holds no banks")
    m = message
    return DecodedDelta(
        m,
        m.round,
        m.node_id,
        m.base_version,
        m.example_count,
        dict(m.metrics),
        bytes(m.nonce),
        _tensors(m),
        len(data),
        hashlib.sha256(data).digest(),
    )
