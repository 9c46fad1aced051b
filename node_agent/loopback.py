"""A whole federation on 127.0.0.1: a coordinator and N node processes, stopped by PID.

What ``ruvdllm demo``, the end-to-end tests and ``bench/federation.py`` run. Everything
is real: the coordinator deployment of :mod:`coordinator.launch` (``flower-superlink``
subprocess, the gRPC Coordinator service, the Flower run), and per node a ``ruvdllm-node
start`` process (``python -m node_agent.cli``) with its own ``flower-supernode`` child.
Every port is a free one picked at start; every process gets Flower's hygiene environment
and its own ``FLWR_HOME``; every node has its own folder under ``root`` (config, keys,
local text, TALoRA store, logs).

:class:`LoopbackFederation` is a context manager: leaving it — normally, on an error or on
Ctrl-C — stops every node (SIGTERM to the PID it started, which stops its own SuperNode
group; SIGKILL after a grace period) and then the coordinator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from coordinator import config as coordinator_config
from coordinator.launch import Deployment, free_port, prepare_state
from coordinator.launch import start as start_coordinator
from coordinator.store import ParticipantRow, RejectionRow, RoundRow
from coordinator.tls import TlsFiles, make_tls
from federation import public_key_bytes
from node_agent.agent import state_path
from node_agent.config import NodeConfig, load_config
from node_agent.identity import ensure_identity
from node_agent.supernode import STOP_TIMEOUT_S, flower_env, group_members

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 180.0
STOP_GRACE_S = 20.0


class FederationError(RuntimeError):
    """A process of the loopback federation failed to start or to finish in time."""


@dataclass
class NodeSpec:
    """One node: its name, local texts, and whether it misbehaves or is left unenrolled."""

    name: str
    texts: list[str]
    byzantine: str = ""
    enrolled: bool = True


@dataclass
class Settings:
    """Round and training settings of the run (coordinator config keys where they exist)."""

    rounds: int = 2
    local_steps: int = 4
    learning_rate: float = 5e-3
    density: float = 0.05
    clip_norm: float = 3.0
    max_norm: float = 10.0
    round_timeout: float = 180.0
    byzantine_f: int | None = None  # None: DAF's automatic f (the coordinator's default)
    quorum: int = 2
    seq_len: int = 64
    batch_size: int = 4
    tls: bool = False
    node_auth: bool = False
    rules: dict[str, str] = field(default_factory=dict)  # bank -> aggregation rule


@dataclass
class NodeProcess:
    """A started node: its spec, config, process and log file."""

    spec: NodeSpec
    cfg: NodeConfig
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def node_id(self) -> str:
        return self.cfg.node.id


def _write_texts(folder: Path, texts: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:04d}.txt").write_text(text, "utf-8")


def _exit_on_signal(signum: int, frame: object) -> None:
    """Raise SystemExit(128 + signum), the exit status a shell reports for that signal."""
    sys.exit(128 + signum)


class LoopbackFederation:
    """Coordinator + nodes on loopback under ``root``; see the module docstring."""

    def __init__(self, root: Path, nodes: list[NodeSpec], settings: Settings | None = None,
                 *, threads_per_node: int | None = None) -> None:
        if len({n.name for n in nodes}) != len(nodes):
            raise ValueError("node names must be unique")
        self.root = root
        self.specs = nodes
        self.settings = settings or Settings()
        self.threads = threads_per_node or max(1, (os.cpu_count() or 1) // max(1, len(nodes)))
        self.deployment: Deployment | None = None
        self.nodes: list[NodeProcess] = []
        s = self.settings
        overrides = [
            f"coordinator.state_dir={json.dumps(str(root / 'coordinator'))}",
            f"superlink.port={free_port()}", f"service.port={free_port()}",
            f"superlink.tls={str(s.tls).lower()}", f"service.tls={str(s.tls).lower()}",
            f"superlink.node_auth={str(s.node_auth).lower()}",
            f"rounds.num_rounds={s.rounds}", f"rounds.local_steps={s.local_steps}",
            f"rounds.learning_rate={s.learning_rate}", f"rounds.density={s.density}",
            f"rounds.clip_norm={s.clip_norm}", f"rounds.round_timeout={s.round_timeout}",
            f"rounds.min_nodes={sum(n.enrolled for n in nodes)}", "rounds.wait_nodes=120.0",
            f"aggregation.byzantine_f={'auto' if s.byzantine_f is None else s.byzantine_f}",
            f"aggregation.quorum={s.quorum}",
            f"aggregation.max_norm={s.max_norm}",
            *(f"aggregation.{bank}={rule}" for bank, rule in s.rules.items()),
        ]
        self.coordinator_cfg = coordinator_config.load(None, overrides)

    # --- set-up ---------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.coordinator_cfg.state_dir

    def _node_config(self, spec: NodeSpec) -> NodeConfig:
        home = self.root / spec.name
        s, c = self.settings, self.coordinator_cfg
        ca = str(TlsFiles.in_folder(c.tls_dir).ca_cert) if s.tls else ""
        text = f"""# {spec.name}: written by node_agent.loopback
