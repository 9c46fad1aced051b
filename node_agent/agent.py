"""The long-lived node process: model, TALoRA banks, HTTP + gRPC servers, adapter watch, SuperNode.

:class:`NodeAgent` assembles the pieces from a :class:`~node_agent.config.NodeConfig`:

    model (quantized)  ─ LoRAModel ─ GlobalPlusLocalHook (global slot per bank, mix by t,
                                            + local patterns retrieved by prompt embedding)
    Engine (one lock)  ─ HTTP API (uvicorn) and NodeAgent gRPC (Generate, TrainRound, Health)
    AdapterSync        ─ GetAdapter at start, WatchAdapters thread, verified hot swaps
    Trainer            ─ local data, learn.train_bank, encode_delta, SubmitDelta
    Supernode          ─ flower-supernode child toward the SuperLink, restarted by a
                         Supervisor thread when it exits or the coordinator restarted
                         (InstanceWatch on the coordinator channels sees a new instance id)

:meth:`NodeAgent.run` blocks in uvicorn until SIGINT/SIGTERM and then stops everything it
started, whatever the cause of the exit: the SuperNode's whole process group (SIGTERM, then
SIGKILL after a bounded wait), the gRPC server, the adapter watch. A signal that arrives
while the agent is still starting is honoured too: uvicorn is then never left running.
While it runs,
``<home>/agent.json`` names its PID, addresses and the SuperNode's PID (``ruvdllm-node
status`` and the demo read it); it is removed on exit.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import uvicorn

from federation import load_public_key, public_key_bytes
from node_agent.adapters import AdapterError, AdapterSync, GlobalPlusLocalHook
from node_agent.config import NodeConfig
from node_agent.engine import Engine
from node_agent.grpc_service import NodeAgentService, serve
from node_agent.http_api import create_app
from node_agent.identity import ensure_identity
from node_agent.local_data import LocalData
from node_agent.metrics import node_registry
from node_agent.supernode import InstanceWatch, Supernode, Supervisor
from node_agent.trainer import Trainer
from node_agent.transport import coordinator_channel
from proto import ruvdllm_pb2 as pb
from ruvdllm.lora import LoRAConfig, LoRAModel
from ruvdllm.runtime import load
from ruvdllm.talora import TALoRA

log = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"
STATE_FILE = "agent.json"
LOCK_FILE = "agent.lock"
GRPC_GRACE_S = 2.0
WATCH_JOIN_S = 2.0
SUPERVISOR_JOIN_S = 30.0  # a restart under way: SuperNode stop (≤ 10 s + kill) and start


def state_path(cfg: NodeConfig) -> Path:
    """Where a running agent describes itself."""
    return cfg.node.home / STATE_FILE


def lock_home(home: Path) -> int:
    """Hold ``<home>/agent.lock`` for this process (the returned descriptor; close it to let go).

    Two agents on one home would share keys, TALoRA store, agent.json and SuperNode
    state, and gRPC would even let both bind one port; the second is refused here.
    """
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OSError(f"another node agent (pid {holder}) is running with home {home}; stop "
                      "it or give this one its own home") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket for the HTTP API, bound before anything else starts."""
    try:
        return socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {err.strerror}") from None


