"""The node agent in-process against a real coordinator store and gRPC Coordinator service.

TrainRound is called through the agent's real NodeAgent gRPC server; the delta goes through
the coordinator's real SubmitDelta; merged versions are packed and signed with the
coordinator's key and reach the node through GetAdapter / WatchAdapters.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from coordinator import config as coordinator_config
from coordinator.launch import prepare_state
from coordinator.service import ServiceServer, serve
from coordinator.store import Store
from federation import (
    ErrorFeedback,
    decode_delta,
    generate_key,
    load_private_key,
    pack_adapter,
    public_key_bytes,
    save_private_key,
    save_public_key,
)
from node_agent.adapters import AdapterError
from node_agent.agent import NodeAgent, listen, lock_home
from node_agent.client_app import reply_content, train_request
from node_agent.config import load_config
from node_agent.grpc_service import serve as serve_agent
from node_agent.trainer import FEEDBACK_FILE, clip
from proto import ruvdllm_pb2 as pb
from proto import ruvdllm_pb2_grpc as pb_grpc

TEXT = ("The module provides functions for working with paths. Each function takes a path "
        "and returns a new path; nothing is read from disk. ") * 40


@dataclass
class World:
    store: Store
    service: ServiceServer
    agent: NodeAgent
    stub: pb_grpc.NodeAgentStub
    state_dir: Path


def agent_with_coordinator(root: Path, text: str | None = None
                           ) -> tuple[Store, ServiceServer, NodeAgent, Path]:
    """A coordinator store and service under ``root`` and an enrolled node agent "alice"
    (no SuperNode) with ``text`` as its local document; returns them and the coordinator's
    state folder. The caller stops the service and closes the store."""
    ccfg = coordinator_config.load(None, [f"coordinator.state_dir={json.dumps(str(root / 'c'))}"])
    store = prepare_state(ccfg)
    service = serve(store, "127.0.0.1", 0)
    home = root / "node"
    (home / "data").mkdir(parents=True)
    if text is not None:
        (home / "data" / "doc.txt").write_text(text)
    (home / "node.toml").write_text(f"""
