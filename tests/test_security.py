"""Security properties of issue #5 item 4 that the other test modules do not already pin.

* No plaintext listener off loopback unless ``--insecure``: coordinator (SuperLink and the
  gRPC service) and node (HTTP, gRPC, its coordinator/SuperLink links), at config load and
  through the CLIs, before anything binds.
* Private key files are created with mode 0600 whatever the umask, and loading a key that
  others can read is refused.
* A merged adapter is never rolled back: re-offering an older signed version changes
  nothing, and a signed version whose number was edited fails verification.
* Every Flower process we spawn (SuperLink, SuperExec, ServerApp, SuperNode, ClientApp) runs
  with telemetry and update checks off, read from ``/proc/<pid>/environ`` of the real
  processes during a real run.

Covered elsewhere and only listed here: delta signatures, unknown nodes, replayed nonces and
stale rounds/base versions at upload (tests/test_coordinator_service.py), at aggregation
(tests/test_strategy.py), forged or tampered merged adapters on the node
(tests/test_node_agent.py), TLS + SuperNode authentication refusing an unenrolled node with
real processes (tests/test_e2e.py).
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator import cli as coordinator_cli
from coordinator import config as coordinator_config
from coordinator.adapters import lora_b_layout
from coordinator.config import ConfigError
from coordinator.launch import free_port, prepare_state
from coordinator.launch import start as start_coordinator
from coordinator.tls import make_tls
from federation import generate_key, load_private_key, pack_adapter
from node_agent import cli as node_cli
from node_agent.adapters import AdapterError, AdapterSync
from node_agent.config import HttpSection, NodeConfigError, from_dict
from node_agent.engine import Engine
from node_agent.identity import ensure_identity
from node_agent.metrics import node_registry
from node_agent.supernode import Supernode
from ruvdllm.lora import LoRAConfig
from ruvdllm.runtime import load
from ruvdllm.talora import BANKS, TALoRA

FLOWER_HYGIENE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


# --- TLS on every non-loopback listener ------------------------------------------------------

@pytest.mark.parametrize("overrides, fragment", [
    (['superlink.host="0.0.0.0"'], "superlink.host 0.0.0.0 is not loopback"),
    (['service.host="192.0.2.7"'], "service.host 192.0.2.7 is not loopback"),
    (['service.host="::"'], "service.host :: is not loopback"),
    (['superlink.host="coord.example"'], "superlink.host coord.example"),
])
def test_coordinator_refuses_plaintext_off_loopback(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        coordinator_config.load(None, overrides)
    coordinator_config.load(None, [*overrides, "superlink.insecure=true",
                                   "service.insecure=true"])
    coordinator_config.load(None, [*overrides, "superlink.tls=true", "service.tls=true"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.8.9.10"])
def test_coordinator_loopback_needs_no_tls(host: str) -> None:
    cfg = coordinator_config.load(None, [f'superlink.host="{host}"', f'service.host="{host}"'])
    assert not cfg.superlink.tls and not cfg.service.tls


def test_coordinator_cli_refuses_before_starting_anything(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    code = coordinator_cli.main(["start", "--state-dir", str(state), "--no-run",
                                 "--set", 'superlink.host="0.0.0.0"'])
    assert code == 2
    err = capsys.readouterr().err
    assert "superlink.host 0.0.0.0 is not loopback" in err and "--insecure" in err
    assert not state.exists()  # refused before any state, key or process was made
    args = coordinator_cli.build_parser().parse_args(
        ["start", "--insecure", "--set", 'superlink.host="0.0.0.0"',
         "--set", 'service.host="0.0.0.0"'])
    cfg = coordinator_cli._config(args)
    assert cfg.superlink.insecure and cfg.service.insecure


NODE_BASE = {"supernode": {"enabled": False}}


@pytest.mark.parametrize("section, key, value, fragment", [
    ("http", "host", "0.0.0.0", "http.host 0.0.0.0 is not loopback"),
    ("grpc", "host", "10.1.2.3", "grpc.host 10.1.2.3 is not loopback"),
    ("coordinator", "address", "coord.example:9095", "coordinator coord.example:9095"),
])
def test_node_refuses_plaintext_off_loopback(tmp_path: Path, section: str, key: str,
                                             value: str, fragment: str) -> None:
    data = {**NODE_BASE, section: {key: value}}
    with pytest.raises(NodeConfigError, match=fragment):
        from_dict(data, tmp_path)
    assert from_dict(data, tmp_path, insecure=True).insecure


def test_node_https_and_superlink_tls_satisfy_the_rule(tmp_path: Path) -> None:
    files = make_tls(tmp_path / "tls")
    cfg = from_dict({"http": {"host": "0.0.0.0", "tls_certfile": str(files.server_cert),
                              "tls_keyfile": str(files.server_key)},
                     "supernode": {"superlink": "coord.example:9092",
                                   "root_certificates": str(files.ca_cert)}}, tmp_path)
    assert cfg.http_url.startswith("https://")
    with pytest.raises(NodeConfigError, match=r"superlink coord\.example:9092"):
        from_dict({"supernode": {"superlink": "coord.example:9092"}}, tmp_path)


def test_node_cli_refuses_with_one_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[http]\nhost = "0.0.0.0"\n[supernode]\nenabled = false\n')
    with pytest.raises(SystemExit) as exited:
        node_cli.main(["init", "--config", str(config)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ruvdllm-node: error: http.host 0.0.0.0") and "\n" not in err
    assert not (tmp_path / "node").exists()  # no keys were made for a refused config


# --- key files ------------------------------------------------------------------------------

@pytest.fixture
def open_umask() -> Iterator[None]:
    """Create files under umask 0, so a mode of 0600 comes from the code, not the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_private_key_is_created_0600(tmp_path: Path, open_umask: None) -> None:
    node = from_dict({"node": {"home": "node"},
                      "supernode": {"auth_private_key": "node/flower.key"}}, tmp_path)
    identity = ensure_identity(node)
    ccfg = coordinator_config.load(None, [
        f"coordinator.state_dir={json.dumps(str(tmp_path / 'coordinator'))}"])
    prepare_state(ccfg).close()
    tls = make_tls(ccfg.tls_dir)
    private = [node.node.home / "node.key", node.node.home / "flower.key", ccfg.key_file,
               ccfg.tls_dir / "ca.key", tls.server_key]
    assert {str(p): oct(mode(p)) for p in private} == {str(p): "0o600" for p in private}
    public = [identity.public_path, node.node.home / "flower.pub", tls.ca_cert,
              ccfg.state_dir / "coordinator.pub"]
    assert all(mode(p) & 0o022 == 0 for p in public)  # nobody else may rewrite them
    (node.node.home / "node.key").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_private_key(node.node.home / "node.key")


