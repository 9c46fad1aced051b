"""The coordinator's gRPC service (proto `ruvdllm.v1.Coordinator`): delta upload, adapter
distribution.

`SubmitDelta` is where the delta bodies arrive (DESIGN §5 "Transport": Flower 1.40+ moved
node traffic to HTTP, the mission ships deltas over gRPC). An upload is stored only if it
parses (`decode_delta`), comes from an enrolled node whose signature verifies, answers the
open round from its base version, and has a nonce the store has not seen; the strategy
later checks every stored body again before aggregating it. Refusals answer
`accepted=false` with a `federation.Reason` value, and are logged and recorded.

`GetAdapter` serves any persisted version (0 = latest); `WatchAdapters` streams the latest
version when it is newer than the caller's and then each new one. Both answer with gzip
(gRPC message compression; every gRPC client decompresses it): a dense fp32 version of the
default model is 1.18 MB, 0.36 MB compressed after three synthetic rounds, which is what
keeps a node's traffic per round under the 1 MB goal (docs/deploy-coordinator.md).
Versions are written by the strategy in another process, so the stream polls the store
(SQLite WAL readers do not block the writer).

Every answer carries the initial metadata `ruvdllm-coordinator-instance`, an id drawn at
each start of the service: a node that sees it change knows the coordinator (and its
SuperLink, whose state is in memory and whose node registrations are lost) was restarted,
and restarts its SuperNode (node_agent.supernode). WatchAdapters sends it when the stream
opens, not with the first version, so a node that is up to date learns it at once.

Each open watch stream holds one of the server's worker threads for as long as the node
stays connected, so the pool is `max_watchers` + `UNARY_WORKERS`: uploads and `GetAdapter`
always find a thread, and a watcher beyond `max_watchers` is answered RESOURCE_EXHAUSTED
(the node reconnects with backoff and fetches the versions it needs with `GetAdapter`).
With a fixed pool of 32, 32 connected nodes would have left no thread for `SubmitDelta`.

The server binds loopback by default; any other address needs TLS material or an explicit
`insecure=True`, so deltas never cross a network in clear text by accident.
"""

import hashlib
import logging
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

