"""The node's ``flower-supernode`` process: command line, environment, start and stop by PID.

The SuperNode connects the node to the coordinator's SuperLink (registration, heartbeats,
messages). It runs in Flower's ``--isolation process`` mode with our executor beside it
(:mod:`node_agent.superexec`), which forks one ClientApp per message from a warm process;
the ClientApp finds this node's agent through the node config ``agent-address``. Both
processes get Flower's hygiene (DESIGN §5): telemetry and update checks off, their own
``FLWR_HOME`` under the node's home, loopback for the local runtime API, no runtime
dependency installation, TLS and node authentication toward the SuperLink when configured.
Their output goes to ``<home>/logs/supernode.log`` and ``<home>/logs/superexec.log``.

The SuperNode leads its own process group, which the executor and its ClientApp children
join. :meth:`Supernode.stop` sends SIGTERM to the group and waits until every member is
gone, not just the SuperNode, then SIGKILLs what is left. On Linux both are also started
with ``PR_SET_PDEATHSIG`` = SIGTERM, so they shut down even when the agent is killed
without a chance to clean up.

:class:`Supervisor` keeps the SuperNode connected. flwr 1.41's SuperNode does not recover
from a restarted SuperLink: the new SuperLink (its state is in memory) answers the old
node's heartbeats and pulls with 401 and the SuperNode only logs "Connection attempt
failed, retrying", forever. So the agent restarts it (same key, same port) when

* the coordinator is a new instance: every Coordinator gRPC answer carries the id of the
  service's start (``INSTANCE_KEY``); :class:`InstanceWatch`, an interceptor on the agent's
  coordinator channels, sees it change when the adapter watch reconnects after the restart
  (the coordinator starts its service only once its SuperLink is up with the enrolled keys
  registered, so the new SuperNode can register at once);
* or the SuperNode or its executor exited.

Restarts in a row wait 0, 1, 2, 5, 10, then 30 s, and one after an exit at least
``EXIT_DELAY_S`` (Flower gives up on an unreachable or refusing SuperLink, e.g. an
unenrolled node, after its own retries; meanwhile ``/health`` shows the exit status); a
SuperNode that stayed up for ``STABLE_S`` resets the count. Every Flower error exits with
status 1 (the Flower code, e.g. ``Exit Code: 305``, is only in its log), so exits are not
told apart: a misconfigured SuperNode is retried every ~35 s, and a refused one joins once
its key is enrolled. Each restart is logged with its reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from node_agent.client_app import AGENT_ADDRESS_KEY
from node_agent.config import NodeConfig

log = logging.getLogger(__name__)

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
STOP_TIMEOUT_S = 10.0  # SIGTERM grace for the whole group (Flower's children: 5-8 s)
INSTANCE_KEY = "ruvdllm-coordinator-instance"  # coordinator.service.INSTANCE_KEY
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # waits before restarts in a row
EXIT_DELAY_S = 5.0  # least wait before restarting a SuperNode that exited
STABLE_S = 60.0  # a SuperNode up this long has recovered: the next restart waits nothing
SUPERVISE_POLL_S = 1.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Run in the child before flower-supernode: have Linux send it SIGTERM when the thread that
# started it exits (the setting survives exec), give up if the agent is already gone, exec.
EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment with Flower's hygiene settings and its own FLWR_HOME.

    The interpreter's script folder goes first on PATH: Flower starts its helpers by bare
    name (``flower-superexec``, and ``flwr-clientapp`` once per message), and a version
    manager's shim found first on PATH (pyenv) costs about 0.3 s of CPU per process.
    """
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group ``pgid``.

    Read from /proc on Linux; elsewhere ``[pgid]`` while ``killpg(pgid, 0)`` finds any.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ")"
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


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
        self.superexec_log_path = cfg.node.home / "logs" / "superexec.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.executor: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The flower-supernode argv for this node's config."""
        sn = self.cfg.supernode
        node_config = (f'{AGENT_ADDRESS_KEY}="{self.cfg.grpc_address}" '
                       f"partition-id={sn.partition_id} num-partitions={sn.num_partitions}")
        cmd = [executable("flower-supernode"), "--superlink", sn.superlink,
               "--host", "127.0.0.1", "--port", str(sn.port), "--isolation", "process",
               "--max-wait-time", str(sn.max_wait_time_s), "--node-config", node_config]
        if sn.root_certificates is not None:
            cmd += ["--root-certificates", str(sn.root_certificates)]
        else:
            cmd.append("--insecure")
        if sn.auth_private_key is not None:
            cmd += ["--auth-supernode-private-key", str(sn.auth_private_key)]
        return cmd

    def superexec_command(self, supernode_pid: int) -> list[str]:
        """The argv of the SuperNode's ClientApp executor (:mod:`node_agent.superexec`)."""
        return [sys.executable, "-m", "node_agent.superexec", "--runtime-api-address",
                f"127.0.0.1:{self.cfg.supernode.port}", "--supernode-pid", str(supernode_pid)]

    def _spawn(self, cmd: list[str], log_path: Path, group: int | None) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with Flower's environment, output to ``log_path``, in process group
        ``group`` (a new one that it leads when None; within the agent's session, since a
        process may only join a group of its own session) and, on Linux, with the agent's
        death signal."""
        if sys.platform.startswith("linux"):
            cmd = [sys.executable, "-c", EXEC_WITH_PDEATHSIG, str(os.getpid()), *cmd]
        with open(log_path, "ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=flower_env(self.flwr_home),
                                    process_group=0 if group is None else group)

    def start(self) -> int:
        """Start the SuperNode in a new process group, and its executor in the same group;
        returns the SuperNode's PID.

        Call it from the thread that lives as long as the agent (the main thread): Linux
        sends the death signal when the thread that started the child exits.
        """
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = self._spawn(self.command(), self.log_path, None)
        self.executor = self._spawn(self.superexec_command(self.process.pid),
                                    self.superexec_log_path, self.process.pid)
        log.info("flower-supernode started (pid %d, executor %d) toward %s, log %s",
                 self.process.pid, self.executor.pid, self.cfg.supernode.superlink,
                 self.log_path)
        return self.process.pid

    def returncode(self) -> int | None:
        """None while the SuperNode and its executor run, else the first exit status seen."""
        for proc in (self.process, self.executor):
            code = None if proc is None else proc.poll()
            if code is not None:
                return code
        return None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM its process group; SIGKILL whatever is left of it after ``timeout`` s.

        Returns once the SuperNode and its executor are reaped and no member of their group
        is alive.
        """
        proc = self.process
        if proc is None:
            return
        pgid = proc.pid  # the SuperNode leads its group
        if proc.poll() is None or group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while (proc.poll() is None or group_members(pgid)) and time.monotonic() < end:
            time.sleep(0.1)
        left = group_members(pgid)
        if proc.poll() is None or left:
            log.warning("flower-supernode group %d still had %s after SIGTERM and %.0f s; "
                        "killing", pgid, left or [pgid], timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait()
        if self.executor is not None:
            self.executor.wait()  # already gone with the group: only reaped here
        log.info("flower-supernode (pid %d) stopped with %s", proc.pid, proc.returncode)


class InstanceWatch(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Reads the coordinator instance id from each answer; calls ``on_change(old, new)`` when
    it differs from the one seen before. Wrap a channel with ``grpc.intercept_channel``."""

    def __init__(self, on_change: Callable[[str, str], None]) -> None:
        self.on_change = on_change
        self.instance: str | None = None
        self._lock = threading.Lock()

    def _seen(self, call: Any) -> None:
        metadata = call.initial_metadata() or ()  # None when the call failed before headers
        value = dict(metadata).get(INSTANCE_KEY)
        if not isinstance(value, str):
            return
        with self._lock:
            old, self.instance = self.instance, value
        if old is not None and old != value:
            self.on_change(old, value)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                              request: Any) -> Any:
        call = continuation(client_call_details, request)
        self._seen(call)
        return call

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any,
                               request: Any) -> Any:
        call = continuation(client_call_details, request)
        self._seen(call)  # the coordinator sends the id as the stream opens
        return call


class Supervisor:
    """Restarts the SuperNode when it exits or the coordinator restarted; run :meth:`run` in
    a thread that lives as long as the agent (it starts the SuperNodes, see
    :meth:`Supernode.start`)."""

    def __init__(self, supernode: Supernode, stop: threading.Event,
                 on_restart: Callable[[int], None] = lambda pid: None,
                 poll_s: float = SUPERVISE_POLL_S) -> None:
        self.supernode, self.stop, self.on_restart, self.poll_s = (supernode, stop, on_restart,
                                                                   poll_s)
        self.restarts = 0
        self._in_a_row = 0
        self._started = time.monotonic()
        self._reason: str | None = None
        self._wake = threading.Event()

    def coordinator_restarted(self, old: str, new: str) -> None:
        """InstanceWatch's callback: ask for a restart (done in the supervisor's thread)."""
        self._reason = f"coordinator restarted (instance {old[:8]} -> {new[:8]})"
        self._wake.set()

    def run(self) -> None:
        """Until ``stop`` is set: restart the SuperNode whenever there is a reason to."""
        while not self.stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            reason, self._reason = self._reason, None
            code = self.supernode.returncode()
            least = 0.0
            if reason is None and code is not None:
                reason = (f"flower-supernode or its executor exited with {code} "
                          f"(logs: {self.supernode.log_path.parent})")
                least = EXIT_DELAY_S
            if reason is not None and not self.stop.is_set():
                self._restart(reason, least)

    def _restart(self, reason: str, least: float) -> None:
        if time.monotonic() - self._started >= STABLE_S:
            self._in_a_row = 0
        delay = max(least, RESTART_BACKOFF_S[min(self._in_a_row, len(RESTART_BACKOFF_S) - 1)])
        self._in_a_row += 1
        log.warning("restarting flower-supernode in %.0f s: %s", delay, reason)
        if self.stop.wait(delay):
            return
        self._reason = None  # the SuperNode started now meets the coordinator of now
        self.supernode.stop()
        pid = self.supernode.start()
        self._started = time.monotonic()
        self.restarts += 1
        self.on_restart(pid)
