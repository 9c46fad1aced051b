"""`coordinator.toml`: the coordinator's configuration, CLI overrides, and the Flower run
config derived from it.

Every key has a default, so an empty file (or none) is a working loopback setup. Example
(all defaults shown)::

    [coordinator]
    state_dir = "coordinator-state"   # relative paths are relative to the TOML file

    [model]                           # what the adapters adapt (shapes only)
    name = "default"                  # embedded model name or checkpoint folder
    rank = 8
    targets = ["q_proj", "k_proj", "v_proj", "attn_out"]

    [superlink]                       # Flower SuperLink (one HTTP port: Fleet, Control, ServerApp)
    host = "127.0.0.1"
    port = 9092
    tls = false                       # serve with state_dir/tls (made by `init-tls`)
    node_auth = false                 # --enable-supernode-auth (needs tls)
    insecure = false                  # allow plaintext on a non-loopback host

    [service]                         # our gRPC Coordinator service (SubmitDelta, GetAdapter, ...)
    host = "127.0.0.1"
    port = 9095
    tls = false
    insecure = false                  # allow plaintext on a non-loopback host
    max_watchers = 256                # open WatchAdapters streams (one thread each); more: refused

    [rounds]
    num_rounds = 10
    round_timeout = 120.0             # seconds a round waits for replies
    wait_nodes = 60.0                 # seconds a round waits for min_nodes to connect
    min_nodes = 2
    fraction = 1.0
    local_steps = 20
    learning_rate = 0.001
    density = 0.05                    # top-k fraction nodes keep
    clip_norm = 3.0                   # nodes clip the whole delta to this L2 norm (< max_norm)

    [aggregation]                     # DAF (federation.daf)
    byzantine_f = "auto"              # tolerated Byzantine nodes: an int >= 0, or "auto"
    quorum = 3                        # valid updates needed for a version (at least 2f+1)
    max_norm = 10.0                   # the Validator's L2 bound on a delta
    coarse = "multikrum"
    domain = "trimmed_mean"
    fine = "median"

    [dp]                              # client-level DP (DP-FedAvg), off at noise 0
    noise_multiplier = 0.0
    delta = 1e-5

`byzantine_f = "auto"` lets DAF take, each round, the largest f the valid updates allow
(`federation.aggregators.max_f`: n >= 3f + 1 and the rule's own condition; 3 for 10 nodes):
with a fixed 0, Multi-Krum keeps every update and the trimmed means trim almost nothing, so
the default would not be Byzantine-robust. An explicit f also raises the quorum to at least 2f + 1;
with "auto" the configured `quorum` applies.

A non-loopback `host` without `tls` is refused unless that section's `insecure` is true
(`ruvdllm-coordinator start --insecure` sets both): deltas, merged adapters and node
registrations must not cross a network in clear text by accident.

`ConfigError` carries a one-line message for the CLI.
"""

import ipaddress
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal

