"""Regression check against a previous ``--json`` run (the seed's ``check_regressions``).

Rows are matched by section and name. The kind of a row follows its unit:
latency (ms, s) regresses when it grows by more than ``latency_increase_pct``,
throughput (tok/s) when it drops by more than ``throughput_decrease_pct``,
memory (MB, GB) when it grows by more than ``memory_increase_pct``. Other rows
(ratios, perplexity, quality) are not compared: they are not speed or size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.common import Row

KIND_OF_UNIT = {"ms": "latency", "s": "latency", "tok/s": "throughput", "MB": "memory",
                "GB": "memory"}


@dataclass
class Regression:
    section: str
    name: str
    kind: str
    baseline: float
    current: float
    change_pct: float
    threshold_pct: float

    def __str__(self) -> str:
        return (f"{self.section}.{self.name} ({self.kind}): {self.baseline:.4g} -> "
                f"{self.current:.4g} ({self.change_pct:+.1f}%, threshold {self.threshold_pct:g}%)")


def regressions(current: Sequence[Row], baseline: Sequence[Row],
                thresholds: dict[str, float]) -> list[Regression]:
    """Rows of ``current`` that are worse than ``baseline`` beyond their kind's threshold."""
    before = {(r.section, r.name): r.value for r in baseline}
    limits = {"latency": thresholds["latency_increase_pct"],
              "throughput": thresholds["throughput_decrease_pct"],
              "memory": thresholds["memory_increase_pct"]}
    found = []
    for row in current:
        kind = KIND_OF_UNIT.get(row.unit)
        old = before.get((row.section, row.name))
        if kind is None or old is None or not (math.isfinite(old) and math.isfinite(row.value)):
            continue
        if old <= 0:
            continue
        change = (row.value / old - 1.0) * 100.0
        worse = -change if kind == "throughput" else change
        if worse > limits[kind]:
            found.append(Regression(row.section, row.name, kind, old, row.value, change,
                                    limits[kind]))
    return found