# --- no roll-back of merged adapters -----------------------------------------------------------

def test_older_or_renumbered_versions_never_replace_the_applied_one(tmp_path: Path) -> None:
    runtime = load("default", quant="int8", device="cpu")
    lora = LoRAConfig(rank=4)
    key = generate_key()
    metrics = node_registry()
    engine = Engine(runtime, HttpSection(), metrics)
    talora = TALoRA(tmp_path / "talora", runtime.model.config.d_model, lora)
    sync = AdapterSync(engine, talora, runtime.model, lora, key.public_key(),
                       channel=lambda: pytest.fail("no coordinator is needed"),
                       metrics=metrics)
    layout = lora_b_layout("default", 4)
    rng = np.random.default_rng(0)

    def version(number: int) -> object:
        banks = {b: {n: (0.01 * rng.standard_normal(s)).astype(np.float32)
                     for n, s in layout[b].shapes.items()} for b in BANKS}
        return pack_adapter(banks, version=number, round=number, parent_version=number - 1,
                            ffa_seed=7, contributors=["n"], key=key)

    v2, v3 = version(2), version(3)
    assert sync.offer(v3) and sync.applied == 3
    assert not sync.offer(v2)  # a replayed older version is verified, then ignored
    assert sync.offer(v3) is False and sync.applied == engine.adapter_version == 3
    renumbered = version(4)
    renumbered.version = 9  # type: ignore[attr-defined]
    with pytest.raises(AdapterError, match="refused"):
        sync.offer(renumbered)
    assert sync.applied == 3 and talora.global_version == 3


