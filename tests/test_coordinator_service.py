"""The Coordinator gRPC service on a real server bound to 127.0.0.1, plaintext and TLS."""

import hashlib
import threading
import time

import grpc
import numpy as np
import pytest

from coordinator.service import serve
from coordinator.store import RoundOutcome
from coordinator.tls import make_tls
from federation import generate_key, pack_adapter, unpack_adapter
from proto import ruvdllm_pb2 as pb
from proto import ruvdllm_pb2_grpc as pb_grpc
from tests.test_coordinator_kit import LAYOUT, delta_banks, encode, make_federation


@pytest.fixture
def fed(tmp_path):
    fed = make_federation(tmp_path, 2)
    fed.store.open_round(1, 1, 2, 0.0)
    return fed


@pytest.fixture
def stub(fed):
    running = serve(fed.store)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield pb_grpc.CoordinatorStub(channel)
    channel.close()
    running.stop()


def submit(stub, body):
    return stub.SubmitDelta(pb.SubmitDeltaRequest(delta=body), timeout=10)


def test_submit_accepts_a_verified_delta_and_refuses_bad_ones_with_reasons(fed, stub):
    rng = np.random.default_rng(0)
    body = encode(fed, "node0", 1, 1, delta_banks(rng))
    receipt = submit(stub, body)
    assert receipt.accepted and receipt.digest == hashlib.sha256(body).digest()
    assert receipt.size_bytes == len(body) and fed.store.delta(receipt.digest) is not None
    cases = {
        "replayed_nonce": body,
        "bad_signature": encode(fed, "node1", 1, 1, delta_banks(rng), key=generate_key()),
        "unknown_node": encode(fed, "ghost", 1, 1, delta_banks(rng), key=generate_key()),
        "stale_base_version": encode(fed, "node1", 1, 0, delta_banks(rng)),
        "wrong_round": encode(fed, "node1", 2, 1, delta_banks(rng)),
        "stale_round": encode(fed, "node1", 0, 1, delta_banks(rng)),
        "malformed": b"\x08\x01garbage",
    }
    for reason, data in cases.items():
        refused = submit(stub, data)
        assert (refused.accepted, refused.reason) == (False, reason), refused.detail
        assert refused.detail and refused.digest == hashlib.sha256(data).digest()
    recorded = fed.store.rejections()
    assert [r.reason for r in recorded] == list(cases)
    assert {r.stage for r in recorded} == {"submit"}
    assert recorded[-1].node_id.startswith("peer:")
    assert [d.status for d in map(fed.store.delta, [receipt.digest])] == ["stored"]


def test_uploads_outside_an_open_round_are_refused(fed, stub):
    fed.store.finish_round(RoundOutcome(1, "kept", 0))
    refused = submit(stub, encode(fed, "node0", 1, 1, delta_banks(np.random.default_rng(1))))
    assert (refused.accepted, refused.reason) == (False, "wrong_round")
    assert "no round is open" in refused.detail


