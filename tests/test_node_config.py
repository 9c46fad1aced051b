"""node.toml: defaults, path resolution, overrides, and refusals with the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_agent.config import NodeConfigError, load_config, parse_byzantine


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[node]\nhome = "n1"\n'))
    assert cfg.node.home == tmp_path / "n1" and cfg.node.data_dir == tmp_path / "n1" / "data"
    assert cfg.model.path == "default" and cfg.model.quant == "int8"  # quantized by default
    assert cfg.http.host == cfg.grpc.host == "127.0.0.1"
    assert cfg.coordinator.root_certificates is None


def test_overrides_win(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[http]\nport = 1\n"), {"http.port": 9, "node.data_dir": "d"})
    assert cfg.http.port == 9 and cfg.node.data_dir == tmp_path / "d"


@pytest.mark.parametrize("text, fragment", [
    ("[htp]\nport = 1\n", "unknown section [htp]"),
    ("[http]\nprot = 1\n", "unknown key http.prot"),
    ('[http]\nport = "80"\n', "http.port must be an integer"),
    ("[http]\nport = 0\n", "http.port must be positive"),
    ("[http]\nport = 70000\n", "http.port must be 1..65535"),
    ("[grpc]\nport = -1\n", "grpc.port 0..65535"),
    ("[http]\nrequest_timeout_s = 0\n", "http.request_timeout_s must be finite"),
    ("[training]\nlr = nan\n", "training.lr must be finite and > 0"),
    ("[training]\nalpha = -1.0\n", "training.alpha must be finite and > 0"),
    ('[model]\nquant = "fp4"\n', "model.quant"),
    ('[training]\nbyzantine = "evil"\n', "training.byzantine"),
    ('[http]\ntls_certfile = "c.pem"\n', "go together"),
    ("[http\n", "not valid TOML"),
    ('[http]\nhost = "0.0.0.0"\n', "not loopback"),
    ('[coordinator]\naddress = "10.0.0.5:9095"\n', "not loopback"),
    ('[supernode]\nsuperlink = "example.org:9092"\n', "not loopback"),
    ('[node]\nid = "a/b"\n', "node.id: node id 'a/b' must be 1-128 ASCII"),
    ('[node]\nid = "café"\n', "node.id"),
])
def test_refusals_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(NodeConfigError) as err:
        load_config(write(tmp_path, text))
    assert fragment in str(err.value)


def test_insecure_allows_non_loopback(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[http]\nhost = "0.0.0.0"\n'), insecure=True)
    assert cfg.http.host == "0.0.0.0"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NodeConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_byzantine_specs() -> None:
    assert parse_byzantine("") is None
    assert parse_byzantine("signflip") == ("signflip", -1.0)
    assert parse_byzantine("scale:100") == ("scale", 100.0)
