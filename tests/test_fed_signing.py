import os
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import (
    InvalidDelta,
    Reason,
    Rejected,
    ReplayGuard,
    canonical_bytes,
    decode_delta,
    encode_delta,
    generate_key,
    load_private_key,
    load_public_key,
    pack_adapter,
    public_key_bytes,
    public_key_from_bytes,
    save_private_key,
    save_public_key,
    unpack_adapter,
    verify_message,
)
from proto import ruvdllm_pb2 as pb

KEY = generate_key()
DELTA = encode_delta(
    {"fine": {"b": np.linspace(-1, 1, 40, dtype=np.float32)}, "coarse": {"b": np.ones((4, 2))}},
    round=5,
    node_id="node-a",
    base_version=4,
    example_count=9,
    key=KEY,
    metrics={"loss": 1.5},
    density=0.25,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(DELTA) - 1), st.integers(1, 255))
def test_any_flipped_byte_breaks_the_signature(position, mask):
    tampered = bytearray(DELTA)
    tampered[position] ^= mask
    with pytest.raises((InvalidDelta, Rejected)):
        verify_message(decode_delta(bytes(tampered)).message, KEY.public_key())


def test_valid_signature_verifies_and_other_key_does_not():
    message = decode_delta(DELTA).message
    verify_message(message, KEY.public_key())
    with pytest.raises(Rejected) as info:
        verify_message(message, generate_key().public_key())
    assert info.value.reason == Reason.BAD_SIGNATURE


def test_canonical_bytes_ignore_field_order_and_cover_every_field():
    a = pb.LoRADelta(node_id="n", metrics={"a": 1.0, "b": 2.0})
    b = pb.LoRADelta(metrics={"b": 2.0, "a": 1.0}, node_id="n")
    assert canonical_bytes(a) == canonical_bytes(b)
    base = canonical_bytes(a)
    for change in (
        {"round": 1},
        {"nonce": b"x"},
        {"metrics": {"a": 1.0, "b": 2.5}},
        {"example_count": 2},
    ):
        assert (
            canonical_bytes(
                pb.LoRADelta(**{"node_id": "n", "metrics": {"a": 1.0, "b": 2.0}, **change})
            )
            != base
        )
    assert (
        canonical_bytes(pb.LoRADelta(node_id="n", metrics={"a": 1.0, "b": 2.0}, signature=b"s"))
        == base
    )
    # the same field values in another message type sign differently (domain separation)
    assert canonical_bytes(pb.NodeInfo(node_id="n")) != canonical_bytes(pb.LoRADelta(node_id="n"))


def test_key_files_are_private_and_round_trip(tmp_path):
    save_private_key(KEY, tmp_path / "node.key")
    save_public_key(KEY, tmp_path / "node.pub")
    for name in ("node.key", "node.pub"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    loaded = load_private_key(tmp_path / "node.key")
    assert (
        public_key_bytes(loaded)
        == public_key_bytes(KEY)
        == public_key_bytes(load_public_key(tmp_path / "node.pub"))
    )
    os.chmod(tmp_path / "node.key", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_private_key(tmp_path / "node.key")
    assert public_key_bytes(public_key_from_bytes(public_key_bytes(KEY))) == public_key_bytes(KEY)
    with pytest.raises(ValueError, match="32 bytes"):
        public_key_from_bytes(b"short")


def test_replay_guard():
    guard = ReplayGuard()
    guard.admit("a", 3, b"n1")
    guard.admit("a", 3, b"n2")
    guard.admit("b", 3, b"n1")
    with pytest.raises(Rejected) as replay:
        guard.admit("a", 3, b"n1")
    assert replay.value.reason == Reason.REPLAYED_NONCE
    guard.admit("a", 4, b"n1")
    with pytest.raises(Rejected) as stale:
        guard.admit("a", 3, b"n9")
    assert stale.value.reason == Reason.STALE_ROUND


def test_merged_adapter_signed_by_coordinator_and_verified_by_nodes():
    coordinator = generate_key()
    banks = {"fine": {"b": np.arange(6, dtype=np.float32).reshape(3, 2)}}
    adapter = pack_adapter(
        banks,
        version=7,
        round=6,
        parent_version=6,
        ffa_seed=42,
        contributors=["b", "a"],
        key=coordinator,
    )
    assert list(adapter.contributors) == ["a", "b"] and len(adapter.sha256) == 32
    received = pb.MergedAdapter.FromString(adapter.SerializeToString())
    np.testing.assert_array_equal(
        unpack_adapter(received, coordinator.public_key())["fine"]["b"], banks["fine"]["b"]
    )
    with pytest.raises(Rejected) as wrong_key:
        unpack_adapter(received, KEY.public_key())
    assert wrong_key.value.reason == Reason.BAD_SIGNATURE
    received.banks[0].tensors[0].data = np.zeros(6, np.float32).tobytes()
    with pytest.raises(Rejected):
        unpack_adapter(received, coordinator.public_key())