def test_get_adapter_serves_signed_versions_and_not_found(fed, stub):
    latest = stub.GetAdapter(pb.GetAdapterRequest(version=0), timeout=10)
    assert latest.version == 1
    assert set(unpack_adapter(latest, fed.key.public_key())) == set(LAYOUT)
    assert stub.GetAdapter(pb.GetAdapterRequest(version=1), timeout=10) == latest
    with pytest.raises(grpc.RpcError) as err:
        stub.GetAdapter(pb.GetAdapterRequest(version=9), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_watch_streams_the_latest_then_each_new_version(fed, stub):
    stream = stub.WatchAdapters(pb.WatchAdaptersRequest(after_version=0), timeout=20)
    assert next(stream).version == 1
    ones = {b: {n: np.ones(s, np.float32) for n, s in lay.shapes.items()}
            for b, lay in LAYOUT.items()}
    v2 = pack_adapter(ones, version=2, round=1, parent_version=1, ffa_seed=1,
                      contributors=["node0"], key=fed.key)
    threading.Timer(0.3, fed.store.save_version, (v2, RoundOutcome(1, "merged", 1, 2))).start()
    assert next(stream) == v2
    stream.cancel()
    quiet = stub.WatchAdapters(pb.WatchAdaptersRequest(after_version=2), timeout=1.5)
    with pytest.raises(grpc.RpcError) as err:
        next(quiet)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_watchers_beyond_the_bound_are_refused_and_uploads_still_served(fed):
    """Each watch stream holds a worker thread: past `max_watchers` a watcher is refused
    (RESOURCE_EXHAUSTED) while uploads and GetAdapter keep their own threads; a closed
    stream frees its place."""
    running = serve(fed.store, max_watchers=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.CoordinatorStub(channel)
    try:
        open_streams = [stub.WatchAdapters(pb.WatchAdaptersRequest(after_version=0), timeout=20)
                        for _ in range(2)]
        assert [next(s).version for s in open_streams] == [1, 1]  # both are being served
        with pytest.raises(grpc.RpcError) as err:
            next(stub.WatchAdapters(pb.WatchAdaptersRequest(after_version=0), timeout=20))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 adapter watchers" in err.value.details()
        body = encode(fed, "node0", 1, 1, delta_banks(np.random.default_rng(3)))
        assert submit(stub, body).accepted
        assert stub.GetAdapter(pb.GetAdapterRequest(version=0), timeout=10).version == 1
        open_streams[0].cancel()
        deadline = time.monotonic() + 10
        while True:  # the server releases the place once it sees the cancellation
            try:
                third = stub.WatchAdapters(pb.WatchAdaptersRequest(after_version=0), timeout=20)
                assert next(third).version == 1
                third.cancel()
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the cancelled stream kept its place"
                time.sleep(0.2)
        open_streams[1].cancel()
    finally:
        channel.close()
        running.stop()
    with pytest.raises(ValueError, match="max_watchers"):
        serve(fed.store, max_watchers=0)


def test_tls_with_init_tls_material(fed, tmp_path):
    files = make_tls(tmp_path / "tls")
    running = serve(fed.store, "127.0.0.1", tls=files)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=files.ca_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{running.port}", creds) as channel:
            adapter = pb_grpc.CoordinatorStub(channel).GetAdapter(pb.GetAdapterRequest(),
                                                                  timeout=10)
            assert adapter.version == 1
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as plain, pytest.raises(
            grpc.RpcError
        ):
            pb_grpc.CoordinatorStub(plain).GetAdapter(pb.GetAdapterRequest(), timeout=3)
    finally:
        running.stop()
    with pytest.raises(FileExistsError):
        make_tls(tmp_path / "tls")


def test_non_loopback_plaintext_bind_is_refused(fed):
    with pytest.raises(ValueError, match="clear text"):
        serve(fed.store, "0.0.0.0")


def test_every_answer_names_the_service_instance_and_a_restart_draws_a_new_one(fed):
    from coordinator.service import INSTANCE_KEY
    from node_agent.supernode import INSTANCE_KEY as NODE_SIDE_KEY

    assert NODE_SIDE_KEY == INSTANCE_KEY  # the node reads what the coordinator writes
    seen = []
    for _ in range(2):  # a start, then a restart on the same store
        running = serve(fed.store)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            _, call = stub.GetAdapter.with_call(pb.GetAdapterRequest(version=0), timeout=10)
            # the node is up to date: no version comes, yet the id arrives as the stream opens
            quiet = stub.WatchAdapters(pb.WatchAdaptersRequest(after_version=99), timeout=10)
            ids = {dict(call.initial_metadata())[INSTANCE_KEY],
                   dict(quiet.initial_metadata())[INSTANCE_KEY], running.instance}
            quiet.cancel()
        running.stop()
        assert len(ids) == 1
        seen += ids
    assert seen[0] != seen[1]
