"""The node's configuration: one TOML file (``node.toml``) with CLI overrides.

Every setting has a default, so a file may name only what differs. Relative paths are
resolved against the folder of the config file, so a node folder can be moved whole.
Unknown sections or keys, wrong types and unsafe combinations (a non-loopback bind
without TLS unless ``insecure``) are refused with :class:`NodeConfigError` naming the key,
because a typo silently ignored would leave a node running with a setting its operator
did not choose.

    [node]         id, home (keys, error feedback, TALoRA store), data_dir (local text)
    [model]        path ("default" = the embedded model),
                   quant ("int8" | "int4" | "fp8" | "w4a8" | "none")
    [http]         host, port, request limits
    [grpc]         host, port of the local NodeAgent service
    [coordinator]  address of its gRPC service, its public key, TLS root certificate
    [supernode]    whether to start flower-supernode, the SuperLink address, TLS/auth files
    [training]     local training defaults; ``byzantine`` (tests and demo only)
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from federation import check_node_id
from ruvdllm.quant import DEFAULT_GROUP_SIZE, SCHEMES

LOOPBACK_NAMES = ("localhost",)


class NodeConfigError(ValueError):
    """A node configuration that cannot be used as written."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class NodeSection:
    """Identity and local state of the node."""

    id: str = ""  # empty: derived from the signing key (see node_agent.identity)
    home: Path = Path("node")
    data_dir: Path = Path("node/data")


@dataclass
class ModelSection:
    """The served model: a checkpoint folder or ``default``, quantized by default."""

    path: str = "default"
    quant: str = "int8"
    group_size: int = DEFAULT_GROUP_SIZE


@dataclass
class HttpSection:
    """The OpenAI-compatible HTTP API and its request limits (refused with 4xx)."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 65_536
    max_prompt_tokens: int = 384
    max_new_tokens: int = 128
    max_steps: int = 128
    max_concurrency: int = 4
    request_timeout_s: float = 120.0
    default_steps: int = 32
    default_new_tokens: int = 32
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None


@dataclass
class GrpcSection:
    """The local NodeAgent gRPC service (Generate, TrainRound, Health)."""

    host: str = "127.0.0.1"
    port: int = 50061


@dataclass
class CoordinatorSection:
    """Where deltas go and whose signature merged adapters must carry."""

    address: str = "127.0.0.1:50051"
    public_key: Path = Path("coordinator.pub")
    root_certificates: Path | None = None
    watch: bool = True
    timeout_s: float = 30.0


@dataclass
class SupernodeSection:
    """The flower-supernode process the agent starts toward the SuperLink."""

    enabled: bool = True
    superlink: str = "127.0.0.1:9092"
    port: int = 9094
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    max_wait_time_s: float = 60.0
    partition_id: int = 0
    num_partitions: int = 1


@dataclass
class TrainingSection:
    """Local training per round; the coordinator's round settings override steps and lr.

    ``byzantine`` makes this node misbehave on purpose, for tests and demos of the
    coordinator's robust aggregation: ``"scale:K"`` multiplies the delta by K,
    ``"signflip"`` negates it. Empty (the default) is an honest node.
    """

    steps: int = 8
    lr: float = 5e-3
    seq_len: int = 64
    batch_size: int = 4
    max_chars: int = 200_000
    seed: int = 0
    rank: int = 8
    alpha: float = 16.0
    byzantine: str = ""


@dataclass
class NodeConfig:
    """All sections of ``node.toml``; ``source`` is the file it came from, if any."""

    node: NodeSection = field(default_factory=NodeSection)
    model: ModelSection = field(default_factory=ModelSection)
    http: HttpSection = field(default_factory=HttpSection)
    grpc: GrpcSection = field(default_factory=GrpcSection)
    coordinator: CoordinatorSection = field(default_factory=CoordinatorSection)
    supernode: SupernodeSection = field(default_factory=SupernodeSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    insecure: bool = False
    source: Path | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc.host}:{self.grpc.port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.http.tls_certfile else "http"
        return f"{scheme}://{self.http.host}:{self.http.port}"

    def validate(self) -> NodeConfig:
        """Check ranges and safety rules; returns self so calls can chain."""
        if self.node.id:
            try:
                check_node_id(self.node.id)
            except ValueError as err:
                raise NodeConfigError(f"node.id: {err}") from None
        if self.model.quant not in (*SCHEMES, "none"):
            raise NodeConfigError(f"model.quant {self.model.quant!r} is not one of "
                                  f"{', '.join(SCHEMES)} or none")
        for name in ("port", "max_body_bytes", "max_prompt_tokens", "max_new_tokens",
                     "max_steps", "max_concurrency", "default_steps", "default_new_tokens"):
            if getattr(self.http, name) <= 0:
                raise NodeConfigError(f"http.{name} must be positive")
        if self.http.port > 65535 or not 0 <= self.grpc.port <= 65535:
            raise NodeConfigError("http.port must be 1..65535 and grpc.port 0..65535 "
                                  "(0: any free port)")
        if not 0 < self.http.request_timeout_s < math.inf:
            raise NodeConfigError("http.request_timeout_s must be finite and > 0")
        if (self.http.tls_certfile is None) != (self.http.tls_keyfile is None):
            raise NodeConfigError("http.tls_certfile and http.tls_keyfile go together")
        for name in ("steps", "seq_len", "batch_size", "max_chars", "rank"):
            if getattr(self.training, name) <= 0:
                raise NodeConfigError(f"training.{name} must be positive")
        for name in ("lr", "alpha"):
            if not 0 < getattr(self.training, name) < math.inf:  # NaN fails too
                raise NodeConfigError(f"training.{name} must be finite and > 0")
        parse_byzantine(self.training.byzantine)
        if not self.insecure:
            if not is_loopback(self.http.host) and self.http.tls_certfile is None:
                raise NodeConfigError(f"http.host {self.http.host} is not loopback: configure "
                                      "http.tls_certfile/tls_keyfile or pass --insecure")
            if not is_loopback(self.grpc.host):
                raise NodeConfigError(f"grpc.host {self.grpc.host} is not loopback: the "
                                      "NodeAgent service is local only (or pass --insecure)")
            coord_host = self.coordinator.address.rsplit(":", 1)[0]
            if not is_loopback(coord_host) and self.coordinator.root_certificates is None:
                raise NodeConfigError(f"coordinator {self.coordinator.address} is not loopback: "
                                      "set coordinator.root_certificates or pass --insecure")
            link_host = self.supernode.superlink.rsplit(":", 1)[0]
            if (self.supernode.enabled and not is_loopback(link_host)
                    and self.supernode.root_certificates is None):
                raise NodeConfigError(f"superlink {self.supernode.superlink} is not loopback: "
                                      "set supernode.root_certificates or pass --insecure")
        return self


def parse_byzantine(spec: str) -> tuple[str, float] | None:
    """``""`` → None, ``"signflip"`` → ("signflip", -1), ``"scale:K"`` → ("scale", K)."""
    if not spec:
        return None
    if spec == "signflip":
        return ("signflip", -1.0)
    if spec.startswith("scale:"):
        try:
            return ("scale", float(spec.removeprefix("scale:")))
        except ValueError:
            pass
    raise NodeConfigError(f"training.byzantine {spec!r} must be '', 'signflip' or 'scale:K'")


def _coerce(section: str, key: str, value: Any, default: Any, base: Path) -> Any:
    """A TOML value converted to the type of the field's default; paths resolved."""
    name = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise NodeConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, Path) or key in _OPTIONAL_PATHS:
        if not isinstance(value, str):
            raise NodeConfigError(f"{name} must be a path string, got {value!r}")
        if value == "" and key in _OPTIONAL_PATHS:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise NodeConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise NodeConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise NodeConfigError(f"{name} must be a string, got {value!r}")
    return value


