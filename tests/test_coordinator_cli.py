"""`ruvdllm-coordinator` init-tls, enroll, status and start (real SuperLink on 127.0.0.1),
and the TOML config with its Flower run config."""

import json
import os
import socket
import subprocess
import sys
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.cli import default_node_id, main
from coordinator.config import ConfigError, CoordinatorConfig, load, run_config
from coordinator.launch import APP_DIR, free_port
from coordinator.store import Store
from federation import generate_key, public_key_bytes, save_public_key


def test_config_defaults_overrides_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[coordinator]\nstate_dir = "st"\n[rounds]\nnum_rounds = 2\n'
                    '[aggregation]\nfine = "geomedian"\n')
    cfg = load(path, ["rounds.round_timeout=30", "service.host=localhost"])
    assert cfg.state_dir == tmp_path / "st"
    assert (cfg.rounds.num_rounds, cfg.rounds.round_timeout, cfg.service_address) == (
        2, 30.0, "localhost:9095")
    assert run_config(cfg)["rule-fine"] == "geomedian"
    for bad, message in [(["rounds.fraction=0"], "fraction"), (["nope.x=1"], "unknown sections"),
                         (["rounds.typo=1"], "unknown keys"), (["model.rank=two"], "must be int"),
                         (["aggregation.fine=avg"], "choose one of"),
                         (["superlink.node_auth=true"], "needs tls"), (["rounds"], "section.key"),
                         (["service.max_watchers=0"], "max_watchers must be >= 1"),
                         # what every node would refuse round after round: refused at start
                         (["rounds.local_steps=0"], "local_steps must be >= 1"),
                         (["rounds.learning_rate=nan"], "learning_rate must be finite"),
                         (["rounds.clip_norm=inf"], "clip_norm must be finite")]:
        with pytest.raises(ConfigError, match=message):
            load(path, bad)
    for text in (b"[rounds\n", b"\x8e\xff"):
        path.write_bytes(text)
        with pytest.raises(ConfigError, match="not valid TOML"):
            load(path)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load(tmp_path)  # a folder


def test_byzantine_f_is_auto_by_default_or_an_int_and_reaches_the_strategy(tmp_path):
    from coordinator.server_app import settings_from_run_config

    path = tmp_path / "c.toml"
    path.write_text('[aggregation]\nbyzantine_f = "auto"\nquorum = 2\n')
    for overrides, value, f, required in [
        ([], "auto", None, 2),
        (["aggregation.byzantine_f=2"], 2, 2, 5),
        (["aggregation.byzantine_f=auto"], "auto", None, 2),
    ]:
        cfg = load(path, overrides)
        assert cfg.aggregation.byzantine_f == run_config(cfg)["byzantine-f"] == value
        settings = settings_from_run_config(run_config(cfg))
        assert (settings.byzantine_f, settings.required) == (f, required)
    assert CoordinatorConfig().aggregation.byzantine_f == "auto"
    for bad in ("-1", '"x"', "true", "1.5"):
        with pytest.raises(ConfigError, match=r'aggregation\.byzantine_f must be an integer '
                                              r'>= 0 or "auto"'):
            load(path, [f"aggregation.byzantine_f={bad}"])
    with pytest.raises(ConfigError, match="byzantine-f must be"):
        settings_from_run_config({**run_config(load(path)), "byzantine-f": "x"})


def test_flower_app_declares_every_run_config_key_with_the_config_defaults():
    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    expected = run_config(CoordinatorConfig())
    assert set(app["config"]) == set(expected)
    assert {k: v for k, v in app["config"].items() if k not in ("state-dir", "key-file")} == {
        k: v for k, v in expected.items() if k not in ("state-dir", "key-file")}
    assert app["components"]["serverapp"] == "coordinator.server_app:app"


