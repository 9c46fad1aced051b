"""The node agent's SuperNode supervision: a new coordinator instance or a SuperNode that
exited leads to a logged restart (flwr 1.41's SuperNode never re-registers by itself).

The SuperNode here is a stand-in (`sleep`) started and stopped by PID through the real
:class:`Supernode` code paths; tests/test_faults.py restarts a real coordinator under real
SuperNodes (slow).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from coordinator.service import serve
from node_agent import supernode as sn
from node_agent.config import load_config
from proto import ruvdllm_pb2 as pb
from proto import ruvdllm_pb2_grpc as pb_grpc
from tests.test_coordinator_kit import make_federation


class SleepingSupernode(sn.Supernode):
    """A Supernode whose process is `sleep 60`, so start/stop/returncode are the real ones."""

    def command(self) -> list[str]:
        return ["sleep", "60"]


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "not within the timeout"
        time.sleep(0.05)


@pytest.fixture
def supervised(tmp_path: Path):
    (tmp_path / "node.toml").write_text('[node]\nid = "alice"\nhome = "."\n')
    node = SleepingSupernode(load_config(tmp_path / "node.toml"))
    node.start()
    stop = threading.Event()
    pids: list[int] = []
    supervisor = sn.Supervisor(node, stop, pids.append, poll_s=0.05)
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    yield node, supervisor, pids
    stop.set()
    thread.join(10)
    node.stop()


def test_a_new_coordinator_instance_restarts_the_supernode(tmp_path, supervised, caplog):
    node, supervisor, pids = supervised
    first = node.process.pid
    watch = sn.InstanceWatch(supervisor.coordinator_restarted)
    fed = make_federation(tmp_path / "fed", 2)
    caplog.set_level(logging.WARNING, logger=sn.__name__)
    for start in range(2):  # a coordinator, then its restart (a new service instance)
        running = serve(fed.store)
        with grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{running.port}"),
                                    watch) as channel:
            quiet = pb_grpc.CoordinatorStub(channel).WatchAdapters(
                pb.WatchAdaptersRequest(after_version=99), timeout=10)
            assert watch.instance == running.instance  # read as the stream opened
            quiet.cancel()
        running.stop()
        if start == 0:
            time.sleep(0.3)
            assert pids == [] and node.process.pid == first  # same instance: nothing to do
    wait_for(lambda: len(pids) == 1)
    assert node.process.pid == pids[0] != first and node.returncode() is None
    assert "coordinator restarted" in caplog.text


@pytest.mark.parametrize("which", ["process", "executor"])
def test_a_supernode_that_exits_is_restarted_with_its_reason(supervised, caplog,
                                                             monkeypatch, which):
    """The SuperNode, or the executor that runs its ClientApps, killed: both restart."""
    node, supervisor, pids = supervised
    monkeypatch.setattr(sn, "EXIT_DELAY_S", 0.2)
    caplog.set_level(logging.WARNING, logger=sn.__name__)
    first_executor = node.executor.pid
    subprocess.run(["kill", "-9", str(getattr(node, which).pid)], check=True)
    wait_for(lambda: len(pids) == 1)
    assert node.returncode() is None and supervisor.restarts == 1
    assert node.executor.pid != first_executor
    assert "flower-supernode or its executor exited with -9" in caplog.text

