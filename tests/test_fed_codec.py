import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from federation import (
    ErrorFeedback,
    InvalidDelta,
    compress_tensor,
    decode_delta,
    decompress_tensor,
    encode_delta,
    generate_key,
    verify_message,
)
from federation.codec import _unvarints, _varints

KEY = generate_key()
META = {"round": 3, "node_id": "node-a", "base_version": 2, "example_count": 17, "key": KEY}
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
tensors = arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 40)), elements=finite)
densities = st.floats(0.001, 1.0)


@given(st.lists(st.integers(0, 2**35 - 1), min_size=1, max_size=50))
def test_varints_round_trip(values):
    data = _varints(np.array(values))
    assert _unvarints(data, len(values)).tolist() == values


@given(tensors, densities)
def test_round_trip_within_quantisation_bound(x, density):
    t = compress_tensor("w", x, density)
    y = decompress_tensor(t)
    kept = y != 0
    half_step = t.scale / 2 * (1 + 1e-5) + 1e-30
    assert y.shape == x.shape
    assert np.all(np.abs(y - x)[kept] <= half_step)
    # an entry that was dropped is no larger than the smallest kept one (top-k)
    if (~kept).any() and kept.any():
        assert np.abs(x[~kept]).max() <= np.abs(x[kept]).min() + half_step


@given(tensors, densities)
def test_density_respected(x, density):
    t = compress_tensor("w", x, density)
    y = decompress_tensor(t)
    assert len(t.values) == min(x.size, max(1, int(np.ceil(density * x.size))))
    assert np.count_nonzero(y) <= len(t.values)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.02, 0.05, 0.2]))
def test_error_feedback_sum_tracks_true_sum(seed, density):
    rng = np.random.default_rng(seed)
    feedback = ErrorFeedback()
    true_sum = sent_sum = np.zeros((16, 8))
    for r in range(1, 31):
        delta = rng.normal(size=(16, 8)).astype(np.float32)
        data = encode_delta(
            {"fine": {"b": delta}}, **{**META, "round": r}, density=density, feedback=feedback
        )
        true_sum = true_sum + delta
        sent_sum = sent_sum + decode_delta(data).tensors["fine"]["b"]
        # the identity behind error feedback: what was sent plus the residual is what was meant
        np.testing.assert_allclose(sent_sum + feedback.residual["fine/b"], true_sum, atol=1e-3)
    without = np.zeros((16, 8))
    rng = np.random.default_rng(seed)
    for _ in range(30):
        without += decompress_tensor(compress_tensor("b", rng.normal(size=(16, 8)), density))
    assert np.linalg.norm(sent_sum - true_sum) < np.linalg.norm(without - true_sum)


def test_encode_decode_delta_fields_and_signature():
    rng = np.random.default_rng(0)
    banks = {
        b: {"x.lora_B": rng.normal(size=(32, 8)).astype(np.float32)} for b in ("fine", "coarse")
    }
    data = encode_delta(banks, **META, metrics={"quality_gain": 0.25}, density=0.1)
    d = decode_delta(data)
    assert (d.round, d.node_id, d.base_version, d.example_count) == (3, "node-a", 2, 17)
    assert d.metrics == {"quality_gain": 0.25} and len(d.nonce) == 16 and d.size_bytes == len(data)
    assert set(d.tensors) == {"coarse", "fine"} and d.tensors["fine"]["x.lora_B"].shape == (32, 8)
    verify_message(d.message, KEY.public_key())
    assert decode_delta(encode_delta(banks, **META)).nonce != d.nonce


def test_encode_refuses_bad_input():
    with pytest.raises(ValueError, match="density"):
        encode_delta({"fine": {"b": np.ones(4)}}, **META, density=0.0)
    with pytest.raises(ValueError, match="finite"):
        encode_delta({"fine": {"b": np.array([1.0, np.nan])}}, **META)
    with pytest.raises(ValueError, match="at least one"):
        encode_delta({"fine": {}}, **META)
    with pytest.raises(ValueError, match="nonce"):
        encode_delta({"fine": {"b": np.ones(4)}}, **META, nonce=b"short")
    with pytest.raises(ValueError, match="node id"):
        encode_delta({"fine": {"b": np.ones(4)}}, **{**META, "node_id": "a\nb"})
    with pytest.raises(ValueError, match="residual of fine/b"):
        encode_delta(
            {"fine": {"b": np.ones(4)}}, **META, feedback=ErrorFeedback({"fine/b": np.ones(5)})
        )
    feedback = ErrorFeedback({"fine/a": np.ones(3)})
    # a failed encoding leaves the residual untouched
    with pytest.raises(ValueError):
        encode_delta(
            {"fine": {"a": np.full(3, 5.0), "b": np.array([np.nan])}}, **META, feedback=feedback
        )
    np.testing.assert_array_equal(feedback.residual["fine/a"], np.ones(3))


def test_error_feedback_persists(tmp_path):
    feedback = ErrorFeedback()
    encode_delta(
        {"fine": {"b": np.arange(20, dtype=np.float32)}}, **META, density=0.1, feedback=feedback
    )
    feedback.save(tmp_path / "residual.safetensors")
    loaded = ErrorFeedback.load(tmp_path / "residual.safetensors")
    np.testing.assert_array_equal(loaded.residual["fine/b"], feedback.residual["fine/b"])
    assert ErrorFeedback.load(tmp_path / "missing.safetensors").residual == {}


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_raises_only_invalid_delta(data):
    with contextlib.suppress(InvalidDelta):
        decode_delta(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_decode_mutated_delta_raises_only_invalid_delta(data):
    valid = encode_delta(
        {"fine": {"b": np.linspace(-1, 1, 60, dtype=np.float32)}}, **META, density=0.2
    )
    mutated = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    with contextlib.suppress(InvalidDelta):
        decode_delta(bytes(mutated[:cut]) if data.draw(st.booleans()) else bytes(mutated))


@pytest.mark.parametrize("bad", [None, "text", b"", b"\xff" * 10])
def test_decode_refuses_non_deltas(bad):
    with pytest.raises(InvalidDelta):
        decode_delta(bad)
