"""RuvStrategy driven through Flower's own `Strategy.start` with a duck-typed grid
(FLOWER_NOTES: no single-process SuperLink), on a real SQLite store."""

import hashlib
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message

from coordinator.reasons import RoundReason
from coordinator.store import ADAPTERS_DIR, Store
from coordinator.strategy import RuvStrategy, StrategySettings
from federation import Reason, decode_delta, generate_key, unpack_adapter
from tests.test_coordinator_kit import (
    LAYOUT,
    Answer,
    LoopbackGrid,
    delta_banks,
    encode,
    flower_identity,
    honest,
    make_federation,
    node,
    reply_for,
)


@pytest.fixture(autouse=True)
def _identity():
    flower_identity()


def settings(**kw):
    kw.setdefault("coordinator_address", "127.0.0.1:1")
    kw.setdefault("min_nodes", 1)
    kw.setdefault("quorum", 3)
    kw.setdefault("wait_nodes_s", 0.0)
    return StrategySettings(**kw)


def run(fed, grid, rounds=1, **kw):
    strategy = RuvStrategy(fed.store, fed.key, settings(**kw))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds, timeout=5.0)
    return strategy


def snapshot(fed):
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in (fed.root / ADAPTERS_DIR).iterdir()}
    return files, fed.store.versions(), fed.store.reputations()


def reasons(fed, round_):
    return sorted((r.node_id, r.reason) for r in fed.store.rejections(round_))


def test_quorum_takes_2f_plus_1_for_an_explicit_f_only():
    assert settings().byzantine_f is None and settings(quorum=2).required == 2
    assert settings(quorum=2, byzantine_f=2).required == 5
    assert settings(quorum=6, byzantine_f=2).required == 6
    assert settings(byzantine_f=0).required == 3
    with pytest.raises(ValueError, match="byzantine_f must be >= 0"):
        settings(byzantine_f=-1)


def test_clean_round_merges_a_signed_version_onto_the_base(tmp_path):
    fed = make_federation(tmp_path, 4)
    rng = np.random.default_rng(0)
    grid = LoopbackGrid({i + 10: honest(fed, f"node{i}", rng) for i in range(4)})
    run(fed, grid)
    sent = grid.sent[0].content.config_records["config"]
    assert (sent["round"], sent["base-version"], sent["coordinator-address"]) == (
        1, 1, "127.0.0.1:1")
    v2 = fed.store.load_adapter(2)
    tensors = unpack_adapter(v2, fed.key.public_key())
    assert (v2.round, v2.parent_version, list(v2.contributors)) == (
        1, 1, ["node0", "node1", "node2", "node3"])
    assert v2.ffa_seed == fed.store.load_adapter(1).ffa_seed
    assert set(tensors) == set(LAYOUT)
    norm = np.linalg.norm(tensors["fine"]["model.transformer.blocks.0.q_proj.lora_B"])
    assert 0 < norm < 1
    (row,) = fed.store.rounds()
    assert (row.status, row.accepted, row.version, row.sampled) == ("merged", 4, 2, 4)
    assert row.replies_unix is not None and row.aggregate_s is not None
    assert [p.contributed for p in fed.store.participants(1)] == [True] * 4
    assert fed.store.reputations() == {f"node{i}": 1.0 for i in range(4)}


def test_bad_replies_are_refused_with_reasons_and_the_round_goes_on(tmp_path):
    fed = make_federation(tmp_path, 8)
    rng = np.random.default_rng(1)
    stranger = generate_key()

    def malformed(msg):
        reply = reply_for(msg, decode_delta(encode(fed, "node7", 1, 1, delta_banks(rng))))
        del reply.content["receipt"]
        return reply

    nodes: dict[int, Answer] = {i: honest(fed, f"node{i}", rng) for i in range(4)}
    nodes.update({4: node(fed, "node4", rng, key=stranger),
                  5: node(fed, "node5", rng, base_version=0),
                  6: node(fed, "node6", rng, upload=False), 7: malformed,
                  8: lambda m: Message(Error(code=1, reason="no data"), reply_to=m),
                  9: lambda m: None})
    run(fed, LoopbackGrid(nodes))
    assert reasons(fed, 1) == sorted([
        ("node4", Reason.BAD_SIGNATURE), ("node5", Reason.STALE_BASE_VERSION),
        ("node6", RoundReason.MISSING_DELTA), ("flwr:7", RoundReason.MALFORMED_REPLY),
        ("flwr:8", RoundReason.NODE_ERROR), ("flwr:9", RoundReason.TIMEOUT),
    ])
    assert list(fed.store.load_adapter(2).contributors) == ["node0", "node1", "node2", "node3"]
    assert fed.store.rounds()[0].status == "merged"


def test_replayed_and_unknown_deltas_are_refused_after_a_restart(tmp_path):
    fed = make_federation(tmp_path, 4)
    rng = np.random.default_rng(2)
    first: dict[str, Message] = {}

    def remember(node_id):
        inner = honest(fed, node_id, rng)

        def answer(msg):
            reply = inner(msg)
            first.setdefault(node_id, reply)
            return reply
        return answer

    run(fed, LoopbackGrid({i: remember(f"node{i}") for i in range(4)}))
    fed.store.close()
    fed.store = Store(fed.root)  # restart: a fresh store and strategy on the same folder
    outsider = generate_key()

    def replay(msg):  # node0 answers round 2 with its round-1 receipt
        old = first["node0"]
        return Message(content=old.content, reply_to=msg)

    nodes = {0: replay, 4: node(fed, "intruder", rng, key=outsider)}
    nodes.update({i: honest(fed, f"node{i}", rng) for i in (1, 2, 3)})
    run(fed, LoopbackGrid(nodes))
    assert reasons(fed, 2) == [("intruder", Reason.UNKNOWN_NODE),
                               ("node0", Reason.REPLAYED_NONCE)]
    (r1, r2) = fed.store.rounds()
    assert (r1.round, r1.version, r2.round, r2.base_version, r2.version) == (1, 2, 2, 2, 3)


