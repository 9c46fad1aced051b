"""`ruvdllm-coordinator start|enroll|status|init-tls`.

    ruvdllm-coordinator init-tls --config coordinator.toml [--host NAME ...]
    ruvdllm-coordinator enroll node.pub [--node-id ID] [--flower-key node_ecdsa.pub]
    ruvdllm-coordinator start --config coordinator.toml [--set rounds.num_rounds=3]
                              [--exit-after-run] [--insecure]
    ruvdllm-coordinator status --config coordinator.toml [--json]

`--config` is optional everywhere (defaults: docs/deploy-coordinator.md); `--set
section.key=value` overrides any key. A non-loopback `superlink.host` or `service.host`
without TLS is refused unless `--insecure` is given. User errors print one line and exit 2.
"""

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from coordinator import launch
from coordinator.config import ConfigError, CoordinatorConfig, load
from coordinator.store import Store, StoreError
from coordinator.tls import DEFAULT_HOSTS, make_tls
from federation import load_public_key, public_key_bytes

logger = logging.getLogger("coordinator")


class UsageError(Exception):
    """A user mistake reported as one line with exit status 2."""


def default_node_id(raw_public_key: bytes) -> str:
    """`n-` + the first 16 hex digits of SHA-256(raw key) (docs/flower-messages.md §4)."""
    return "n-" + hashlib.sha256(raw_public_key).hexdigest()[:16]


def _config(args: argparse.Namespace) -> CoordinatorConfig:
    overrides = list(args.set or [])
    if getattr(args, "state_dir", None):
        overrides.append(f"coordinator.state_dir={json.dumps(str(args.state_dir))}")
    if getattr(args, "insecure", False):
        overrides += ["superlink.insecure=true", "service.insecure=true"]
    return load(args.config, overrides)


def cmd_init_tls(args: argparse.Namespace) -> int:
    cfg = _config(args)
    hosts = list(dict.fromkeys([*DEFAULT_HOSTS, cfg.superlink.host, cfg.service.host,
                                *(args.host or [])]))
    files = make_tls(cfg.tls_dir, hosts)
    print(f"CA {files.ca_cert}; server certificate {files.server_cert} for {', '.join(hosts)}")
    print("give nodes the CA file; set superlink.tls/service.tls = true to use it")
    return 0


