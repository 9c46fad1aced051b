"""The node's ``flower-supernode`` process: command line, environment, start and stop by PID.

The SuperNode connects the node to the coordinator's SuperLink (registration, heartbeats,
messages) and spawns one ClientApp process per message; the ClientApp finds this node's
agent through the node config ``agent-address``. The process gets Flower's hygiene (DESIGN
§5): telemetry and update checks off, its own ``FLWR_HOME`` under the node's home, loopback
for its local runtime API, no runtime dependency installation (Flower's default for a
SuperNode: the flag is simply not passed), TLS and node authentication when configured.
Its output goes to ``<home>/logs/supernode.log``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from node_agent.client_app import AGENT_ADDRESS_KEY
from node_agent.config import NodeConfig

log = logging.getLogger(__name__)

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment with Flower's hygiene settings and its own FLWR_HOME."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    return env


def executable(name: str) -> str:
    """A console script next to this interpreter (the venv's), else the name for PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class Supernode:
    """One flower-supernode child process of the node agent."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.flwr_home = cfg.node.home / "flwr"
        self.log_path = cfg.node.home / "logs" / "supernode.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The flower-supernode argv for this node's config."""
        sn = self.cfg.supernode
        node_config = (f'{AGENT_ADDRESS_KEY}="{self.cfg.grpc_address}" '
                       f"partition-id={sn.partition_id} num-partitions={sn.num_partitions}")
        cmd = [executable("flower-supernode"), "--superlink", sn.superlink,
               "--host", "127.0.0.1", "--port", str(sn.port),
               "--max-wait-time", str(sn.max_wait_time_s), "--node-config", node_config]
        if sn.root_certificates is not None:
            cmd += ["--root-certificates", str(sn.root_certificates)]
        else:
            cmd.append("--insecure")
        if sn.auth_private_key is not None:
            cmd += ["--auth-supernode-private-key", str(sn.auth_private_key)]
        return cmd

    def start(self) -> int:
        """Start the process; returns its PID."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            env=flower_env(self.flwr_home),
                                            start_new_session=True)
        log.info("flower-supernode started (pid %d) toward %s, log %s", self.process.pid,
                 self.cfg.supernode.superlink, self.log_path)
        return self.process.pid

    def returncode(self) -> int | None:
        """None while running, else the exit status."""
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group it leads (it and its ClientApps), SIGKILL if it lingers."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("flower-supernode (pid %d) ignored SIGTERM for %.0f s; killing", proc.pid,
                        timeout)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.info("flower-supernode (pid %d) stopped with %s", proc.pid, proc.returncode)
