"""Load (issue #5 item 2): concurrent streaming requests to a real node while it hot-swaps.

A real ``ruvdllm-node start`` process (embedded int8 model, no SuperNode) follows a real
Coordinator gRPC service; N streaming completions are sent at once over HTTP, and as soon as
the first one has finished the coordinator publishes a new signed version, which the node
receives through WatchAdapters and swaps in between two requests. Every request must end
with ``[DONE]``, and every chunk of one answer must name the same adapter version
(``system_fingerprint``); both versions must have served some requests.

CI runs 12 requests; the issue's 50 run locally (``-m slow``), or print the figures with

    python -m tests.test_load --requests 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from coordinator import config as coordinator_config
from coordinator.launch import free_port, prepare_state
from coordinator.service import ServiceServer, serve
from coordinator.store import Store
from federation import load_private_key, pack_adapter
from node_agent.supernode import flower_env

ROOT = Path(__file__).resolve().parent.parent
REQUEST = {"prompt": "The king said", "max_tokens": 8, "steps": 8, "stream": True}


@dataclass
class Node:
    """A node process following a coordinator service run in this process."""

    url: str
    store: Store
    key_file: Path
    process: subprocess.Popen[bytes]
    service: ServiceServer
    log: Path

    def publish(self) -> int:
        """Save the next signed version (small random B); returns its number."""
        latest = self.store.latest_version()
        assert latest is not None
        rng = np.random.default_rng(latest.version)
        banks = {b: {n: (0.01 * rng.standard_normal(s)).astype(np.float32)
                     for n, s in lay.shapes.items()} for b, lay in self.store.layout().items()}
        self.store.save_version(pack_adapter(
            banks, version=latest.version + 1, round=latest.round + 1,
            parent_version=latest.version, ffa_seed=latest.ffa_seed, contributors=["load"],
            key=load_private_key(self.key_file)))
        return latest.version + 1

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.service.stop()
        self.store.close()


def start_node(root: Path, max_concurrency: int = 64) -> Node:
    """Coordinator state + service in this process, a node process; waits until it serves."""
    ccfg = coordinator_config.load(None, [
        f"coordinator.state_dir={json.dumps(str(root / 'coordinator'))}"])
    store = prepare_state(ccfg)
    service = serve(store, "127.0.0.1", 0)
    home, port = root / "node", free_port()
    home.mkdir(parents=True, exist_ok=True)
    (home / "node.toml").write_text(textwrap.dedent(f"""
        [node]
        home = "."
        [http]
        port = {port}
        max_concurrency = {max_concurrency}
        request_timeout_s = 600.0
        [grpc]
        port = {free_port()}
        [coordinator]
        address = "127.0.0.1:{service.port}"
        public_key = "{ccfg.state_dir / 'coordinator.pub'}"
        [supernode]
        enabled = false
    """))
    env = flower_env(home / "flwr")
    env["PYTHONPATH"] = str(ROOT)
    log = home / "agent.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "node_agent.cli", "start", "--config",
             str(home / "node.toml")], stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=ROOT, start_new_session=True)
    node = Node(f"http://127.0.0.1:{port}", store, ccfg.key_file, process, service, log)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if process.poll() is not None:
            node.stop()
            raise RuntimeError(f"node exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{node.url}/health", timeout=2.0).status_code == 200:
                return node
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    node.stop()
    raise RuntimeError(f"node did not serve within 180 s (log {log})")


@dataclass
class Answer:
    """One streamed request: its latency, time to first chunk and the versions it named."""

    latency_s: float
    first_chunk_s: float
    versions: set[str]
    done: bool
    status: int


async def _stream(client: httpx.AsyncClient, url: str, finished: asyncio.Event) -> Answer:
    t0 = time.perf_counter()
    first, versions, done = 0.0, set(), False
    async with client.stream("POST", f"{url}/v1/completions", json=REQUEST) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            first = first or time.perf_counter() - t0
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            versions.add(json.loads(data).get("system_fingerprint"))
    finished.set()
    return Answer(time.perf_counter() - t0, first, versions, done, r.status_code)


async def _load(node: Node, requests: int) -> tuple[list[Answer], int, float]:
    finished = asyncio.Event()
    limits = httpx.Limits(max_connections=requests + 4)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(_stream(client, node.url, finished))
                 for _ in range(requests)]
        await finished.wait()  # one answer is complete: swap while the rest are in flight
        version = await asyncio.to_thread(node.publish)
        answers = await asyncio.gather(*tasks)
        return list(answers), version, time.perf_counter() - t0


def run_load(node: Node, requests: int) -> dict[str, Any]:
    """Send ``requests`` concurrent streams with a hot swap among them; the figures."""
    before = httpx.get(f"{node.url}/health", timeout=10).json()["adapter_version"]
    answers, version, wall = asyncio.run(_load(node, requests))
    latencies = sorted(a.latency_s for a in answers)
    per_version: dict[str, int] = {}
    for a in answers:
        for v in a.versions:
            per_version[v] = per_version.get(v, 0) + 1
    return {
        "requests": requests, "completed": sum(a.done and a.status == 200 for a in answers),
        "one_version_each": all(len(a.versions) == 1 for a in answers),
        "served_by_version": per_version, "from_version": before, "swapped_to": version,
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(float(np.percentile(latencies, 99)), 3),
        "max_s": round(latencies[-1], 3),
        "first_chunk_p50_s": round(statistics.median(a.first_chunk_s for a in answers), 3),
        "wall_s": round(wall, 2), "requests_per_s": round(requests / wall, 2),
    }


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    running = start_node(tmp_path_factory.mktemp("load"))
    try:
        yield running
    finally:
        running.stop()


def _check(node: Node, report: dict[str, Any]) -> None:
    assert report["completed"] == report["requests"], report
    assert report["one_version_each"], report
    old, new = f"adapter-v{report['from_version']}", f"adapter-v{report['swapped_to']}"
    assert set(report["served_by_version"]) == {old, new}, report  # the swap was mid-load
    assert sum(report["served_by_version"].values()) == report["requests"]
    health = httpx.get(f"{node.url}/health", timeout=10).json()
    assert health["adapter_version"] == report["swapped_to"]


def test_concurrent_streams_through_a_hot_swap(node: Node) -> None:
    _check(node, run_load(node, 12))


@pytest.mark.slow
def test_fifty_concurrent_streams_through_a_hot_swap(node: Node) -> None:
    report = run_load(node, 50)
    print(json.dumps(report))
    _check(node, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        running = start_node(Path(tmp))
        try:
            print(json.dumps(run_load(running, args.requests), indent=2))
        finally:
            running.stop()


if __name__ == "__main__":
    main()
