"""Start and stop a coordinator deployment: state, SuperLink, gRPC service, Flower run.

`start(cfg)` is what `ruvdllm-coordinator start` runs, and what end-to-end tests and
`ruvdllm demo` call to get PIDs and ports back:

1. state: the signing key (`state_dir/coordinator.key`, made once, mode 0600), the store,
   and version 1 (all-zero B for the configured model, rank and targets);
2. `flower-superlink` as a subprocess with its own FLWR_HOME (`state_dir/flwr`), telemetry
   and update checks off, `--disable-runtime-dependency-installation`, TLS (+ SuperNode
   authentication) when configured; ready when `GET /health` answers 200 (FLOWER_NOTES
   "Processes and ports"). Its state stays in memory (Flower's default): with a SQLite
   file, ten nodes pushing replies at once on a loaded 2-core machine outlasted SQLite's
   5 s busy timeout ("database is locked", replies lost). Nothing of ours lives there:
   runs are submitted afresh and enrolled SuperNode keys are registered again at start;
3. the gRPC Coordinator service in this process (coordinator.service);
4. `flwr run coordinator/flwr_app coordinator --run-config ...` (Flower CLI, connection
   written to `$FLWR_HOME/config.toml`), then `flwr ls --run-id N --format json` for the
   outcome, since `flwr run` exits 0 even when the ServerApp fails.

Logs: `state_dir/logs/superlink.log`.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from coordinator.adapters import ensure_initialised, lora_b_layout
from coordinator.config import CoordinatorConfig, format_run_config, run_config
from coordinator.service import ServiceServer, serve
from coordinator.store import Store
from coordinator.tls import TlsFiles
from federation import generate_key, load_private_key, save_private_key, save_public_key

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).parent / "flwr_app"
CONNECTION = "coordinator"
HEALTH_TIMEOUT_S = 60.0
FINISHED = "finished:"


class LaunchError(RuntimeError):
    """A process or Flower command of the deployment failed; the message says which."""


def flwr_env(home: Path) -> dict[str, str]:
    """Environment for every Flower process: own FLWR_HOME, no telemetry, no update check.

    The interpreter's script folder goes first on PATH, so `flower-superlink`, `flwr` and
    the helpers Flower starts by bare name (`flower-superexec`, `flwr-serverapp`) are this
    environment's scripts and not a version manager's shims (pyenv: ~0.3 s CPU each).
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": path}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for tests and demos)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int, what: str) -> None:
    """Refuse a taken port before starting anything on it.

    Without this, a SuperLink port held by another HTTP server passed the readiness probe
    (that server answered ``GET /health``) and the failure surfaced later as a 404 from
    ``flwr run``. The check cannot close the race with a process binding meanwhile.
    """
    if port == 0:
        return
    try:
        with socket.create_server((host, port),
                                  family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as err:
        raise LaunchError(f"{what} {host}:{port} is not free: {err.strerror}") from None


def prepare_state(cfg: CoordinatorConfig) -> Store:
    """Make the state folder, the signing key and version 1 if absent; open the store."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.key_file.exists():
        key = generate_key()
        save_private_key(key, cfg.key_file)
        save_public_key(key, cfg.state_dir / "coordinator.pub")
    key = load_private_key(cfg.key_file)
    store = Store(cfg.state_dir)
    try:
        ensure_initialised(store, lora_b_layout(cfg.model.name, cfg.model.rank,
                                                cfg.model.targets), key)
    except BaseException:
        store.close()
        raise
    return store


def tls_files(cfg: CoordinatorConfig) -> TlsFiles:
    """The `init-tls` material; LaunchError if a part is missing."""
    files = TlsFiles.in_folder(cfg.tls_dir)
    if missing := files.missing():
        raise LaunchError(f"TLS is on but {missing[0]} is missing; run "
                          f"`ruvdllm-coordinator init-tls --config ...` first")
    return files


def write_cli_config(cfg: CoordinatorConfig, home: Path) -> None:
    """The Flower CLI's connection to our SuperLink, named `coordinator`."""
    home.mkdir(parents=True, exist_ok=True)
    security = (f"root-certificates = {json.dumps(str(tls_files(cfg).ca_cert))}"
                if cfg.superlink.tls else "insecure = true")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{cfg.superlink_address}"\n{security}\n'
    )


