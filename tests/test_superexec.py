"""The node's ClientApp executor as a real process: it outlives no SuperNode, refuses bad input.

That it runs ClientApp tasks is shown by every federation test (tests/test_e2e.py); these
check its own lifetime and command line.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

EXIT_WITHIN_S = 20.0  # imports of the warm process (~2 s alone, more on a loaded machine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def executor(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "node_agent.superexec", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_it_exits_when_its_supernode_is_gone() -> None:
    """With no runtime API to reach (the SuperNode never came up), it waits while the
    SuperNode's PID lives and exits cleanly once it is gone."""
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    proc = executor("--runtime-api-address", f"127.0.0.1:{free_port()}",
                    "--supernode-pid", str(stand_in.pid), "--poll", "0.05")
    try:
        time.sleep(3.0)
        assert proc.poll() is None, proc.communicate()[0]
        stand_in.kill()
        stand_in.wait()
        out, _ = proc.communicate(timeout=EXIT_WITHIN_S)
    finally:
        stand_in.kill()
        proc.kill()
    assert proc.returncode == 0, out
    assert "not reachable yet" in out and "is gone; exiting" in out


@pytest.mark.parametrize("poll", ["0", "61", "nan"])
def test_a_bad_poll_interval_is_refused(poll: str) -> None:
    proc = executor("--runtime-api-address", "127.0.0.1:1", "--supernode-pid", "1",
                    "--poll", poll)
    out, _ = proc.communicate(timeout=EXIT_WITHIN_S)
    assert proc.returncode == 2
    assert "--poll must be between 0.01 and 60 seconds" in out
