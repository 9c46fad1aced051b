"""``ruvdllm-node``: start a node agent, create its identity, or ask a running one its status.

    ruvdllm-node init   --config node.toml     create keys; print what to enroll
    ruvdllm-node start  --config node.toml [--http-port N] [--grpc-port N] [--data-dir D]
                        [--superlink HOST:PORT] [--coordinator HOST:PORT] [--no-supernode]
                        [--insecure]
    ruvdllm-node status --config node.toml [--json]

A thin shell over :mod:`node_agent.agent`: configuration errors and unreachable nodes end
with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import grpc
import httpx

from node_agent.config import NodeConfig, NodeConfigError, load_config
from node_agent.identity import ensure_identity
from proto import ruvdllm_pb2 as pb
from proto import ruvdllm_pb2_grpc as pb_grpc


def _config(args: argparse.Namespace) -> NodeConfig:
    overrides: dict[str, Any] = {}
    for flag, key in (("http_port", "http.port"), ("grpc_port", "grpc.port"),
                      ("data_dir", "node.data_dir"), ("superlink", "supernode.superlink"),
                      ("coordinator", "coordinator.address")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "no_supernode", False):
        overrides["supernode.enabled"] = False
    return load_config(args.config, overrides, insecure=getattr(args, "insecure", False))


def _init(args: argparse.Namespace) -> None:
    cfg = _config(args)
    identity = ensure_identity(cfg)
    print(f"node id:         {identity.node_id}")
    print(f"signing key:     {identity.public_path}")
    print(f"enroll with:     ruvdllm-coordinator enroll {identity.public_path} "
          f"--node-id {identity.node_id}"
          + (f" --flower-key {identity.flower_public_path}"
             if identity.flower_public_path else ""))


def _start(args: argparse.Namespace) -> None:
    from node_agent.agent import NodeAgent  # loads torch: only for start

    cfg = _config(args)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    NodeAgent(cfg).run()


def status(cfg: NodeConfig, timeout: float = 5.0) -> dict[str, Any]:
    """Health of a running node over gRPC and HTTP; raises ConnectionError if it is down."""
    with grpc.insecure_channel(cfg.grpc_address) as channel:
        try:
            health = pb_grpc.NodeAgentStub(channel).Health(pb.HealthRequest(), timeout=timeout)
        except grpc.RpcError as err:
            raise ConnectionError(f"node agent at {cfg.grpc_address} does not answer: "
                                  f"{err.code().name}") from None
    out: dict[str, Any] = {
        "node_id": health.node.node_id, "model": health.node.model_id,
        "status": pb.HealthResponse.Status.Name(health.status),
        "adapter_version": health.node.adapter_version, "last_round": health.last_round,
        "uptime_s": round(health.uptime_s, 1), "grpc": cfg.grpc_address, "http": cfg.http_url,
    }
    try:
        http = httpx.get(f"{cfg.http_url}/health", timeout=timeout)
        out["http_status"] = http.status_code
        out["supernode"] = http.json().get("supernode")
    except httpx.HTTPError as err:
        out["http_status"] = f"unreachable ({err})"
    return out


def _status(args: argparse.Namespace) -> None:
    report = status(_config(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key + ':':17}{value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ruvdllm-node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="node.toml")
        p.add_argument("--insecure", action="store_true",
                       help="allow non-loopback binds and coordinators without TLS")

    i = sub.add_parser("init", help="create the node's keys and print what to enroll")
    common(i)
    i.set_defaults(func=_init)

    s = sub.add_parser("start", help="run the node agent (blocks; SIGINT/SIGTERM stop it)")
    common(s)
    s.add_argument("--http-port", type=int)
    s.add_argument("--grpc-port", type=int)
    s.add_argument("--data-dir", help="folder of local training text")
    s.add_argument("--superlink", help="SuperLink Fleet address host:port")
    s.add_argument("--coordinator", help="Coordinator gRPC address host:port")
    s.add_argument("--no-supernode", action="store_true", help="do not start flower-supernode")
    s.set_defaults(func=_start)

    st = sub.add_parser("status", help="health of the running node")
    common(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (NodeConfigError, OSError, ValueError) as err:  # OSError: files, ports, the home lock
        print(f"ruvdllm-node: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