class NodeAgent:
    """One node; build it, then :meth:`run` it. See the module docstring."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.started = time.time()
        identity = ensure_identity(cfg)
        cfg.node.id = identity.node_id
        self.identity = identity
        if not cfg.coordinator.public_key.exists():
            raise FileNotFoundError(f"coordinator public key {cfg.coordinator.public_key} is "
                                    "missing: merged adapters could not be verified")
        coordinator_key = load_public_key(cfg.coordinator.public_key)
        self.metrics = node_registry()
        self.metrics.describe("supernode_restarts_total", "counter",
                              "flower-supernode restarts (it exited, or the coordinator did)")
        quant = None if cfg.model.quant == "none" else cfg.model.quant
        self.runtime = load(cfg.model.path, quant=quant, group_size=cfg.model.group_size,
                            device="cpu")
        model = self.runtime.model
        if model.config.causal:
            raise ValueError(f"model.path {cfg.model.path}: a causal model (an AR twin); a node "
                             "serves and adapts a masked-diffusion model")
        self.model_id = f"ruvdllm-{Path(cfg.model.path).name}-{cfg.model.quant}"
        lora = LoRAConfig(rank=cfg.training.rank, alpha=cfg.training.alpha)
        root = cfg.node.home / "talora"
        self.talora = (TALoRA.load(root) if (root / "CURRENT").exists()
                       else TALoRA(root, model.config.d_model, lora))
        if self.talora.lora != lora:
            raise ValueError(f"TALoRA store {root} was made with {self.talora.lora}, the config "
                             f"asks for {lora}")
        hook = GlobalPlusLocalHook(self.talora, LoRAModel(model, lora))
        self.runtime.sampler.hooks.append(hook)
        self.engine = Engine(self.runtime, cfg.http, self.metrics, patterns=hook)
        self.data = LocalData(cfg.node.data_dir)
        self._stop = threading.Event()
        self.supernode = Supernode(cfg) if cfg.supernode.enabled else None
        self.supervisor = (Supervisor(self.supernode, self._stop, self._supernode_restarted)
                           if self.supernode is not None else None)
        self.instances = InstanceWatch(self._coordinator_restarted)
        coord = cfg.coordinator
        self.adapters = AdapterSync(
            self.engine, self.talora, model, lora, coordinator_key,
            lambda: grpc.intercept_channel(
                coordinator_channel(coord.address, coord.root_certificates,
                                    insecure=cfg.insecure), self.instances),
            self.metrics, coord.timeout_s)
        self.trainer = Trainer(cfg, model=model, tokenizer=self.runtime.tokenizer, lora=lora,
                               adapters=self.adapters, data=self.data, key=identity.key,
                               metrics=self.metrics)
        self.service = NodeAgentService(self.engine, self.trainer, self.metrics, self.node_info)
        self.app = create_app(self.engine, model_id=self.model_id, data=self.data,
                              metrics=self.metrics, health=self.health)

    def _coordinator_restarted(self, old: str, new: str) -> None:
        """A coordinator answer came from a new instance: its SuperLink forgot our SuperNode."""
        log.warning("coordinator instance changed %s -> %s", old[:8], new[:8])
        if self.supervisor is not None:
            self.supervisor.coordinator_restarted(old, new)

    def _supernode_restarted(self, pid: int) -> None:
        self.metrics.inc("supernode_restarts_total")
        self._write_state()

    def node_info(self) -> pb.NodeInfo:
        return pb.NodeInfo(node_id=self.cfg.node.id,
                           public_key=public_key_bytes(self.identity.key),
                           model_id=self.model_id, adapter_version=self.adapters.applied,
                           software_version=SOFTWARE_VERSION)

    def health(self) -> dict[str, Any]:
        """The /health body: serving state, identity, adapter and round, SuperNode state."""
        supernode: str | int | None = None
        if self.supernode is not None:
            code = self.supernode.returncode()
            supernode = "running" if code is None else code
        restarts = self.supervisor.restarts if self.supervisor is not None else 0
        return {"status": "ok", "node_id": self.cfg.node.id, "model": self.model_id,
                "adapter_version": self.adapters.applied,
                "last_round": self.trainer.last_round,
                "uptime_s": round(time.time() - self.started, 1), "supernode": supernode,
                "supernode_restarts": restarts}

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "node_id": self.cfg.node.id, "http": self.cfg.http_url,
                 "grpc": self.cfg.grpc_address, "started_unix": self.started,
                 "supernode_pid": (self.supernode.process.pid if self.supernode is not None
                                   and self.supernode.process is not None else None)}
        path = state_path(self.cfg)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(path)

    def _first_sync(self) -> None:
        try:
            version = self.adapters.refresh()
            log.info("adapter version %d applied at start", version)
        except AdapterError as err:
            log.warning("no merged adapter at start (%s); serving version %d until one is "
                        "announced", err, self.adapters.applied)

    def _on_signal(self, number: int, frame: object) -> None:
        """SIGINT/SIGTERM: ask :meth:`run` to stop (it wakes uvicorn up and cleans up)."""
        if self._stop.is_set():
            log.warning("%s while stopping: the clean-up already under way is bounded",
                        signal.Signals(number).name)
        self._stop.set()

    def _exit_when_stopped(self, server: uvicorn.Server) -> None:
        """Tell uvicorn to exit once a stop is asked, however it was asked (a signal may
        land before uvicorn installs its own handlers)."""
        self._stop.wait()
        server.should_exit = True

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM; stops the servers, watcher and SuperNode on exit.

        Call it from the main thread (signal handlers and the SuperNode's death signal).
        A second agent on the same home, or a port already taken, is refused (OSError)
        before anything is started or written.
        """
        lock = lock_home(self.cfg.node.home)
        try:
            self._run()
        finally:
            os.close(lock)

    def _run(self) -> None:
        cfg = self.cfg
        grpc_server = None
        watcher = supervisor = None
        http_socket = listen(cfg.http.host, cfg.http.port)
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            grpc_server, _ = serve(self.service, cfg.grpc_address)
            self.trainer.text_key()  # the local text's pattern key, outside any round
            self._first_sync()
            if cfg.coordinator.watch:
                watcher = threading.Thread(target=self.adapters.watch, args=(self._stop,),
                                           name="adapter-watch", daemon=True)
                watcher.start()
            if self.supernode is not None and self.supervisor is not None:
                self.supernode.start()
                supervisor = threading.Thread(target=self.supervisor.run,
                                              name="supernode-supervisor", daemon=True)
                supervisor.start()
            self._write_state()
            ssl = {}
            if cfg.http.tls_certfile is not None:
                ssl = {"ssl_certfile": str(cfg.http.tls_certfile),
                       "ssl_keyfile": str(cfg.http.tls_keyfile)}
            server = uvicorn.Server(uvicorn.Config(
                self.app, host=cfg.http.host, port=cfg.http.port, log_level="warning",
                timeout_graceful_shutdown=5, **ssl))  # type: ignore[arg-type]
            log.info("node %s serving %s on %s (gRPC %s)", cfg.node.id, self.model_id,
                     cfg.http_url, cfg.grpc_address)
            # uvicorn handles SIGINT/SIGTERM itself while it runs, then re-raises the signal
            # to the handler found at start (_on_signal); a stop asked before that wakes it
            # through _exit_when_stopped.
            threading.Thread(target=self._exit_when_stopped, args=(server,),
                             name="stop-watch", daemon=True).start()
            server.run(sockets=[http_socket])
        finally:
            http_socket.close()
            self._stop.set()
            self.adapters.close()
            if supervisor is not None:  # no restart may race the stop below
                supervisor.join(timeout=SUPERVISOR_JOIN_S)
            if self.supernode is not None:
                self.supernode.stop()
            if grpc_server is not None:
                grpc_server.stop(grace=GRPC_GRACE_S).wait()
            if watcher is not None:
                watcher.join(timeout=WATCH_JOIN_S)
            state_path(cfg).unlink(missing_ok=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("node %s stopped", cfg.node.id)
