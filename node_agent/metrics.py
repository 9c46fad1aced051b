"""Counters and gauges of the node agent, rendered in the Prometheus text format (0.0.4).

A dependency-free registry: the node exposes a dozen series, and the text format is a few
lines per series, so a client library would add a package for nothing. Thread-safe,
because HTTP workers, gRPC handlers and the adapter watcher all update it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Registry:
    """Named series of kind ``counter`` or ``gauge``, each with labelled values."""

    def __init__(self, prefix: str = "ruvdllm_node_") -> None:
        self._prefix = prefix
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}  # name -> (kind, help)
        self._values: dict[str, dict[Labels, float]] = {}

    def describe(self, name: str, kind: str, help_text: str) -> None:
        """Declare a series so it is listed (at 0 if unlabelled) before its first update."""
        if kind not in ("counter", "gauge"):
            raise ValueError(f"unknown metric kind {kind!r}")
        with self._lock:
            self._meta[name] = (kind, help_text)
            self._values.setdefault(name, {})

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` (≥ 0 for counters) to a series."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            if name not in self._meta:
                raise KeyError(f"metric {name} is not described")
            if self._meta[name][0] == "counter" and amount < 0:
                raise ValueError(f"counter {name} cannot decrease")
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            if self._meta.get(name, ("", ""))[0] != "gauge":
                raise KeyError(f"metric {name} is not a described gauge")
            self._values[name][key] = value

    def snapshot(self) -> Mapping[str, Mapping[Labels, float]]:
        """A copy of every series' values."""
        with self._lock:
            return {name: dict(series) for name, series in self._values.items()}

    def render(self) -> str:
        """The exposition text: HELP, TYPE and one sample line per labelled value."""
        lines: list[str] = []
        with self._lock:
            for name in sorted(self._meta):
                kind, help_text = self._meta[name]
                full = self._prefix + name
                lines.append(f"# HELP {full} {help_text}")
                lines.append(f"# TYPE {full} {kind}")
                series = self._values[name] or {(): 0.0}
                for labels, value in sorted(series.items()):
                    lines.append(f"{full}{_labels(labels)} {value:.17g}")
        return "\n".join(lines) + "\n"


def node_registry() -> Registry:
    """The node agent's series, declared up front so /metrics always lists them."""
    reg = Registry()
    reg.describe("http_requests_total", "counter", "HTTP requests by path and status code")
    reg.describe("refusals_total", "counter", "Requests or inputs refused, by reason")
    reg.describe("generations_total", "counter", "Completed generations by finish reason")
    reg.describe("generated_tokens_total", "counter", "Tokens generated")
    reg.describe("prompt_tokens_total", "counter", "Prompt tokens processed")
    reg.describe("generation_seconds_total", "counter", "Seconds spent generating")
    reg.describe("model_forwards_total", "counter", "Model forward passes for generation")
    reg.describe("requests_in_flight", "gauge", "Generation requests admitted and not finished")
    reg.describe("adapter_version", "gauge", "Merged adapter version applied to the banks")
    reg.describe("adapter_swaps_total", "counter", "Merged adapter versions hot-swapped in")
    reg.describe("rounds_trained_total", "counter", "Federated rounds trained and uploaded")
    reg.describe("train_seconds_total", "counter", "Seconds of local training")
    reg.describe("upload_bytes_total", "counter", "Bytes of signed deltas uploaded")
    reg.describe("last_round", "gauge", "Last federated round trained")
    return reg