def test_quorum_guard_keeps_the_previous_version_and_touches_nothing(tmp_path):
    fed = make_federation(tmp_path, 3)
    rng = np.random.default_rng(3)
    before = snapshot(fed)
    run(fed, LoopbackGrid({0: honest(fed, "node0", rng), 1: honest(fed, "node1", rng),
                           2: lambda m: None}))
    row = fed.store.rounds()[0]
    assert (row.status, row.accepted, row.version) == ("kept", 2, None)
    assert row.note == "quorum not met: 2 valid updates, 3 required"
    assert snapshot(fed) == before
    assert fed.store.participants() == []


def test_all_bad_input_leaves_versions_files_and_reputations_unchanged(tmp_path):
    fed = make_federation(tmp_path, 3)
    rng = np.random.default_rng(4)

    before = snapshot(fed)
    grid = LoopbackGrid({i: node(fed, f"node{i}", rng, centre=100.0) for i in range(3)})
    run(fed, grid, max_norm=10.0)
    assert {r.reason for r in fed.store.rejections(1)} == {Reason.NORM_BOUND_EXCEEDED}
    assert snapshot(fed) == before
    assert fed.store.rounds()[0].status == "kept"


def test_byzantine_reversed_delta_is_set_aside_then_excluded(tmp_path):
    fed = make_federation(tmp_path, 7)
    rng = np.random.default_rng(5)
    nodes = {i: honest(fed, f"node{i}", rng) for i in range(6)}

    nodes[6] = node(fed, "node6", rng, factor=-50.0)
    run(fed, LoopbackGrid(nodes), rounds=3, byzantine_f=1, max_norm=1e6)
    for version in (2, 3, 4):
        prev = unpack_adapter(fed.store.load_adapter(version - 1), fed.key.public_key())
        cur = unpack_adapter(fed.store.load_adapter(version), fed.key.public_key())
        for bank in LAYOUT:
            step = np.concatenate([(cur[bank][n] - prev[bank][n]).ravel() for n in cur[bank]])
            assert step.mean() > 0.01, (version, bank)  # honest direction (+0.02) wins
    reputations = fed.store.reputations()
    assert reputations["node6"] < 0.2 and min(reputations[f"node{i}"] for i in range(6)) == 1.0
    # round 1: its reversed update points against the others' sum, set aside and flagged;
    # later rounds: set aside again, or (near the screen's limit) scored, flagged for its
    # norm and down-weighted, until its reputation excludes it (round 3)
    refused = [r for r in fed.store.rejections() if r.node_id == "node6"]
    by_round = {r.round: r.reason for r in refused}
    assert len(by_round) == len(refused) and {1, 3} <= set(by_round) <= {1, 2, 3}
    assert by_round[1] == by_round.get(2, RoundReason.OPPOSED_UPDATE) == (
        RoundReason.OPPOSED_UPDATE)
    assert by_round[3] in (RoundReason.OPPOSED_UPDATE, RoundReason.EXCLUDED_BY_DAF)
    assert refused[0].detail.startswith("cosine -")
    assert all("node6" not in fed.store.load_adapter(v).contributors for v in (2, 4))


def test_node_wait_is_bounded_and_opens_no_round(tmp_path):
    fed = make_federation(tmp_path, 1)
    started = time.monotonic()
    run(fed, LoopbackGrid({}), min_nodes=2, wait_nodes_s=0.3)
    assert time.monotonic() - started < 3
    assert fed.store.rounds() == [] and [v.version for v in fed.store.versions()] == [1]


def test_differential_privacy_records_epsilon(tmp_path):
    fed = make_federation(tmp_path, 3)
    rng = np.random.default_rng(6)
    run(fed, LoopbackGrid({i: honest(fed, f"node{i}", rng) for i in range(3)}), rounds=2,
        dp_noise=1.0, clip_norm=0.5)
    eps = [r.epsilon or 0.0 for r in fed.store.rounds()]
    assert 0 < eps[0] < eps[1]
    strategy = RuvStrategy(fed.store, fed.key, settings(dp_noise=1.0))
    assert strategy.accountant is not None and strategy.accountant.rounds == 2


def test_a_copy_of_another_nodes_update_counts_once(tmp_path):
    """Two nodes sending the same delta (Sybils): the second is recorded as redundant and does
    not contribute; the round still merges."""
    fed = make_federation(tmp_path, 7)
    rng = np.random.default_rng(11)
    nodes = {i: honest(fed, f"node{i}", rng) for i in range(5)}
    nodes[5] = node(fed, "node5", np.random.default_rng(99))
    nodes[6] = node(fed, "node6", np.random.default_rng(99))  # the same draws: the same delta
    run(fed, LoopbackGrid(nodes), rounds=1)
    assert reasons(fed, 1) == [("node6", RoundReason.REDUNDANT_UPDATE)]
    [rejection] = fed.store.rejections(1)
    assert rejection.detail == "repeats node5's update"
    contributors = fed.store.load_adapter(2).contributors
    assert "node5" in contributors and "node6" not in contributors