[node]
id = "alice"
home = "."
[grpc]
port = 0
[coordinator]
address = "127.0.0.1:{service.port}"
public_key = "{ccfg.state_dir / 'coordinator.pub'}"
[supernode]
enabled = false
[training]
seq_len = 32
batch_size = 2
""")
    agent = NodeAgent(load_config(home / "node.toml"))
    store.enroll("alice", public_key_bytes(agent.identity.key))
    return store, service, agent, ccfg.state_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    store, service, agent, state_dir = agent_with_coordinator(
        tmp_path_factory.mktemp("fed"), TEXT)
    server, port = serve_agent(agent.service, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield World(store, service, agent, pb_grpc.NodeAgentStub(channel), state_dir)
    finally:
        channel.close()
        server.stop(0)
        service.stop()
        store.close()


def round_request(world: World, round_number: int, **overrides: object) -> pb.TrainRoundRequest:
    latest = world.store.latest_version()
    assert latest is not None
    info = dict(round=round_number, base_version=latest.version, adapter_sha256=latest.sha256,
                ffa_seed=latest.ffa_seed, density=0.05, local_steps=1, learning_rate=5e-3,
                clip_norm=1.0, options={"deadline-unix": repr(time.time() + 300)})
    info.update(overrides)
    return pb.TrainRoundRequest(round=pb.RoundInfo(**info),  # type: ignore[arg-type]
                                coordinator_address=f"127.0.0.1:{world.service.port}")


def test_second_agent_on_a_home_or_a_taken_port_is_refused(world: World) -> None:
    """Refused in run() before anything binds, starts or writes agent.json; gRPC would
    otherwise share a taken port (SO_REUSEPORT) with the agent already there."""
    agent, home = world.agent, world.agent.cfg.node.home
    held = lock_home(home)
    try:
        with pytest.raises(OSError, match=f"another node agent \\(pid {os.getpid()}\\)"):
            agent.run()
    finally:
        os.close(held)
    assert not (home / "agent.json").exists()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} for HTTP"):
            listen("127.0.0.1", port)
    first, port = serve_agent(agent.service, "127.0.0.1:0")  # as a running agent's
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} for gRPC"):
            serve_agent(agent.service, f"127.0.0.1:{port}")
    finally:
        first.stop(0)
    os.close(lock_home(home))  # released: the next agent may take it


def test_a_causal_model_is_refused(tmp_path: Path) -> None:
    save_public_key(generate_key(), tmp_path / "coordinator.pub")
    (tmp_path / "node.toml").write_text(
        '[model]\npath = "default-ar"\nquant = "none"\n[supernode]\nenabled = false\n')
    with pytest.raises(ValueError, match="default-ar: a causal model"):
        NodeAgent(load_config(tmp_path / "node.toml"))


def test_train_round_uploads_a_signed_delta(world: World) -> None:
    latest = world.store.latest_version()
    assert latest is not None
    world.store.open_round(1, latest.version, 1, time.time() + 300)
    receipt = world.stub.TrainRound(round_request(world, 1), timeout=300)
    assert receipt.node_id == "alice" and receipt.round == 1
    assert receipt.example_count > 0 and receipt.size_bytes > 0
    assert {"loss_before", "loss_after", "quality_gain", "train_s", "upload_s"} <= set(
        receipt.metrics)
    stored = world.store.delta(receipt.digest)
    assert stored is not None and stored.node_id == "alice" and stored.round == 1
    delta = decode_delta(stored.body)
    assert bytes(delta.message.signature) == receipt.signature
    assert set(delta.tensors) == {"coarse", "domain", "fine"}
    assert all(name.endswith("lora_B") for bank in delta.tensors.values() for name in bank)
    assert "train_s" not in delta.metrics  # timings are not part of the signed delta
    assert delta.metrics["quality_gain"] == delta.metrics["domain.quality_gain"]
    assert "coarse.quality_gain" not in delta.metrics  # only the gain bank is scored
    assert (world.agent.cfg.node.home / FEEDBACK_FILE).exists()
    assert ErrorFeedback.load(world.agent.cfg.node.home / FEEDBACK_FILE).residual
    assert world.agent.trainer.last_round == 1
    assert world.agent.adapters.applied == latest.version  # fetched the base to train from


def test_refused_upload_is_aborted_with_reason(world: World) -> None:
    with pytest.raises(grpc.RpcError) as err:
        world.stub.TrainRound(round_request(world, 7), timeout=300)  # round 7 is not open
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "SubmitDelta refused: wrong_round" in str(err.value.details())


@pytest.mark.parametrize("override, fragment", [
    ({"density": 0.0}, "density must be in (0, 1]"),
    ({"adapter_sha256": b"\0" * 32}, "the round announced"),
    ({"ffa_seed": 12345}, "differs from adapter"),
    ({"base_version": 99}, "GetAdapter(version=99) failed: NOT_FOUND"),
])
def test_untrainable_rounds_fail_precondition(world: World, override: dict, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        world.stub.TrainRound(round_request(world, 2, **override), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert fragment in str(err.value.details())


def test_health_and_generate(world: World) -> None:
    health = world.stub.Health(pb.HealthRequest(), timeout=10)
    assert health.status == pb.HealthResponse.SERVING and health.node.node_id == "alice"
    events = list(world.stub.Generate(pb.GenerateRequest(prompt="The path", max_new_tokens=8,
                                                         steps=8), timeout=60))
    assert events[-1].done and events[-1].finish_reason in ("stop", "length")
    assert events[-1].forwards > 0
    for bad, fragment in [({"prompt": ""}, "prompt must not be empty"),
                          ({"temperature": float("nan")}, "temperature must be between 0 and 2"),
                          ({"temperature": 1e30}, "temperature must be between 0 and 2")]:
        request = pb.GenerateRequest(**{"prompt": "The path", "max_new_tokens": 8, **bad})
        with pytest.raises(grpc.RpcError) as err:
            list(world.stub.Generate(request, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in str(err.value.details())


def next_version(world: World, key_path: Path | None = None,
                 scale: float = 0.01) -> pb.MergedAdapter:
    latest = world.store.latest_version()
    assert latest is not None
    layout = world.store.layout()
    rng = np.random.default_rng(latest.version)
    banks = {b: {n: (scale * rng.standard_normal(s)).astype(np.float32)
                 for n, s in lay.shapes.items()} for b, lay in layout.items()}
    key = load_private_key(key_path or world.state_dir / "coordinator.key")
    return pack_adapter(banks, version=latest.version + 1, round=latest.round + 1,
                        parent_version=latest.version, ffa_seed=latest.ffa_seed,
                        contributors=["alice"], key=key)


def test_forged_or_tampered_versions_are_refused(world: World, tmp_path: Path) -> None:
    applied = world.agent.adapters.applied
    forged_key = tmp_path / "forged.key"
    save_private_key(generate_key(), forged_key)
    with pytest.raises(AdapterError, match="bad_signature"):
        world.agent.adapters.offer(next_version(world, forged_key))
    tampered = next_version(world)
    tampered.banks[0].tensors[0].data = b"\0" * len(tampered.banks[0].tensors[0].data)
    with pytest.raises(AdapterError, match="refused"):
        world.agent.adapters.offer(tampered)
    assert world.agent.adapters.applied == applied
    assert world.agent.engine.adapter_version == applied


def test_hot_swap_waits_for_the_request_in_flight(world: World) -> None:
    engine = world.agent.engine
    old = world.agent.adapters.applied
    new = next_version(world)
    gen = engine.prepare("Once upon a time", max_tokens=32, steps=32)
    job = engine.submit(gen)
    first = job.get()  # the request is running and holds the model
    swapped = threading.Event()
    swapper = threading.Thread(target=lambda: (world.agent.adapters.offer(new), swapped.set()))
    swapper.start()
    final = job.result() if not first.done else first
    swapper.join(timeout=60)
    assert swapped.is_set()
    assert final.adapter_version == old  # served end to end on the version it started with
    after = engine.submit(engine.prepare("Once", max_tokens=4, steps=4)).result()
    assert after.adapter_version == new.version == world.agent.adapters.applied
    assert world.agent.talora.global_version == new.version
    assert (world.agent.cfg.node.home / "talora" / "CURRENT").exists()  # persisted


def test_watch_follows_new_versions(world: World) -> None:
    stop = threading.Event()
    watcher = threading.Thread(target=world.agent.adapters.watch, args=(stop,), daemon=True)
    watcher.start()
    try:
        message = next_version(world)
        world.store.save_version(message)
        end = time.monotonic() + 30
        while world.agent.adapters.applied < message.version and time.monotonic() < end:
            time.sleep(0.2)
        assert world.agent.adapters.applied == message.version
    finally:
        stop.set()
        world.agent.adapters.close()
        watcher.join(timeout=10)
    assert not watcher.is_alive()


def test_clip_bounds_the_whole_delta() -> None:
    delta = {"coarse": {"a": np.full((2, 2), 3.0, np.float32)},
             "fine": {"b": np.full((4,), 4.0, np.float32)}}
    clipped, norm = clip(delta, 1.0)
    assert norm == pytest.approx(np.sqrt(4 * 9 + 4 * 16))
    total = np.sqrt(sum(float(np.sum(t ** 2)) for b in clipped.values() for t in b.values()))
    assert total == pytest.approx(1.0, rel=1e-5)
    assert clip(delta, 0.0)[0] is delta


def flower_train_content(**config: object) -> RecordDict:
    values: dict[str, object] = {
        "server-round": 1, "round": 3, "base-version": 2, "ffa-seed": 11, "density": 0.05,
        "local-steps": 4, "learning-rate": 0.005, "clip-norm": 1.0,
        "coordinator-address": "127.0.0.1:9095", "coordinator-tls": False,
        "deadline-unix": 1.0e10}
    values.update(config)
    return RecordDict({
        "arrays": ArrayRecord({"adapter-sha256": Array(np.arange(32, dtype=np.uint8))}),
        "config": ConfigRecord({k: v for k, v in values.items() if v is not None}),  # type: ignore[misc]
    })


def test_client_app_maps_the_train_message_and_the_receipt() -> None:
    request, deadline = train_request(flower_train_content())
    assert deadline == 1.0e10 and request.coordinator_address == "127.0.0.1:9095"
    assert request.round.round == 3 and request.round.base_version == 2
    assert request.round.adapter_sha256 == bytes(range(32))
    assert request.round.options["coordinator-tls"] == "false"
    receipt = pb.TrainRoundReceipt(round=3, node_id="alice", digest=b"\1" * 32, size_bytes=900,
                                   signature=b"\2" * 64, example_count=5,
                                   metrics={"loss_before": 2.0, "train_s": 4.0, "upload_s": 0.1})
    reply = reply_content(receipt, 4.0, 0.1)
    assert reply.array_records["arrays"]["digest"].numpy().tobytes() == b"\1" * 32
    metrics = reply.metric_records["metrics"]
    assert metrics["num-examples"] == 5 and metrics["size-bytes"] == 900
    assert metrics["train-s"] == 4.0 and "train_s" not in metrics
    assert metrics["loss_before"] == 2.0
    assert reply.config_records["receipt"]["signature"] == "02" * 64


@pytest.mark.parametrize("config, fragment", [
    ({"ffa-seed": None}, "lacks config key 'ffa-seed'"),
    ({"round": "three"}, "'round' must be an int"),
    ({"coordinator-tls": "yes"}, "coordinator-tls (bool)"),
])
def test_client_app_refuses_malformed_train_messages(config: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        train_request(flower_train_content(**config))
    assert fragment in str(err.value)