from federation import BANKS, RULES, BankRule, default_rules


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what and where."""


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses (brackets around IPv6 allowed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ModelSection:
    name: str = "default"
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "attn_out")


@dataclass(frozen=True)
class SuperLinkSection:
    host: str = "127.0.0.1"
    port: int = 9092
    tls: bool = False
    node_auth: bool = False
    insecure: bool = False


@dataclass(frozen=True)
class ServiceSection:
    host: str = "127.0.0.1"
    port: int = 9095
    tls: bool = False
    insecure: bool = False
    max_watchers: int = 256


@dataclass(frozen=True)
class RoundsSection:
    num_rounds: int = 10
    round_timeout: float = 120.0
    wait_nodes: float = 60.0
    min_nodes: int = 2
    fraction: float = 1.0
    local_steps: int = 20
    learning_rate: float = 1e-3
    density: float = 0.05
    clip_norm: float = 3.0


AUTO_F: Final = "auto"


def parse_byzantine_f(value: Any, key: str = "aggregation.byzantine_f") -> int | None:
    """f from a config or run-config value: an int >= 0, or "auto" (None: DAF's automatic f)."""
    if value == AUTO_F:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ConfigError(f'{key} must be an integer >= 0 or "{AUTO_F}", got {value!r}')


@dataclass(frozen=True)
class AggregationSection:
    byzantine_f: int | Literal["auto"] = AUTO_F
    quorum: int = 3
    max_norm: float = 10.0
    coarse: str = "multikrum"
    domain: str = "trimmed_mean"
    fine: str = "median"


@dataclass(frozen=True)
class DPSection:
    noise_multiplier: float = 0.0
    delta: float = 1e-5


@dataclass(frozen=True)
class CoordinatorConfig:
    """The whole configuration; `state_dir` is absolute after `load`."""

    state_dir: Path = Path("coordinator-state")
    model: ModelSection = field(default_factory=ModelSection)
    superlink: SuperLinkSection = field(default_factory=SuperLinkSection)
    service: ServiceSection = field(default_factory=ServiceSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    dp: DPSection = field(default_factory=DPSection)

    @property
    def key_file(self) -> Path:
        """The coordinator's Ed25519 signing key (PKCS#8 PEM, mode 0600)."""
        return self.state_dir / "coordinator.key"

    @property
    def tls_dir(self) -> Path:
        """Where `init-tls` writes the CA and the server certificate."""
        return self.state_dir / "tls"

    @property
    def service_address(self) -> str:
        """host:port nodes dial for the Coordinator service."""
        return f"{self.service.host}:{self.service.port}"

    @property
    def superlink_address(self) -> str:
        """host:port of the SuperLink."""
        return f"{self.superlink.host}:{self.superlink.port}"


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "superlink": SuperLinkSection,
    "service": ServiceSection,
    "rounds": RoundsSection,
    "aggregation": AggregationSection,
    "dp": DPSection,
}


def _coerce(where: str, value: Any, kind: type) -> Any:
    if kind is tuple or str(kind).startswith("tuple"):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def _section(name: str, raw: Mapping[str, Any], base: Any) -> Any:
    known = {f.name: f for f in fields(base)}
    if unknown := sorted(set(raw) - set(known)):
        raise ConfigError(f"[{name}] has unknown keys {unknown}; known: {sorted(known)}")
    types = {f.name: type(getattr(base, f.name)) for f in fields(base)}
    values: dict[str, Any] = {}
    for k, v in raw.items():
        where = f"{name}.{k}"
        if where == "aggregation.byzantine_f":
            parse_byzantine_f(v)
            values[k] = v
        else:
            values[k] = _coerce(where, v, types[k])
    return replace(base, **values)


def _validate(cfg: CoordinatorConfig) -> None:
    r, a = cfg.rounds, cfg.aggregation
    checks = [
        (cfg.model.rank >= 1, "model.rank must be >= 1"),
        (r.num_rounds >= 1 and r.min_nodes >= 1, "rounds.num_rounds and min_nodes must be >= 1"),
        (0 < r.fraction <= 1, "rounds.fraction must be in (0, 1]"),
        (0 < r.density <= 1, "rounds.density must be in (0, 1]"),
        (r.local_steps >= 1, "rounds.local_steps must be >= 1"),
        (0 < r.learning_rate < math.inf, "rounds.learning_rate must be finite and > 0"),
        (r.round_timeout > 0 and r.wait_nodes >= 0, "rounds.round_timeout must be > 0"),
        (a.quorum >= 1, "aggregation.quorum must be >= 1"),
        (0 < a.max_norm < math.inf and 0 < r.clip_norm < math.inf,
         "max_norm and clip_norm must be finite and > 0"),
        (cfg.dp.noise_multiplier >= 0 and 0 < cfg.dp.delta < 1, "dp: noise >= 0, 0 < delta < 1"),
        (not cfg.superlink.node_auth or cfg.superlink.tls, "superlink.node_auth needs tls"),
        (all(0 < p < 65536 for p in (cfg.superlink.port, cfg.service.port)), "ports: 1..65535"),
        (cfg.service.max_watchers >= 1, "service.max_watchers must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for name, section in (("superlink", cfg.superlink), ("service", cfg.service)):
        if not (section.tls or section.insecure or is_loopback(section.host)):
            raise ConfigError(
                f"{name}.host {section.host} is not loopback and {name}.tls is off: run "
                f"`ruvdllm-coordinator init-tls` and set {name}.tls = true, or pass --insecure"
            )
    for bank in BANKS:
        if (rule := getattr(a, bank)) not in RULES:
            raise ConfigError(f"aggregation.{bank} = {rule!r}; choose one of {sorted(RULES)}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` (value in TOML syntax, bare words taken as strings)."""
    path, sep, value = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return section, key, parsed


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> CoordinatorConfig:
    """Read a TOML file (None = defaults) and apply `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except OSError as exc:  # a folder, no permission
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        base_dir = path.resolve().parent
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    if unknown := sorted(set(raw) - set(_SECTIONS) - {"coordinator"}):
        raise ConfigError(f"unknown sections {unknown}; known: {sorted(_SECTIONS)}")
    top = dict(raw.get("coordinator", {}))
    state_dir = Path(_coerce("coordinator.state_dir", top.pop("state_dir", "coordinator-state"),
                             str))
    if top:
        raise ConfigError(f"[coordinator] has unknown keys {sorted(top)}; known: ['state_dir']")
    sections = {name: _section(name, raw.get(name, {}), make()) for name, make in
                _SECTIONS.items()}
    cfg = CoordinatorConfig(state_dir=(base_dir / state_dir).resolve(), **sections)
    _validate(cfg)
    return cfg


def bank_rules(cfg: AggregationSection | Mapping[str, str]) -> dict[str, BankRule]:
    """BankRule per bank: the default rule keeps its options and gain weighting."""
    names = cfg if isinstance(cfg, Mapping) else {b: getattr(cfg, b) for b in BANKS}
    defaults = default_rules()
    return {b: defaults[b] if names[b] == defaults[b].rule else BankRule(names[b]) for b in BANKS}


def run_config(cfg: CoordinatorConfig) -> dict[str, Any]:
    """The Flower run config the ServerApp reads (keys of coordinator/flwr_app/pyproject.toml)."""
    r, a = cfg.rounds, cfg.aggregation
    return {
        "state-dir": str(cfg.state_dir),
        "key-file": str(cfg.key_file),
        "coordinator-address": cfg.service_address,
        "coordinator-tls": cfg.service.tls,
        "num-rounds": r.num_rounds,
        "round-timeout": r.round_timeout,
        "wait-nodes": r.wait_nodes,
        "min-nodes": r.min_nodes,
        "fraction": r.fraction,
        "local-steps": r.local_steps,
        "learning-rate": r.learning_rate,
        "density": r.density,
        "clip-norm": r.clip_norm,
        "quorum": a.quorum,
        "byzantine-f": a.byzantine_f,
        "max-norm": a.max_norm,
        "rule-coarse": a.coarse,
        "rule-domain": a.domain,
        "rule-fine": a.fine,
        "dp-noise": cfg.dp.noise_multiplier,
        "dp-delta": cfg.dp.delta,
    }


def format_run_config(values: Mapping[str, Any]) -> str:
    """`k=v k=v` for `flwr run --run-config`, values in TOML syntax."""
    def toml(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)
    return " ".join(f"{k}={toml(v)}" for k, v in values.items())
