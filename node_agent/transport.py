"""gRPC channels from the node to the coordinator's ``Coordinator`` service.

TLS whenever the node is given a root certificate (required off loopback, see
:mod:`node_agent.config`); plaintext only to a loopback coordinator without one. Message
limits are raised above gRPC's 4 MiB default because a merged adapter of a larger model
(dense float32 B matrices of every bank) can exceed it; the codec's own bound on deltas
stays in force on the coordinator.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from node_agent.config import is_loopback

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class TransportError(RuntimeError):
    """The coordinator cannot be reached as configured (no TLS material, unsafe address)."""


def coordinator_channel(address: str, root_certificates: Path | None, *,
                        tls: bool | None = None, insecure: bool = False) -> grpc.Channel:
    """A channel to ``address``; ``tls`` None means: TLS iff a root certificate is set.

    Plaintext to a non-loopback address needs ``insecure`` (the node's ``--insecure``).
    """
    use_tls = root_certificates is not None if tls is None else tls
    if use_tls:
        if root_certificates is None:
            raise TransportError(f"coordinator {address} speaks TLS but the node has no "
                                 "coordinator.root_certificates configured")
        try:
            roots = root_certificates.read_bytes()
        except OSError as err:
            raise TransportError(f"cannot read root certificate {root_certificates}: "
                                 f"{err}") from None
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), _OPTIONS)
    if not insecure and not is_loopback(address.rsplit(":", 1)[0]):
        raise TransportError(f"refusing plaintext gRPC to non-loopback coordinator {address}")
    return grpc.insecure_channel(address, _OPTIONS)
