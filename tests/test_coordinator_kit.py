"""Shared pieces of the coordinator tests: a small adapter layout, a state folder with
enrolled node keys, honest node behaviour and the Flower reply of docs/flower-messages.md.

Holds no tests itself; the other coordinator test modules import it.
"""

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.adapters import ensure_initialised
from coordinator.store import Store
from federation import (
    BANKS,
    BankLayout,
    DecodedDelta,
    decode_delta,
    encode_delta,
    generate_key,
    public_key_bytes,
)

LAYOUT = {
    bank: BankLayout({f"model.transformer.blocks.{i}.q_proj.lora_B": (8, 2) for i in range(2)})
    for bank in BANKS
}

Answer = Callable[[Message], Message | None]
Trainer = Callable[[Message], Message]


def flower_identity() -> None:
    """Flower builds Messages only inside a run; give this process a run/node/task identity."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1


@dataclass
class Federation:
    """A state folder initialised with LAYOUT, the coordinator key and enrolled node keys."""

    root: Path
    store: Store
    key: Ed25519PrivateKey
    nodes: dict[str, Ed25519PrivateKey]


def make_federation(tmp_path: Path, n_nodes: int) -> Federation:
    store = Store(tmp_path / "state")
    key = generate_key()
    ensure_initialised(store, LAYOUT, key)
    nodes = {f"node{i}": generate_key() for i in range(n_nodes)}
    for node_id, node_key in nodes.items():
        store.enroll(node_id, public_key_bytes(node_key))
    return Federation(tmp_path / "state", store, key, nodes)


def delta_banks(rng: np.random.Generator, scale: float = 0.01, centre: float = 0.02):
    """A plausible honest delta: a shared direction plus node noise."""
    return {
        bank: {name: centre + scale * rng.standard_normal(shape).astype(np.float32)
               for name, shape in lay.shapes.items()}
        for bank, lay in LAYOUT.items()
    }


def encode(fed: Federation, node_id: str, round: int, base_version: int, banks, *,
           key: Ed25519PrivateKey | None = None, **kwargs) -> bytes:
    kwargs.setdefault("metrics", {"quality_gain": 0.1, "loss_before": 2.0, "loss_after": 1.9})
    kwargs.setdefault("example_count", 16)
    return encode_delta(banks, round=round, node_id=node_id, base_version=base_version,
                        key=key or fed.nodes[node_id], density=1.0, **kwargs)


def reply_for(msg: Message, delta: DecodedDelta, *, receipt_round: int | None = None) -> Message:
    """The ClientApp's reply carrying `delta`'s receipt (docs/flower-messages.md §2)."""
    content = RecordDict({
        "arrays": ArrayRecord({"digest": Array(np.frombuffer(delta.digest, np.uint8).copy())}),
        "metrics": MetricRecord({"num-examples": delta.example_count,
                                 "size-bytes": delta.size_bytes, "train-s": 0.5,
                                 "upload-s": 0.01, **delta.metrics}),
        "receipt": ConfigRecord({
            "node-id": delta.node_id,
            "round": delta.round if receipt_round is None else receipt_round,
            "signature": bytes(delta.message.signature).hex(),
        }),
    })
    return Message(content=content, reply_to=msg)


def node(fed: Federation, node_id: str, rng: np.random.Generator, *,
         base_version: int | None = None, factor: float = 1.0, centre: float = 0.02,
         upload: bool = True, key: Ed25519PrivateKey | None = None) -> Trainer:
    """A node that trains (random delta around `centre`, times `factor`), uploads it to the
    store unless `upload` is False, and replies with the receipt. Honest by default."""
    def answer(msg: Message) -> Message:
        cfg = msg.content.config_records["config"]
        base = int(cfg["base-version"]) if base_version is None else base_version  # type: ignore[arg-type]
        banks = {b: {n: factor * t for n, t in ts.items()}
                 for b, ts in delta_banks(rng, centre=centre).items()}
        body = encode(fed, node_id, int(cfg["round"]), base, banks, key=key)  # type: ignore[arg-type]
        delta = decode_delta(body)
        if upload:
            fed.store.put_delta(delta, body)
        return reply_for(msg, delta)
    return answer


def honest(fed: Federation, node_id: str, rng: np.random.Generator) -> Trainer:
    """A node that trains, uploads and replies as docs/flower-messages.md says."""
    return node(fed, node_id, rng)


class LoopbackGrid:
    """Duck-typed Flower Grid: each node id answers through a function (None = no reply)."""

    def __init__(self, nodes: Mapping[int, Answer]) -> None:
        self.nodes = nodes
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.sent.append(msg)
            reply = self.nodes[msg.metadata.dst_node_id](msg)
            if reply is not None:
                replies.append(reply)
        return replies
