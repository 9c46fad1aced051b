"""Local TALoRA patterns in the node: stored by its rounds, retrieved per request.

The node agent runs in-process against a real coordinator store and gRPC service (as in
tests/test_node_agent.py); the TALoRA store is the real one (hnswlib index, files on disk).
A round trains on the node's local text and must leave one delta pattern per bank keyed by
that text's embedding; a generation request must retrieve, by its prompt's embedding, the
patterns of the text closest to it, and apply them together with the global adapters.

The module runs torch on one thread: on the loaded 2-core CI machine two OpenMP threads
spin against each other and the module took 85 s instead of 13 s (load ~5; 204 s at ~10).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.service import ServiceServer
from coordinator.store import Store
from node_agent.agent import NodeAgent
from node_agent.engine import Chunk
from node_agent.trainer import fingerprint
from proto import ruvdllm_pb2 as pb
from ruvdllm.talora import BANKS, DELTA_KIND, TALoRA
from tests.test_node_agent import agent_with_coordinator

CODE = ("The os.path module implements functions on path names. Use join() to combine parts "
        "and split() to take them apart; nothing touches the file system. ") * 40
PLAY = ("KING: What say you, good my lord? Speak plainly, for the hour is late and the night "
        "is full of rumour. LORD: My liege, the gates are shut and the guard is set. ") * 40
CODE_PROMPT = "The function os.path.split() takes a path name and returns"
PLAY_PROMPT = "LORD: Good my liege, the night is late and"


@dataclass
class Node:
    store: Store
    service: ServiceServer
    agent: NodeAgent
    data: Path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("talora")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store, service, agent, _ = agent_with_coordinator(root)
    try:
        yield Node(store, service, agent, root / "node" / "data")
    finally:
        torch.set_num_threads(threads)
        service.stop()
        store.close()


def train_on(node: Node, text: str) -> pb.TrainRoundReceipt:
    """Put ``text`` as the node's only local document and train the next round on it."""
    for old in node.data.iterdir():
        old.unlink()
    (node.data / "doc.txt").write_text(text)
    latest = node.store.latest_version()
    assert latest is not None
    round_number = node.store.last_round() + 1
    node.store.open_round(round_number, latest.version, 1, time.time() + 300)
    info = pb.RoundInfo(round=round_number, base_version=latest.version,
                        adapter_sha256=latest.sha256, ffa_seed=latest.ffa_seed, density=0.05,
                        local_steps=1, learning_rate=5e-3, clip_norm=1.0,
                        options={"deadline-unix": repr(time.time() + 300)})
    return node.agent.trainer.train_round(pb.TrainRoundRequest(
        round=info, coordinator_address=f"127.0.0.1:{node.service.port}"))


def patterns_of(node: Node, text: str) -> set[int]:
    source = fingerprint([text.strip()])  # LocalData strips each document
    talora = node.agent.talora
    return {p for p in talora.patterns() if talora.meta(p)["source"] == source}


def generate(node: Node, prompt: str) -> Chunk:
    engine = node.agent.engine
    return engine.submit(engine.prepare(prompt, max_tokens=8, steps=8)).result()


def weight(chunk: Chunk, ids: set[int]) -> float:
    return sum(w for pid, w in chunk.local_patterns.items() if pid in ids)


def test_a_round_stores_one_delta_pattern_per_bank(node: Node) -> None:
    assert generate(node, CODE_PROMPT).local_patterns == {}  # nothing stored yet
    train_on(node, CODE)
    talora = node.agent.talora
    code = patterns_of(node, CODE)
    assert sorted(talora.meta(p)["bank"] for p in code) == sorted(BANKS)
    assert all(talora.meta(p)["kind"] == DELTA_KIND for p in code)
    # a delta pattern's B is what training added, not the (zero) global B of version 1
    b = [v for p in code for k, v in talora.adapter(p).items() if k.endswith("lora_B")]
    assert any(float(t.abs().max()) > 0 for t in b)
    # clipped like the uploaded delta (clip_norm 1.0; one Adam step at lr 5e-3 is ~2.7)
    assert sum(float((t.double() ** 2).sum()) for t in b) ** 0.5 <= 1.0 * 1.02
    saved = TALoRA.load(node.agent.cfg.node.home / "talora")  # persisted for a restart
    assert set(saved.patterns()) == set(talora.patterns())


def test_a_request_on_the_node_domain_retrieves_its_pattern(node: Node) -> None:
    code = patterns_of(node, CODE)
    assert code, "the previous test stores the CODE patterns"
    done = generate(node, CODE_PROMPT)
    assert set(done.local_patterns) == code  # one per bank: the schedule crosses all three
    assert node.agent.metrics.snapshot()["local_pattern_requests_total"][()] >= 1
    hook = node.agent.engine.patterns
    assert hook is not None and hook.used == {}  # the query ends with the request


def test_http_answers_name_the_local_patterns_used(node: Node) -> None:
    code = {str(p) for p in patterns_of(node, CODE)}
    assert code, "the first test stores the CODE patterns"
    body = {"prompt": CODE_PROMPT, "max_tokens": 8, "steps": 8}
    with TestClient(node.agent.app) as client:
        whole = client.post("/v1/completions", json=body).json()["ruvdllm"]
        stream = client.post("/v1/completions", json={**body, "stream": True}).text
    assert whole["adapter_version"] == node.agent.adapters.applied
    assert set(whole["local_patterns"]) == code
    assert all(0 < w <= 1 for w in whole["local_patterns"].values())
    last = json.loads([e for e in stream.split("\n\n") if e.startswith("data: {")][-1][6:])
    assert last["ruvdllm"] == whole


def test_the_closest_text_wins_and_the_global_adapter_stays_in_the_mix(node: Node) -> None:
    train_on(node, PLAY)
    code, play = patterns_of(node, CODE), patterns_of(node, PLAY)
    assert len(code) == len(play) == len(BANKS)
    on_code, on_play = generate(node, CODE_PROMPT), generate(node, PLAY_PROMPT)
    assert weight(on_code, code) > weight(on_code, play)
    assert weight(on_play, play) > weight(on_play, code)
    hook = node.agent.engine.patterns
    assert hook is not None
    hook.set_query(node.agent.trainer.key_of([PLAY.strip()])[1])
    try:
        mix = dict(hook.mix_for(0.5))  # interior of the domain bank
    finally:
        hook.set_query(None)
    assert mix["global:domain"] == pytest.approx(1.0)  # the delta adds to the global
    assert sum(w for name, w in mix.items() if name.startswith("local:")) == pytest.approx(1.0)


def test_a_new_round_on_the_same_text_replaces_its_patterns(node: Node) -> None:
    before_play, before_code = patterns_of(node, PLAY), patterns_of(node, CODE)
    train_on(node, PLAY)
    after_play = patterns_of(node, PLAY)
    assert len(after_play) == len(BANKS) and not after_play & before_play
    assert patterns_of(node, CODE) == before_code  # another text's patterns stay
    rounds = {node.agent.talora.meta(p)["round"] for p in after_play}
    assert rounds == {node.store.last_round()}
