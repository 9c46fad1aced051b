"""The coordinator's SQLite + safetensors state: versions, rounds, uploads, refusals, restart."""

import numpy as np
import pytest

from coordinator.adapters import ensure_initialised, initial_adapter, lora_b_layout
from coordinator.store import ADAPTERS_DIR, RoundOutcome, Store, StoreError
from federation import BANKS, decode_delta, generate_key, pack_adapter, unpack_adapter
from tests.test_coordinator_kit import LAYOUT, delta_banks, encode, make_federation


def test_default_model_layout_is_lora_b_of_every_attention_linear():
    layout = lora_b_layout("default", 8)
    assert set(layout) == set(BANKS)
    shapes = layout["coarse"].shapes
    assert len(shapes) == 8 * 4
    assert shapes["model.transformer.blocks.7.attn_out.lora_B"] == (384, 8)
    assert layout["fine"].size == 32 * 384 * 8
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        lora_b_layout("default", 8, ["nope"])


def test_initial_version_is_zero_signed_and_survives_reopening(tmp_path):
    key = generate_key()
    store = Store(tmp_path)
    assert ensure_initialised(store, LAYOUT, key) is True
    v1 = store.load_adapter(1)
    tensors = unpack_adapter(v1, key.public_key())
    assert all(not t.any() for bank in tensors.values() for t in bank.values())
    assert 0 <= v1.ffa_seed < 2**63 and (v1.round, v1.parent_version) == (0, 0)
    store.close()
    again = Store(tmp_path)
    assert ensure_initialised(again, LAYOUT, key) is False
    assert again.load_adapter(1) == v1
    other = {b: type(lay)({n: (4, 2) for n in lay.shapes}) for b, lay in LAYOUT.items()}
    with pytest.raises(StoreError, match="another layout"):
        ensure_initialised(again, other, key)


def test_versions_are_sequential_atomic_and_checked_on_load(tmp_path):
    key = generate_key()
    store = Store(tmp_path)
    v1 = initial_adapter(LAYOUT, key, ffa_seed=7)
    with pytest.raises(StoreError, match="next version must be 1"):
        store.save_version(pack_adapter({}, version=2, round=1, parent_version=1, ffa_seed=7,
                                        contributors=[], key=key))
    store.save_version(v1)
    bumped = {b: {n: np.ones(s, np.float32) for n, s in lay.shapes.items()}
              for b, lay in LAYOUT.items()}
    store.open_round(1, 1, 3, 0.0)
    v2 = pack_adapter(bumped, version=2, round=1, parent_version=1, ffa_seed=7,
                      contributors=["a"], key=key)
    store.save_version(v2, RoundOutcome(1, "merged", 3, 2, 0.1), (), {"a": 0.5})
    assert store.load_adapter(2) == v2
    assert [v.version for v in store.versions()] == [1, 2]
    assert store.rounds()[0].status == "merged" and store.reputations() == {"a": 0.5}
    files = sorted(p.name for p in (tmp_path / ADAPTERS_DIR).iterdir())
    assert len(files) == 2 and not any(f.startswith(".tmp") for f in files)
    tampered = v2.__class__()
    tampered.CopyFrom(v2)
    tampered.sha256 = b"\0" * 32
    with pytest.raises(StoreError, match="does not match its sha256"):
        store.save_version(tampered)
    row = store.version(2)
    assert row is not None
    path = tmp_path / ADAPTERS_DIR / row.file
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # last float becomes +inf
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not match the sha256"):
        store.load_adapter(2)


def test_rounds_only_go_forward_and_open_rounds_are_abandoned_on_restart(tmp_path):
    fed = make_federation(tmp_path, 1)
    fed.store.open_round(1, 1, 2, 0.0)
    assert [r.round for r in fed.store.rounds() if r.status == "open"] == [1]
    with pytest.raises(StoreError, match="not after"):
        fed.store.open_round(1, 1, 2, 0.0)
    fed.store.close()
    store = Store(fed.root)
    assert store.abandon_open_rounds() == [1]
    assert store.open_round_row() is None and store.last_round() == 1
    assert store.rounds()[0].status == "failed"
    with pytest.raises(StoreError, match="not open"):
        store.finish_round(RoundOutcome(1, "kept", 0))


def test_uploads_are_unique_by_digest_and_nonce_and_rejections_are_kept(tmp_path):
    fed = make_federation(tmp_path, 1)
    body = encode(fed, "node0", 1, 1, delta_banks(np.random.default_rng(0)), nonce=b"n" * 16)
    delta = decode_delta(body)
    assert fed.store.put_delta(delta, body) is True
    assert fed.store.put_delta(delta, body) is False
    again = decode_delta(encode(fed, "node0", 1, 1, delta_banks(np.random.default_rng(1)),
                                nonce=b"n" * 16))
    assert fed.store.put_delta(again, body) is False
    stored = fed.store.delta(delta.digest)
    assert stored is not None
    assert (stored.node_id, stored.round, stored.status, stored.body) == (
        "node0", 1, "stored", body)
    fed.store.record_rejection(round=1, node_id="node0", stage="submit",
                               reason="replayed_nonce", detail="again", digest=delta.digest)
    fed.store.close()
    (row,) = Store(fed.root).rejections(1)
    assert (row.node_id, row.stage, row.reason, row.digest) == (
        "node0", "submit", "replayed_nonce", delta.digest)


def test_enrollment_is_idempotent_and_refuses_conflicts(tmp_path):
    store = Store(tmp_path)
    key = b"k" * 32
    assert store.enroll("a", key) is True
    assert store.enroll("a", key, flower_key="ecdsa-sha2-nistp384 AAAA") is False
    assert store.nodes()[0].flower_key == "ecdsa-sha2-nistp384 AAAA"
    with pytest.raises(StoreError, match="already enrolled"):
        store.enroll("b", key)
    with pytest.raises(StoreError, match="already enrolled"):
        store.enroll("a", b"j" * 32)
    with pytest.raises(StoreError, match="32-byte"):
        store.enroll("c", b"short")
    for bad in ("", "a b", "x\ny", "../etc", "é", "n" * 129):  # log lines, labels, paths
        with pytest.raises(StoreError, match="ASCII letters, digits"):
            store.enroll(bad, b"m" * 32)
    assert [n.node_id for n in store.nodes()] == ["a"]
    assert store.node_key("a") == key and store.node_key("zz") is None
