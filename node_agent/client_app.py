"""The Flower ClientApp of a node: forwards a train message to the local agent, returns the receipt.

Flower starts a fresh ClientApp process per message, so this module holds no model and no
state: it turns the train message (docs/flower-messages.md §1) into a
``NodeAgent.TrainRound`` call on the long-lived agent — whose address the SuperNode passes
as node config ``agent-address`` — and turns the agent's ``TrainRoundReceipt`` into the
reply of §2. The agent trains, signs and uploads the delta with ``Coordinator.SubmitDelta``;
only the receipt (digest, size, signature, metrics) travels back through Flower.

Anything that prevents a valid receipt (missing config keys, an agent that is down, a
refused upload, the round's deadline) raises with a message naming the cause; Flower turns
that into an error reply, which the coordinator records as ``node_error``.
"""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from proto import ruvdllm_pb2 as pb
from proto import ruvdllm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

AGENT_ADDRESS_KEY = "agent-address"
# Receipt metrics that are timings of the agent's work, not metrics of the signed delta.
TIMINGS = ("train_s", "upload_s")
# Seconds kept in reserve before the round's deadline for the reply to reach the SuperLink.
REPLY_MARGIN_S = 2.0

app = ClientApp()


def _value(config: ConfigRecord, key: str) -> object:
    if key not in config:
        raise ValueError(f"train message lacks config key {key!r}")
    return config[key]


def _int(config: ConfigRecord, key: str) -> int:
    value = _value(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"train message config {key!r} must be an int >= 0, got {value!r}")
    return value


def _float(config: ConfigRecord, key: str) -> float:
    value = _value(config, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"train message config {key!r} must be a number, got {value!r}")
    return float(value)


def train_request(content: RecordDict, created_unix: float = 0.0
                  ) -> tuple[pb.TrainRoundRequest, float]:
    """The TrainRound request for a train message, and its deadline (Unix seconds).

    ``created_unix`` (the message's creation time on the ServerApp) travels as option
    ``message-created-unix`` so the agent can log how long the message took to reach it
    (SuperNode poll, SuperExec poll, ClientApp process start).
    """
    if "config" not in content.config_records or "arrays" not in content.array_records:
        raise ValueError("train message needs a ConfigRecord 'config' and ArrayRecord 'arrays'")
    config = content.config_records["config"]
    arrays = content.array_records["arrays"]
    if "adapter-sha256" not in arrays:
        raise ValueError("train message lacks array 'adapter-sha256'")
    sha = arrays["adapter-sha256"].numpy().astype(np.uint8).tobytes()
    if len(sha) != 32:
        raise ValueError(f"adapter-sha256 has {len(sha)} bytes, expected 32")
    tls, address = _value(config, "coordinator-tls"), _value(config, "coordinator-address")
    if not isinstance(tls, bool) or not isinstance(address, str) or not address:
        raise ValueError("train message needs coordinator-address (str) and "
                         "coordinator-tls (bool)")
    deadline = _float(config, "deadline-unix")
    round_info = pb.RoundInfo(
        round=_int(config, "round"),
        base_version=_int(config, "base-version"),
        adapter_sha256=sha,
        ffa_seed=_int(config, "ffa-seed"),
        density=_float(config, "density"),
        local_steps=_int(config, "local-steps"),
        learning_rate=_float(config, "learning-rate"),
        clip_norm=_float(config, "clip-norm"),
        options={"coordinator-tls": "true" if tls else "false", "deadline-unix": repr(deadline),
                 "message-created-unix": repr(float(created_unix))},
    )
    return pb.TrainRoundRequest(round=round_info, coordinator_address=address), deadline


def reply_content(receipt: pb.TrainRoundReceipt, train_s: float, upload_s: float) -> RecordDict:
    """The reply records of docs/flower-messages.md §2 for a receipt."""
    metrics: dict[str, int | float] = {
        "num-examples": int(receipt.example_count),
        "size-bytes": int(receipt.size_bytes),
        "train-s": float(train_s),
        "upload-s": float(upload_s),
    }
    metrics.update({k: float(v) for k, v in receipt.metrics.items() if k not in TIMINGS})
    return RecordDict({
        "arrays": ArrayRecord({"digest": Array(np.frombuffer(receipt.digest, dtype=np.uint8))}),
        "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
        "receipt": ConfigRecord({"node-id": receipt.node_id, "round": int(receipt.round),
                                 "signature": receipt.signature.hex()}),
    })


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Have the local agent train and upload this round; reply with its receipt."""
    address = context.node_config.get(AGENT_ADDRESS_KEY)
    if not isinstance(address, str) or not address:
        raise ValueError(f"SuperNode node config lacks {AGENT_ADDRESS_KEY!r} (the NodeAgent "
                         "gRPC address); start the SuperNode through ruvdllm-node")
    request, deadline = train_request(msg.content, msg.metadata.created_at)
    budget = deadline - time.time() - REPLY_MARGIN_S
    if budget <= 0:
        raise TimeoutError(f"round {request.round.round}: deadline already passed")
    t0 = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        try:
            receipt = pb_grpc.NodeAgentStub(channel).TrainRound(request, timeout=budget)
        except grpc.RpcError as err:
            raise RuntimeError(f"TrainRound on {address} failed: {err.code().name}: "
                               f"{err.details()}") from None
    elapsed = time.perf_counter() - t0
    train_s, upload_s = (float(receipt.metrics.get(k, 0.0)) for k in TIMINGS)
    log.info("round %d: receipt %s (%d bytes) from %s in %.1f s", receipt.round,
             receipt.digest.hex()[:12], receipt.size_bytes, address, elapsed)
    return Message(content=reply_content(receipt, train_s, upload_s), reply_to=msg)