[node]
id = "{spec.name}"
home = "."
data_dir = "data"

[model]
path = "default"
quant = "int8"

[http]
port = {free_port()}

[grpc]
port = {free_port()}

[coordinator]
address = "{c.service_address}"
public_key = {json.dumps(str(self.state_dir / "coordinator.pub"))}
root_certificates = {json.dumps(ca)}

[supernode]
superlink = "{c.superlink_address}"
port = {free_port()}
root_certificates = {json.dumps(ca)}
auth_private_key = "{'flower.key' if s.node_auth else ''}"
max_wait_time_s = 30.0

[training]
seq_len = {s.seq_len}
batch_size = {s.batch_size}
byzantine = "{spec.byzantine}"
"""
        home.mkdir(parents=True, exist_ok=True)
        (home / "node.toml").write_text(text)
        _write_texts(home / "data", spec.texts)
        return load_config(home / "node.toml")

    def prepare(self) -> list[NodeConfig]:
        """Coordinator state (key, version 1, TLS), node folders, keys and enrollment."""
        if self.settings.tls and not TlsFiles.in_folder(self.coordinator_cfg.tls_dir).ca_cert \
                .exists():
            make_tls(self.coordinator_cfg.tls_dir)
        store = prepare_state(self.coordinator_cfg)
        configs = []
        try:
            for spec in self.specs:
                cfg = self._node_config(spec)
                identity = ensure_identity(cfg)
                if spec.enrolled:
                    flower = (identity.flower_public_path.read_text().strip()
                              if identity.flower_public_path is not None else None)
                    store.enroll(identity.node_id, public_key_bytes(identity.key), flower)
                configs.append(cfg)
        finally:
            store.close()
        return configs

    # --- processes ------------------------------------------------------------------------

    def start(self) -> None:
        """Prepare, start the coordinator (no run yet) and every node; wait until all serve."""
        configs = self.prepare()
        self.deployment = start_coordinator(self.coordinator_cfg, submit=False)
        log.info("coordinator up: SuperLink pid %d on %s, service on %s",
                 self.deployment.superlink_pid, self.coordinator_cfg.superlink_address,
                 self.coordinator_cfg.service_address)
        self.start_nodes(configs)

    def start_nodes(self, configs: list[NodeConfig]) -> None:
        """Start one agent per spec with the configs of :meth:`prepare`; wait until all serve
        (their coordinator may be one this harness did not start, as in the fault tests)."""
        for spec, cfg in zip(self.specs, configs, strict=True):
            self.nodes.append(self._start_node(spec, cfg))
        for node in self.nodes:
            self._wait_ready(node)

    def _start_node(self, spec: NodeSpec, cfg: NodeConfig) -> NodeProcess:
        assert cfg.source is not None
        env = flower_env(cfg.node.home / "flwr")
        env["OMP_NUM_THREADS"] = str(self.threads)
        log_path = cfg.node.home / "logs" / "agent.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "node_agent.cli", "start", "--config", str(cfg.source)]
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("node %s started (pid %d), log %s", spec.name, proc.pid, log_path)
        return NodeProcess(spec, cfg, proc, log_path)

    def _wait_ready(self, node: NodeProcess) -> None:
        end = time.monotonic() + READY_TIMEOUT_S
        url = f"{node.cfg.http_url}/health"
        while time.monotonic() < end:
            if node.process.poll() is not None:
                tail = node.log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise FederationError(f"node {node.spec.name} exited with "
                                      f"{node.process.returncode}: {' | '.join(tail)}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise FederationError(f"node {node.spec.name} did not answer {url} within "
                              f"{READY_TIMEOUT_S:.0f} s (log {node.log_path})")

    def run_rounds(self, timeout: float) -> str:
        """Submit the Flower run and wait for its final status (``finished:...``)."""
        if self.deployment is None:
            raise FederationError("start() the federation first")
        from coordinator.launch import submit_run

        self.deployment.run_id = submit_run(self.coordinator_cfg, self.deployment.flwr_home)
        return self.deployment.wait(timeout)

    def health(self, node: NodeProcess) -> dict[str, Any]:
        """A node's /health body."""
        body: dict[str, Any] = httpx.get(f"{node.cfg.http_url}/health", timeout=10.0).json()
        return body

    def wait_for_version(self, version: int, timeout: float = 60.0) -> None:
        """Until every enrolled node serves ``version`` (they follow WatchAdapters)."""
        end = time.monotonic() + timeout
        pending = [n for n in self.nodes if n.spec.enrolled]
        while pending and time.monotonic() < end:
            pending = [n for n in pending if self.health(n)["adapter_version"] < version]
            time.sleep(0.5)
        if pending:
            raise FederationError(f"nodes {[n.spec.name for n in pending]} are not on "
                                  f"version {version} after {timeout:.0f} s")

    # --- results --------------------------------------------------------------------------

    def rounds(self) -> list[RoundRow]:
        assert self.deployment is not None
        return self.deployment.store.rounds()

    def participants(self, round_number: int) -> list[ParticipantRow]:
        assert self.deployment is not None
        return self.deployment.store.participants(round_number)

    def rejections(self, round_number: int | None = None) -> list[RejectionRow]:
        assert self.deployment is not None
        return self.deployment.store.rejections(round_number)

    def latest_version(self) -> int:
        assert self.deployment is not None
        row = self.deployment.store.latest_version()
        return 0 if row is None else row.version

    # --- teardown -------------------------------------------------------------------------

    def _stop_nodes(self) -> None:
        """SIGTERM every agent at once (each stops its SuperNode group), wait for them,
        SIGKILL those still running after the grace period.

        A SIGKILLed agent's SuperNode gets its death signal (SIGTERM) from the kernel; a
        SuperNode group still alive after that is a bug, logged and killed.
        """
        supernodes: dict[str, int] = {}
        for node in self.nodes:
            state = state_path(node.cfg)
            if state.exists():
                pid = json.loads(state.read_text()).get("supernode_pid")
                if pid is not None:
                    supernodes[node.spec.name] = int(pid)
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE_S
        for node in self.nodes:
            proc = node.process
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("node %s (pid %d) ignored SIGTERM; killing", node.spec.name,
                            proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        end = time.monotonic() + STOP_TIMEOUT_S
        for name, pgid in supernodes.items():
            while (left := group_members(pgid)) and time.monotonic() < end:
                time.sleep(0.2)
            if left:
                log.warning("node %s left its SuperNode group %d behind (%s); killing", name,
                            pgid, left)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop every node, then the coordinator; safe to call twice."""
        self._stop_nodes()
        if self.deployment is not None:
            self.deployment.stop()
            self.deployment = None

    def __enter__(self) -> LoopbackFederation:
        # SIGTERM's default action ends the interpreter without unwinding, which left the
        # coordinator and node agents of a killed `ruvdllm-bench` running: turn it into
        # SystemExit so that __exit__ stops them (main thread only, where handlers live).
        self._sigterm: Any = None
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            self.start()
        except BaseException:
            self._stop_and_restore()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop_and_restore()

    def _stop_and_restore(self) -> None:
        try:
            self.stop()
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
                self._sigterm = None