def _superlink_up(cfg: CoordinatorConfig) -> bool:
    scheme = "https" if cfg.superlink.tls else "http"
    verify: Any = str(cfg.tls_dir / "ca.crt") if cfg.superlink.tls else True
    try:
        url = f"{scheme}://{cfg.superlink_address}/health"
        return httpx.get(url, verify=verify, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def cmd_enroll(args: argparse.Namespace) -> int:
    cfg = _config(args)
    try:
        raw = public_key_bytes(load_public_key(args.public_key))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{args.public_key}: not an Ed25519 public key PEM ({exc})") from None
    flower_key = None
    if args.flower_key:
        try:
            flower_key = Path(args.flower_key).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{args.flower_key}: cannot read the SuperNode key ({exc})") from None
        if not flower_key.startswith("ecdsa-sha2-nistp384 "):
            raise UsageError(f"{args.flower_key}: not an OpenSSH ecdsa-sha2-nistp384 public key")
    node_id = args.node_id or default_node_id(raw)
    store = Store(cfg.state_dir)
    try:
        new = store.enroll(node_id, raw, flower_key)
    finally:
        store.close()
    print(f"{'enrolled' if new else 'already enrolled'} node {node_id}")
    if flower_key and cfg.superlink.node_auth and _superlink_up(cfg):
        launch.register_flower_key(cfg, flower_key)
        print("registered its SuperNode key with the running SuperLink")
    elif flower_key:
        print("its SuperNode key is registered when the SuperLink starts (superlink.node_auth)")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    cfg = _config(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deployment = launch.start(cfg, submit=not args.no_run)
    print(json.dumps({"superlink_pid": deployment.superlink_pid,
                      "superlink": cfg.superlink_address,
                      "service": f"{cfg.service.host}:{deployment.service_port}",
                      "run_id": deployment.run_id, "state_dir": str(cfg.state_dir)}),
          flush=True)
    code = 0
    try:
        while deployment.run_id is not None and not stop.is_set():
            status = deployment.status()
            if status.startswith(launch.FINISHED):
                logger.info("run %d %s", deployment.run_id, status)
                code = 0 if status == "finished:completed" else 1
                break
            stop.wait(2.0)
        if not args.exit_after_run:
            logger.info("serving adapters until SIGINT/SIGTERM")
            stop.wait()
    finally:
        deployment.stop()
    return code


def _status(cfg: CoordinatorConfig) -> dict[str, Any]:
    if not (cfg.state_dir / "coordinator.db").exists():
        raise UsageError(f"{cfg.state_dir}: no coordinator state (run `start` first)")
    store = Store(cfg.state_dir)
    try:
        reputations = store.reputations()
        rejected: dict[str, int] = {}
        for r in store.rejections():
            rejected[r.reason] = rejected.get(r.reason, 0) + 1
        return {
            "state_dir": str(cfg.state_dir),
            "nodes": [{"node_id": n.node_id, "reputation": reputations.get(n.node_id),
                       "superlink_key": n.flower_key is not None} for n in store.nodes()],
            "rounds": [{k: v for k, v in asdict(r).items() if v is not None}
                       for r in store.rounds()],
            "versions": [{"version": v.version, "round": v.round, "sha256": v.sha256.hex(),
                          "contributors": len(v.contributors), "file": v.file}
                         for v in store.versions()],
            "rejections": rejected,
        }
    finally:
        store.close()


def cmd_status(args: argparse.Namespace) -> int:
    info = _status(_config(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"state {info['state_dir']}")
    print(f"nodes {len(info['nodes'])}: " + ", ".join(
        f"{n['node_id']}" + (f" (rep {n['reputation']:.2f})" if n["reputation"] is not None
                             else "") for n in info["nodes"]))
    for r in info["rounds"]:
        print(f"round {r['round']}: {r['status']} base v{r['base_version']} "
              f"accepted {r.get('accepted', '-')}/{r['sampled']}"
              + (f" -> v{r['version']}" if "version" in r else "")
              + (f" ({r['note']})" if "note" in r else ""))
    for v in info["versions"]:
        print(f"version {v['version']} round {v['round']} sha256 {v['sha256'][:16]} "
              f"from {v['contributors']} nodes")
    if info["rejections"]:
        print("rejections " + ", ".join(f"{k} {n}" for k, n in sorted(info["rejections"].items())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ruvdllm-coordinator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", type=Path, help="coordinator.toml")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a config key (repeatable)")
        p.add_argument("--state-dir", type=Path, help="override coordinator.state_dir")
        p.add_argument("--insecure", action="store_true",
                       help="allow plaintext SuperLink/service on a non-loopback host")
        return p

    p = command("start", "start SuperLink, the gRPC service and the federated run")
    p.add_argument("--no-run", action="store_true", help="do not submit the Flower run")
    p.add_argument("--exit-after-run", action="store_true",
                   help="stop when the run finishes (exit 1 if it failed)")
    p.set_defaults(func=cmd_start)
    p = command("enroll", "register a node's Ed25519 public key (and its SuperNode key)")
    p.add_argument("public_key", type=Path, help="node's Ed25519 public key (PEM)")
    p.add_argument("--node-id", help="node id (default: n-<sha256(key)[:16]>)")
    p.add_argument("--flower-key", type=Path, help="SuperNode OpenSSH ecdsa-sha2-nistp384 .pub")
    p.set_defaults(func=cmd_enroll)
    p = command("status", "print rounds, nodes, versions and rejections")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = command("init-tls", "make a CA and a server certificate in state_dir/tls")
    p.add_argument("--host", action="append", help="extra DNS name or IP for the certificate")
    p.set_defaults(func=cmd_init_tls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, ConfigError, StoreError, FileExistsError, PermissionError, ValueError,
            RuntimeError) as exc:  # LaunchError and the service's bind error are RuntimeErrors
        print(f"ruvdllm-coordinator {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
