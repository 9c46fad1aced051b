"""End to end with real processes on 127.0.0.1: SuperLink, SuperNodes, node agents, Flower runs.

Free ports, one FLWR_HOME per process, telemetry off (node_agent.loopback does all three);
every wait is bounded. Two honest nodes are too few for the coordinator's default coarse
rule (Multi-Krum needs n >= 2f + 3), so these runs aggregate that bank with a trimmed mean.
Training is kept tiny (1 step per bank on short windows) so the two
runs fit in a few minutes on two cores: what is under test is the plumbing and the
coordinator's verdicts, not the adapters' quality.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from node_agent.loopback import LoopbackFederation, NodeSpec, Settings

TEXTS = {
    "py": "The os.path module implements functions on path names. Use join() to combine "
          "parts and split() to take them apart; nothing touches the file system. ",
    "kern": "The scheduler picks the next task to run on each CPU. A task that blocks on "
            "I/O leaves the run queue until the device signals completion. ",
    "play": "KING: What say you, good my lord? Speak plainly, for the hour is late and the "
            "night is full of rumour. LORD: My liege, the gates are shut. ",
}


def specs(byzantine: str = "", unenrolled: str = "") -> list[NodeSpec]:
    return [NodeSpec(name, [text * 30], byzantine=byzantine if name == "play" else "",
                     enrolled=name != unenrolled) for name, text in TEXTS.items()]


def tiny(**kw: object) -> Settings:
    return Settings(local_steps=1, seq_len=32, batch_size=2, round_timeout=150.0,
                    **kw)  # type: ignore[arg-type]


def test_three_nodes_two_rounds_byzantine_rejected(tmp_path: Path) -> None:
    with LoopbackFederation(tmp_path, specs(byzantine="scale:100"),
                            tiny(rounds=2, quorum=2, max_norm=10.0, clip_norm=1.0,
                                 rules={"coarse": "trimmed_mean"})) as fed:
        status = fed.run_rounds(timeout=420)
        assert status == "finished:completed"
        rounds = fed.rounds()
        assert [r.status for r in rounds] == ["merged", "merged"]
        assert [r.version for r in rounds] == [2, 3]
        for r in rounds:
            honest = {p.node_id for p in fed.participants(r.round)}
            assert honest == {"py", "kern"}
            refused = {(x.node_id, x.reason) for x in fed.rejections(r.round)}
            assert ("play", "norm_bound_exceeded") in refused
            assert all(p.size_bytes < 1_000_000 for p in fed.participants(r.round))
        assert fed.latest_version() == 3
        fed.wait_for_version(3, timeout=60)  # every node, the Byzantine one too, ends on it
        for node in fed.nodes:
            health = fed.health(node)
            assert health["adapter_version"] == 3 and health["last_round"] == 2
        reply = httpx.post(f"{fed.nodes[0].cfg.http_url}/v1/completions", timeout=120,
                           json={"prompt": "The path", "max_tokens": 8, "steps": 8}).json()
        assert reply["system_fingerprint"] == "adapter-v3"
    for node in fed.nodes:  # stopped by PID: the agents and their SuperNodes are gone
        assert node.process.poll() is not None
        assert not (node.cfg.node.home / "agent.json").exists()


def test_tls_and_node_auth_refuse_an_unenrolled_node(tmp_path: Path) -> None:
    settings = tiny(rounds=1, quorum=2, tls=True, node_auth=True,
                    rules={"coarse": "trimmed_mean"})
    with LoopbackFederation(tmp_path, specs(unenrolled="play"), settings) as fed:
        stranger = next(n for n in fed.nodes if n.spec.name == "play")
        end = time.monotonic() + 90
        while fed.health(stranger)["supernode"] == "running" and time.monotonic() < end:
            time.sleep(1.0)
        code = fed.health(stranger)["supernode"]
        assert isinstance(code, int) and code != 0  # the SuperNode gave up and exited
        log = (stranger.cfg.node.home / "logs" / "supernode.log").read_text(errors="replace")
        assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log
        assert fed.health(stranger)["status"] == "ok"  # the agent itself keeps serving
        assert fed.run_rounds(timeout=300) == "finished:completed"
        (only,) = fed.rounds()
        assert only.status == "merged" and only.sampled == 2
        assert {p.node_id for p in fed.participants(1)} == {"py", "kern"}
        fed.wait_for_version(2, timeout=60)
        assert fed.deployment is not None
        assert fed.deployment.cfg.superlink.tls and fed.deployment.cfg.service.tls