from coordinator.config import is_loopback
from coordinator.store import Store, StoreError
from coordinator.tls import TlsFiles
from federation import (
    InvalidDelta,
    Reason,
    Rejected,
    decode_delta,
    public_key_from_bytes,
    verify_message,
)
from proto import ruvdllm_pb2 as pb
from proto import ruvdllm_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 << 20
WATCH_POLL_S = 0.5
MAX_WATCHERS = 256  # open WatchAdapters streams (one worker thread each)
UNARY_WORKERS = 16  # threads kept for SubmitDelta and GetAdapter
INSTANCE_KEY = "ruvdllm-coordinator-instance"  # initial metadata key of every answer


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """Servicer over a `Store`; `stop` ends open WatchAdapters streams; `instance` is the id
    sent in every answer's metadata (a new one per start)."""

    def __init__(self, store: Store, stop: threading.Event, poll_s: float = WATCH_POLL_S,
                 instance: str | None = None, max_watchers: int = MAX_WATCHERS) -> None:
        self.store, self.stop, self.poll_s = store, stop, poll_s
        self.instance = instance or uuid.uuid4().hex
        self.max_watchers = max_watchers
        self._watchers = threading.BoundedSemaphore(max_watchers)

    def _announce(self, context: grpc.ServicerContext) -> None:
        """Send this instance's id as initial metadata (before any message)."""
        context.send_initial_metadata(((INSTANCE_KEY, self.instance),))

    def _refuse(
        self, digest: bytes, size: int, round_: int | None, node_id: str, exc: Rejected
    ) -> pb.SubmitDeltaReceipt:
        logger.warning("refused upload from %s: %s: %s", node_id, exc.reason, exc.detail)
        self.store.record_rejection(round=round_, node_id=node_id, stage="submit",
                                    reason=exc.reason, detail=exc.detail, digest=digest)
        return pb.SubmitDeltaReceipt(accepted=False, digest=digest, size_bytes=size,
                                     reason=str(exc.reason), detail=exc.detail)

    def SubmitDelta(
        self, request: pb.SubmitDeltaRequest, context: grpc.ServicerContext
    ) -> pb.SubmitDeltaReceipt:
        """Verify and store one encoded, signed LoRADelta for the open round.

        A state folder that cannot be written (full, read-only) answers UNAVAILABLE with
        the store's reason; nothing is half-stored (coordinator.store).
        """
        self._announce(context)
        try:
            return self._submit(request, context)
        except StoreError as exc:
            logger.error("cannot take an upload: %s", exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"coordinator cannot store: {exc}")
            raise  # abort raises; this line only tells type checkers so

    def _submit(
        self, request: pb.SubmitDeltaRequest, context: grpc.ServicerContext
    ) -> pb.SubmitDeltaReceipt:
        body = bytes(request.delta)
        digest, size = hashlib.sha256(body).digest(), len(body)
        try:
            delta = decode_delta(body)
        except InvalidDelta as exc:
            return self._refuse(digest, size, None, f"peer:{context.peer()}",
                                Rejected(Reason.MALFORMED, str(exc)))
        node = delta.node_id
        try:
            raw_key = self.store.node_key(node)
            if raw_key is None:
                raise Rejected(Reason.UNKNOWN_NODE, f"node {node!r} is not enrolled")
            verify_message(delta.message, public_key_from_bytes(raw_key))
            current = self.store.open_round_row()
            if current is None or delta.round != current.round:
                now = "no round is open" if current is None else f"round {current.round} is"
                reason = (Reason.STALE_ROUND if current is not None
                          and delta.round < current.round else Reason.WRONG_ROUND)
                raise Rejected(reason, f"delta answers round {delta.round}; {now} open")
            if delta.base_version != current.base_version:
                raise Rejected(
                    Reason.STALE_BASE_VERSION,
                    f"delta trained from version {delta.base_version}, round {current.round} "
                    f"trains from {current.base_version}",
                )
            if not self.store.put_delta(delta, body):
                raise Rejected(Reason.REPLAYED_NONCE,
                               f"node {node!r} already uploaded this delta or nonce")
        except Rejected as exc:
            return self._refuse(digest, size, delta.round, node, exc)
        logger.info("stored delta of %s for round %d (%d bytes)", node, delta.round, size)
        return pb.SubmitDeltaReceipt(accepted=True, digest=digest, size_bytes=size)

    def GetAdapter(
        self, request: pb.GetAdapterRequest, context: grpc.ServicerContext
    ) -> pb.MergedAdapter:
        """One persisted version (0 = latest), gzip-compressed; NOT_FOUND if absent."""
        context.set_compression(grpc.Compression.Gzip)
        self._announce(context)
        version = request.version
        if version == 0:
            latest = self.store.latest_version()
            version = 0 if latest is None else latest.version
        try:
            return self.store.load_adapter(version)
        except StoreError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise  # abort raises; this line only tells type checkers so

    def WatchAdapters(
        self, request: pb.WatchAdaptersRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.MergedAdapter]:
        """Stream the latest version when newer than `after_version`, then each new one
        (gzip-compressed)."""
        context.set_compression(grpc.Compression.Gzip)
        self._announce(context)
        if not self._watchers.acquire(blocking=False):
            logger.warning("refused a watcher from %s: %d streams open", context.peer(),
                           self.max_watchers)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_watchers} adapter watchers are connected; poll "
                          "GetAdapter or retry later")
        try:
            after = request.after_version
            while context.is_active() and not self.stop.is_set():
                latest = self.store.latest_version()
                if latest is not None and latest.version > after:
                    yield self.store.load_adapter(latest.version)
                    after = latest.version
                self.stop.wait(self.poll_s)
        finally:
            self._watchers.release()


@dataclass
class ServiceServer:
    """A running Coordinator gRPC server and the port it bound."""

    server: grpc.Server
    port: int
    stop_event: threading.Event
    instance: str

    def stop(self, grace: float = 2.0) -> None:
        """End watch streams, then stop the server (waiting up to `grace` seconds)."""
        self.stop_event.set()
        self.server.stop(grace).wait()


def serve(
    store: Store,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls: TlsFiles | None = None,
    insecure: bool = False,
    max_watchers: int = MAX_WATCHERS,
) -> ServiceServer:
    """Start the service on host:port (0 = a free port) in this process's thread pool.

    Raises ValueError for a non-loopback host without TLS unless `insecure`, or for
    `max_watchers` < 1, and RuntimeError when the address cannot be bound.
    """
    if max_watchers < 1:
        raise ValueError(f"max_watchers must be >= 1, got {max_watchers}")
    if tls is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to serve deltas in clear text on {host}; configure TLS "
            "(`ruvdllm-coordinator init-tls`) or pass --insecure"
        )
    stop = threading.Event()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_watchers + UNARY_WORKERS,
                                   thread_name_prefix="coordinator"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],
    )
    servicer = CoordinatorService(store, stop, max_watchers=max_watchers)
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials(
            [(tls.server_key.read_bytes(), tls.server_cert.read_bytes())]
        )
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise RuntimeError(f"cannot bind the coordinator service to {address}")
    server.start()
    logger.info("coordinator service on %s:%d (%s), instance %s", host, bound,
                "TLS" if tls else "plaintext", servicer.instance)
    return ServiceServer(server, bound, stop, servicer.instance)