_OPTIONAL_PATHS = ("tls_certfile", "tls_keyfile", "root_certificates", "auth_private_key")
_SECTIONS = ("node", "model", "http", "grpc", "coordinator", "supernode", "training")


def from_dict(data: dict[str, Any], base: Path, *, insecure: bool = False) -> NodeConfig:
    """A validated NodeConfig from parsed TOML; relative paths are taken from ``base``."""
    cfg = NodeConfig(insecure=insecure)
    for section, values in data.items():
        if section == "insecure":
            if not isinstance(values, bool):
                raise NodeConfigError("insecure must be true or false")
            cfg.insecure = cfg.insecure or values
            continue
        if section not in _SECTIONS or not isinstance(values, dict):
            raise NodeConfigError(f"unknown section [{section}] (known: {', '.join(_SECTIONS)})")
        current = getattr(cfg, section)
        known = {f.name: getattr(current, f.name) for f in fields(current)}
        updates = {}
        for key, value in values.items():
            if key not in known:
                raise NodeConfigError(f"unknown key {section}.{key} (known: {', '.join(known)})")
            updates[key] = _coerce(section, key, value, known[key], base)
        setattr(cfg, section, replace(current, **updates))
    if "node" not in data or "home" not in data["node"]:
        cfg.node.home = base / cfg.node.home
    if "node" not in data or "data_dir" not in data["node"]:
        cfg.node.data_dir = cfg.node.home / "data"
    if "coordinator" not in data or "public_key" not in data["coordinator"]:
        cfg.coordinator.public_key = base / cfg.coordinator.public_key
    return cfg.validate()


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, *,
                insecure: bool = False) -> NodeConfig:
    """Read ``node.toml``; ``overrides`` maps ``"section.key"`` to a value (CLI flags)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise NodeConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise NodeConfigError(f"{path} is not valid TOML: {err}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    cfg = from_dict(data, path.resolve().parent, insecure=insecure)
    cfg.source = path.resolve()
    return cfg