# --- Flower telemetry off in every process we spawn -------------------------------------------

def _children() -> dict[int, list[int]]:
    """Parent PID → child PIDs of every process now in /proc."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        out.setdefault(int(fields[1]), []).append(int(entry.name))
    return out


def process_tree(roots: list[int]) -> list[int]:
    """The PIDs of `roots` and of all their descendants now alive."""
    children, seen, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return seen


def _process(pid: int) -> tuple[str, dict[str, str]] | None:
    """(command line, environment) of a live process, None if it is gone."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
               if "=" in item)
    return cmdline.strip(), env


def test_every_spawned_flower_process_has_telemetry_off(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real run: SuperLink (+ SuperExec + ServerApp) and a SuperNode (+ our executor and
    the ClientApp it forks, named ``clientapp`` below)."""
    for name in FLOWER_HYGIENE:  # our launchers must set them, not the test's environment
        monkeypatch.delenv(name, raising=False)
    ccfg = coordinator_config.load(None, [
        f"coordinator.state_dir={json.dumps(str(tmp_path / 'coordinator'))}",
        f"superlink.port={free_port()}", f"service.port={free_port()}",
        "rounds.num_rounds=1", "rounds.min_nodes=1", "rounds.wait_nodes=30.0",
        "rounds.round_timeout=20.0", "aggregation.quorum=1"])
    node = from_dict({"node": {"home": "node"}, "grpc": {"port": free_port()},
                      "supernode": {"superlink": ccfg.superlink_address,
                                    "port": free_port(), "max_wait_time_s": 30.0}}, tmp_path)
    deployment = start_coordinator(ccfg, submit=True)
    supernode = Supernode(node)
    seen: dict[int, tuple[str, dict[str, str]]] = {}
    try:
        supernode.start()
        assert supernode.process is not None and supernode.executor is not None
        executor = supernode.executor.pid
        roots = [deployment.superlink_pid, supernode.process.pid, executor]
        end = time.monotonic() + 90
        while time.monotonic() < end:
            for pid in process_tree(roots):
                if pid not in seen and (found := _process(pid)) is not None:
                    if pid != executor and "node_agent.superexec" in found[0]:
                        found = ("clientapp forked by " + found[0], found[1])
                    seen[pid] = found
            commands = " ".join(c for c, _ in seen.values())
            if "serverapp" in commands and "clientapp" in commands:
                break
            time.sleep(0.05)
    finally:
        supernode.stop()
        deployment.stop()
    # Python processes only: a helper binary a library execs with an environment of its own
    # (ctypes.util.find_library runs `/sbin/ldconfig -p` with env {LC_ALL, LANG} only) is not
    # Flower's and reads no FLWR_ variable; seen once in a CI run (session 20).
    checked = {pid: found for pid, found in seen.items() if pid in roots or _is_python(found[0])}
    commands = [c for c, _ in checked.values()]
    for kind in ("flower-superlink", "flower-supernode", "node_agent.superexec", "serverapp",
                 "clientapp"):
        assert any(kind in c for c in commands), f"no {kind} process seen among {commands}"
    for pid, (command, env) in checked.items():
        hygiene = {k: env.get(k) for k in FLOWER_HYGIENE}
        assert hygiene == FLOWER_HYGIENE, f"pid {pid} `{command}` runs with {hygiene}"


def _is_python(command: str) -> bool:
    """Whether a command line (as recorded above) runs the Python interpreter."""
    argv0 = command.removeprefix("clientapp forked by ").split(" ", 1)[0]
    return Path(argv0).name.startswith("python")