def flwr_cli(home: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run a `flwr` CLI command with the deployment's FLWR_HOME; LaunchError on failure."""
    try:
        done = subprocess.run(["flwr", *args], env=flwr_env(home), capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`flwr {' '.join(args)}` did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise LaunchError(f"`flwr {args[0]}` failed ({done.returncode}): {' | '.join(tail)}")
    return done


def _json_output(done: subprocess.CompletedProcess) -> Any:
    text = done.stdout
    try:
        return json.loads(text[text.index("{"):])
    except ValueError:
        raise LaunchError(f"unexpected flwr output: {text.strip()[:200]}") from None


def start_superlink(cfg: CoordinatorConfig, home: Path) -> subprocess.Popen:
    """Start `flower-superlink` and wait until GET /health answers 200."""
    s = cfg.superlink
    cmd = ["flower-superlink", "--host", s.host, "--port", str(s.port),
           "--disable-runtime-dependency-installation"]
    if s.tls:
        files = tls_files(cfg)
        cmd += ["--ssl-ca-certfile", str(files.ca_cert), "--ssl-certfile",
                str(files.server_cert), "--ssl-keyfile", str(files.server_key)]
        cmd += ["--enable-supernode-auth"] if s.node_auth else []
    else:
        cmd.append("--insecure")
    logs = cfg.state_dir / "logs"
    logs.mkdir(exist_ok=True)
    log_path = logs / "superlink.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=flwr_env(home), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"{'https' if s.tls else 'http'}://{s.host}:{s.port}/health"
    verify: Any = str(tls_files(cfg).ca_cert) if s.tls else True
    end = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise LaunchError(f"flower-superlink exited with {proc.returncode}: "
                              f"{' | '.join(tail)} (log: {log_path})")
        try:
            if httpx.get(url, verify=verify, timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_process(proc)
    raise LaunchError(f"flower-superlink did not answer {url} within {HEALTH_TIMEOUT_S:.0f} s")


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM (Flower shuts down cleanly on it), SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def register_flower_key(cfg: CoordinatorConfig, openssh_public_key: str) -> None:
    """Register a SuperNode's EC P-384 public key (OpenSSH line) on the running SuperLink."""
    home = cfg.state_dir / "flwr"
    with tempfile.NamedTemporaryFile("w", suffix=".pub", dir=cfg.state_dir) as f:
        f.write(openssh_public_key.strip() + "\n")
        f.flush()
        flwr_cli(home, "supernode", "register", f.name, CONNECTION, "--format", "json")


def submit_run(cfg: CoordinatorConfig, home: Path) -> int:
    """Submit the ServerApp run; returns its run id."""
    done = flwr_cli(home, "run", str(APP_DIR), CONNECTION, "--run-config",
                    format_run_config(run_config(cfg)), "--format", "json")
    out = _json_output(done)
    if not out.get("success", True) or "run-id" not in out:
        raise LaunchError(f"`flwr run` did not start a run: {out}")
    return int(out["run-id"])


def run_status(home: Path, run_id: int) -> str:
    """Flower's status of a run, e.g. `running`, `finished:completed`, `finished:failed`."""
    out = _json_output(flwr_cli(home, "ls", CONNECTION, "--run-id", str(run_id),
                                "--format", "json", timeout=60.0))
    for run in out.get("runs", []):
        if int(run.get("run-id", -1)) == run_id:
            return str(run.get("status"))
    raise LaunchError(f"run {run_id} is not listed by the SuperLink")


@dataclass
class Deployment:
    """A running coordinator: SuperLink subprocess, in-process service, submitted run."""

    cfg: CoordinatorConfig
    store: Store
    superlink: subprocess.Popen
    service: ServiceServer
    run_id: int | None = None
    flwr_home: Path = field(default_factory=Path)

    @property
    def superlink_pid(self) -> int:
        return int(self.superlink.pid)

    @property
    def service_port(self) -> int:
        return self.service.port

    def status(self) -> str:
        """Flower's status of the submitted run."""
        if self.run_id is None:
            raise LaunchError("no run was submitted")
        return run_status(self.flwr_home, self.run_id)

    def wait(self, timeout: float, poll_s: float = 2.0) -> str:
        """Block until the run finishes (its final status) or `timeout` passes (LaunchError)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if (status := self.status()).startswith(FINISHED):
                return status
            if self.superlink.poll() is not None:
                raise LaunchError(f"flower-superlink exited with {self.superlink.returncode}")
            time.sleep(poll_s)
        raise LaunchError(f"run {self.run_id} still running after {timeout:.0f} s")

    def stop(self) -> None:
        """Stop the service and the SuperLink (and so the ServerApp), close the store."""
        self.service.stop()
        stop_process(self.superlink)
        self.store.close()


def start(cfg: CoordinatorConfig, *, submit: bool = True) -> Deployment:
    """Bring the deployment up (see the module docstring); stops what it started on failure."""
    store = prepare_state(cfg)
    home = cfg.state_dir / "flwr"
    superlink: subprocess.Popen | None = None
    service: ServiceServer | None = None
    try:
        check_port_free(cfg.superlink.host, cfg.superlink.port, "superlink.port")
        check_port_free(cfg.service.host, cfg.service.port, "service.port")
        write_cli_config(cfg, home)
        superlink = start_superlink(cfg, home)
        if cfg.superlink.node_auth:
            for node in store.nodes():
                if node.flower_key:
                    try:
                        register_flower_key(cfg, node.flower_key)
                    except LaunchError as exc:  # the round goes on without this node
                        logger.warning("SuperNode key of %s not registered: %s", node.node_id, exc)
        service = serve(store, cfg.service.host, cfg.service.port,
                        tls=tls_files(cfg) if cfg.service.tls else None,
                        insecure=cfg.service.insecure, max_watchers=cfg.service.max_watchers)
        deployment = Deployment(cfg, store, superlink, service, flwr_home=home)
        if submit:
            deployment.run_id = submit_run(cfg, home)
        return deployment
    except BaseException:
        if service is not None:
            service.stop()
        if superlink is not None:
            stop_process(superlink)
        store.close()
        raise
