"""The row format every benchmark section returns, and what a section is given.

A section is a module ``bench/<name>.py`` with
``run(params: dict[str, Any], ctx: BenchContext) -> list[Row]``; ``params`` is
the ``[<name>]`` table of ``bench.toml`` (with ``[<name>.quick]`` merged over
it under ``--quick``), and each target is written in bench.toml as
``[<name>.targets] metric = { target = X, unit = "ms", direction = "<=" }``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

Direction = Literal["<=", ">="]


@dataclass
class Row:
    """One measured figure: ``{section, name, value, unit, target, pass}`` in JSON."""

    section: str
    name: str
    value: float
    unit: str
    target: float | None = None
    direction: Direction = "<="
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.value <= self.target if self.direction == "<=" else self.value >= self.target

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["pass"] = self.passed
        return out


@dataclass
class BenchContext:
    device: str = "cpu"
    quick: bool = False
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def row(self, section: str, name: str, value: float, unit: str, note: str = "") -> Row:
        """A row carrying the bench.toml target of ``section.name`` if there is one."""
        spec = self.targets.get(section, {}).get(name)
        if spec is None:
            return Row(section, name, float(value), unit, note=note)
        return Row(section, name, float(value), spec.get("unit", unit), float(spec["target"]),
                   spec.get("direction", "<="), note)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def agreement(a: list[list[int]], b: list[list[int]], length: int) -> float:
    """Percent of answer positions (padded to ``length``) holding the same token."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        x, y = x + [-1] * (length - len(x)), y + [-1] * (length - len(y))
        same += sum(i == j for i, j in zip(x, y, strict=True))
        total += length
    return 100.0 * same / total


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation; the median at 50."""
    return float(np.percentile(values, q))
