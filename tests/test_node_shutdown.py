"""A node agent's children die with it: real processes on 127.0.0.1.

One coordinator (SuperLink + service) and one ``ruvdllm-node start`` process whose
``flower-supernode`` child has registered and started its own SuperExec child. The agent is
then stopped by SIGTERM, by SIGINT or killed outright (SIGKILL: no clean-up code runs, the
kernel's death signal must do it), and every process that descended from it must be gone
within a bounded time. Process trees are read from /proc (Linux only, like the death signal).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.loopback import LoopbackFederation, NodeProcess, NodeSpec, Settings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc; PR_SET_PDEATHSIG is Linux-only")

TEXT = "The scheduler picks the next task to run on each CPU. " * 20
GONE_WITHIN_S = 25.0  # agent clean-up (SuperNode group: <= 10 s SIGTERM grace) + margin
SUPEREXEC_WITHIN_S = 60.0


def _parents() -> dict[int, int]:
    """pid -> ppid of every live (not zombie) process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    parents = _parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return pids & set(_parents())


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[LoopbackFederation]:
    fed = LoopbackFederation(tmp_path, [NodeSpec("solo", [TEXT])], Settings(rounds=1))
    with fed:
        yield fed


def wait_for_superexec(node: NodeProcess) -> set[int]:
    """The agent's descendants once it has started its SuperNode's executor."""
    end = time.monotonic() + SUPEREXEC_WITHIN_S
    while time.monotonic() < end:
        below = descendants(node.process.pid)
        if any("node_agent.superexec" in command(p) for p in below):
            return below
        time.sleep(0.5)
    raise AssertionError(f"no executor below the agent after {SUPEREXEC_WITHIN_S} s: "
                         f"{[command(p) for p in descendants(node.process.pid)]}")


def wait_gone(pids: set[int], timeout: float = GONE_WITHIN_S) -> set[int]:
    end = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < end:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("sig", [
    signal.SIGTERM,
    signal.SIGKILL,
    pytest.param(signal.SIGINT, marks=pytest.mark.slow),  # the same handler as SIGTERM
], ids=lambda sig: sig.name)
def test_every_child_of_the_agent_dies_with_it(federation: LoopbackFederation,
                                               sig: signal.Signals) -> None:
    node = federation.nodes[0]
    children = wait_for_superexec(node)
    commands = " ".join(command(p) for p in children)
    assert "flower-supernode" in commands and "node_agent.superexec" in commands
    os.kill(node.process.pid, sig)
    node.process.wait(GONE_WITHIN_S)
    left = wait_gone(children)
    assert not left, f"survived {sig.name}: {[command(p) for p in left]}"
    if sig != signal.SIGKILL:  # a clean stop also removes the agent's state file
        assert node.process.returncode == 0
        assert not (node.cfg.node.home / "agent.json").exists()


def test_sigterm_to_a_harness_user_stops_its_federation(tmp_path: Path) -> None:
    """SIGTERM to a process inside ``with LoopbackFederation`` stops everything it started.

    Before the harness turned SIGTERM into SystemExit, a killed ``ruvdllm-bench`` left
    its coordinator and node agents running.
    """
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from node_agent.loopback import LoopbackFederation, NodeSpec, Settings\n"
        f"spec = NodeSpec('n0', [{TEXT!r}])\n"
        "with LoopbackFederation(Path(sys.argv[1]), [spec], Settings(rounds=1)):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n"
    )
    user = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    children: set[int] = set()
    try:
        assert user.stdout is not None and user.stdout.readline().strip() == "ready"
        children = descendants(user.pid)
        assert children, "the harness started no process"
        user.send_signal(signal.SIGTERM)
        assert user.wait(timeout=GONE_WITHIN_S + 30) == 128 + signal.SIGTERM
        left = wait_gone(children)
        assert not left, f"survived SIGTERM to the harness: {[command(p) for p in left]}"
    finally:
        user.kill()
        for pid in alive(children):
            os.kill(pid, signal.SIGKILL)
