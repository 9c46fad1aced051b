"""The local ``NodeAgent`` gRPC service: Generate (server-streaming), TrainRound, Health.

Bound to loopback by default: the Flower ClientApp calls TrainRound here, and local tools
may call Generate. Generation goes through the same :class:`~node_agent.engine.Engine` as
the HTTP API (same limits, same lock, same hot-swap rule). Refusals map to gRPC codes with
a message: INVALID_ARGUMENT for a bad request, RESOURCE_EXHAUSTED when every admission slot
is taken, UNAVAILABLE when the model stayed busy, FAILED_PRECONDITION when a round cannot be
trained (no local data, adapter not obtainable), ABORTED when the coordinator refused the
upload, DEADLINE_EXCEEDED when the round's deadline passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from node_agent.engine import Busy, Engine, RequestError
from node_agent.metrics import Registry
from node_agent.trainer import RoundError, Trainer, UploadRefused
from proto import ruvdllm_pb2 as pb
from proto import ruvdllm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class NodeAgentService(pb_grpc.NodeAgentServicer):
    """Servicer of one node; ``info`` describes the node for Health answers."""

    def __init__(self, engine: Engine, trainer: Trainer, metrics: Registry,
                 info: Callable[[], pb.NodeInfo]) -> None:
        self.engine, self.trainer, self.metrics, self.info = engine, trainer, metrics, info
        self.started = time.time()

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str,
                message: str) -> None:
        self.metrics.inc("refusals_total", reason=reason)
        log.warning("refused gRPC %s (%s): %s", reason, code.name, message)
        context.abort(code, message)

    def Generate(self, request: pb.GenerateRequest,
                 context: grpc.ServicerContext) -> Iterator[pb.GenerateEvent]:
        try:
            gen = self.engine.prepare(
                request.prompt, max_tokens=request.max_new_tokens or None,
                steps=request.steps or None, block_length=request.block_length or None,
                temperature=request.temperature, threshold=request.threshold or None,
                seed=request.seed)
            job = self.engine.submit(gen)
        except RequestError as err:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", str(err))
            return
        except Busy as err:
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", str(err))
            return
        context.add_callback(job.cancel)
        try:
            for chunk in job:
                yield pb.GenerateEvent(text=chunk.text, token_ids=chunk.token_ids,
                                       step=chunk.step, done=chunk.done,
                                       finish_reason=chunk.finish_reason,
                                       forwards=chunk.forwards,
                                       adapter_version=chunk.adapter_version)
        except Busy as err:
            self._refuse(context, grpc.StatusCode.UNAVAILABLE, "busy", str(err))
        finally:
            job.cancel()

    def TrainRound(self, request: pb.TrainRoundRequest,
                   context: grpc.ServicerContext) -> pb.TrainRoundReceipt:
        try:
            return self.trainer.train_round(request)
        except UploadRefused as err:
            self._refuse(context, grpc.StatusCode.ABORTED, "upload_refused", str(err))
        except TimeoutError as err:
            self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED, "round_deadline", str(err))
        except RoundError as err:
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, "round_error", str(err))
        raise AssertionError("unreachable: context.abort raises")

    def Health(self, request: pb.HealthRequest,
               context: grpc.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, node=self.info(),
                                 last_round=self.trainer.last_round,
                                 uptime_s=time.time() - self.started)


def serve(service: NodeAgentService, address: str,
          workers: int = 8) -> tuple[grpc.Server, int]:
    """Start a gRPC server for the service on ``address`` (host:port, port 0 = any free one).

    Returns the server and the port it bound.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="nodeagent"),
                         options=[("grpc.so_reuseport", 0)])  # a taken port fails, not shared
    pb_grpc.add_NodeAgentServicer_to_server(service, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio >= 1.60 raises where older ones returned 0
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address} for gRPC (address in use or not local)")
    server.start()
    log.info("NodeAgent gRPC service on %s (port %d)", address, port)
    return server, port