def test_init_tls_makes_a_ca_and_a_server_certificate(tmp_path, capsys):
    assert main(["init-tls", "--state-dir", str(tmp_path), "--host", "coord.example"]) == 0
    tls = tmp_path / "tls"
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coord.example"}
    assert server.issuer == ca.subject
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey) and server.signature_hash_algorithm
    ca_key.verify(server.signature, server.tbs_certificate_bytes,
                  ec.ECDSA(server.signature_hash_algorithm))
    assert (tls / "server.key").stat().st_mode & 0o077 == 0
    assert main(["init-tls", "--state-dir", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err


def test_enroll_registers_keys_and_refuses_bad_input(tmp_path, capsys):
    key = generate_key()
    save_public_key(key, tmp_path / "node.pub")
    flower = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "node_ecdsa.pub").write_bytes(flower)
    state = ["--state-dir", str(tmp_path / "st")]
    assert main(["enroll", str(tmp_path / "node.pub"), *state]) == 0
    node_id = default_node_id(public_key_bytes(key))
    assert f"enrolled node {node_id}" in capsys.readouterr().out
    assert main(["enroll", str(tmp_path / "node.pub"), "--flower-key",
                 str(tmp_path / "node_ecdsa.pub"), *state]) == 0
    assert "already enrolled" in capsys.readouterr().out
    assert main(["enroll", str(tmp_path / "node.pub"), "--node-id", "other", *state]) == 2
    (tmp_path / "junk.pub").write_text("not a key")
    assert main(["enroll", str(tmp_path / "junk.pub"), *state]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "already enrolled" in err[0] and "not an Ed25519" in err[1]
    (tmp_path / "binary.pub").write_bytes(b"\x8e\xff\x00")
    for missing in ("absent.pub", "binary.pub"):  # one line each, no traceback
        assert main(["enroll", str(tmp_path / "node.pub"), "--flower-key",
                     str(tmp_path / missing), *state]) == 2
        assert "cannot read the SuperNode key" in capsys.readouterr().err
    (node,) = Store(tmp_path / "st").nodes()
    assert node.node_id == node_id and node.flower_key == flower.decode()


def test_status_without_state_is_a_one_line_error(tmp_path, capsys):
    assert main(["status", "--state-dir", str(tmp_path / "none")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_start_runs_superlink_and_a_round_without_nodes_then_status(tmp_path):
    """Real flower-superlink + `flwr run`: with no nodes the bounded wait ends the run."""
    overrides = [f"superlink.port={free_port()}", f"service.port={free_port()}",
                 "rounds.num_rounds=1", "rounds.wait_nodes=0.5"]
    cmd = [sys.executable, "-m", "coordinator.cli", "start", "--exit-after-run",
           "--state-dir", str(tmp_path)]
    for o in overrides:
        cmd += ["--set", o]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout.splitlines()[0])
    assert info["run_id"] > 0 and info["superlink_pid"] > 0
    assert "finished:completed" in done.stderr
    status = subprocess.run([sys.executable, "-m", "coordinator.cli", "status", "--json",
                             "--state-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=60, check=True)
    versions = json.loads(status.stdout)["versions"]
    assert [v["version"] for v in versions] == [1]
    with pytest.raises(ProcessLookupError):  # the SuperLink was stopped with the daemon
        os.kill(info["superlink_pid"], 0)


@pytest.mark.parametrize("taken", ["superlink.port", "service.port"])
def test_start_refuses_a_taken_port_before_starting_anything(tmp_path, capsys, taken):
    """A SuperLink port held by another HTTP server used to pass the readiness probe (that
    server answered GET /health) and fail later as a 404 from `flwr run`."""
    ports = {"superlink.port": free_port(), "service.port": free_port()}
    with socket.create_server(("127.0.0.1", 0)) as other:
        ports[taken] = other.getsockname()[1]
        args = ["start", "--exit-after-run", "--state-dir", str(tmp_path)]
        for key, port in ports.items():
            args += ["--set", f"{key}={port}"]
        assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{taken} 127.0.0.1:{ports[taken]} is not free" in err
    assert not (tmp_path / "logs" / "superlink.log").exists()  # no SuperLink was started
