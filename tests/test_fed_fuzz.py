"""Fuzzing `decode_delta`: any bytes give a DecodedDelta or `InvalidDelta`, nothing else.

Three input families: random bytes, valid encodings with random edits (byte flips,
insertions, deletions, overwrites), and truncations of valid encodings. Each test runs
RUVDLLM_FUZZ_EXAMPLES examples (default 300, a few seconds in CI); the ≥ 10 000-input run of
docs/robustness.md is

    RUVDLLM_FUZZ_EXAMPLES=3400 python -m pytest -q tests/test_fed_fuzz.py

A per-example deadline of 10 s turns a hang into a failure (a decode takes about a
millisecond; the margin keeps a loaded CI machine from failing on scheduling delays).
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from federation import InvalidDelta, decode_delta, encode_delta, generate_key
from proto import ruvdllm_pb2 as pb

EXAMPLES = int(os.environ.get("RUVDLLM_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=10_000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _valid_encodings() -> list[bytes]:
    """Signed LoRADeltas: sparse and dense tensors, one and several banks, with metrics."""
    rng, key = np.random.default_rng(0), generate_key()
    shapes = {"a.lora_B": (24, 4), "b.lora_B": (7, 3)}
    out = []
    for density, banks in ((0.05, ("coarse", "domain", "fine")), (0.5, ("fine",)),
                           (1.0, ("domain",))):
        delta = {b: {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
                 for b in banks}
        out.append(encode_delta(delta, round=4, node_id="node-7", base_version=3,
                                example_count=12, key=key, metrics={"quality_gain": 0.1},
                                density=density))
    return out


VALID = _valid_encodings()


def decodes_cleanly(data: bytes) -> None:
    """decode_delta returns a consistent result or raises InvalidDelta; anything else fails."""
    try:
        decoded = decode_delta(data)
    except InvalidDelta:
        event("InvalidDelta")
        return
    event("decoded")
    assert decoded.size_bytes == len(data)
    shapes = {(b.bank, t.name): tuple(t.shape) for b in decoded.message.banks for t in b.tensors}
    for bank, tensors in decoded.tensors.items():
        for name, array in tensors.items():
            assert array.dtype == np.float32 and array.shape == shapes[(bank, name)]
            assert np.isfinite(array).all()


def test_valid_encodings_decode():
    for data in VALID:
        assert decode_delta(data).node_id == "node-7"


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    decodes_cleanly(data)


edit = st.tuples(st.sampled_from(["flip", "insert", "delete", "set"]),
                 st.integers(0, 10**6), st.integers(0, 255))


@FUZZ
@given(st.sampled_from(VALID), st.lists(edit, min_size=1, max_size=8))
def test_mutated_valid_encodings(valid, edits):
    data = bytearray(valid)
    for op, position, value in edits:
        i = position % (len(data) + 1)
        if op == "insert":
            data.insert(i, value)
        elif data and i < len(data):
            if op == "flip":
                data[i] ^= 1 << (value % 8)
            elif op == "delete":
                del data[i]
            else:
                data[i] = value
    decodes_cleanly(bytes(data))


@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 10**6))
def test_truncated_valid_encodings(valid, cut):
    data = valid[: cut % len(valid)]
    try:
        decode_delta(data)
    except InvalidDelta:
        return
    raise AssertionError(f"a {len(data)}-byte prefix of a {len(valid)}-byte delta decoded")


def test_overflowing_scale_is_refused() -> None:
    """Found by test_mutated_valid_encodings: one bit flip in `scale` overflowed float32."""
    message = pb.LoRADelta.FromString(VALID[0])
    message.banks[0].tensors[0].scale = 1e37  # finite, but 127 × 1e37 is not a float32
    with pytest.raises(InvalidDelta):
        decode_delta(message.SerializeToString(deterministic=True))
