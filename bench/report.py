"""How results are presented: the PASS/FAIL table, JSON objects, Markdown and plots.

Sweep points are rows whose name carries labels, ``base{key=value,...}``
(:func:`labelled`); the plots are drawn from these rows alone, so a report can
be rebuilt from a ``--json`` file. Plotted rows:

* parity ``length_e2e_ms{model,B,G}``: latency against output length;
* parity ``chrf{model,K}`` and ``s_parity``: quality against steps, parity point;
* federation ``heldout_ppl{round}`` and ``bytes{round}``: per round.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.common import Row

_LABELS = re.compile(r"^(?P<base>[^{]+)(?:\{(?P<labels>[^}]*)\})?$")


def labelled(base: str, **labels: object) -> str:
    """``base{k=v,...}`` in the order given."""
    return f"{base}{{{','.join(f'{k}={v}' for k, v in labels.items())}}}"


def parse_name(name: str) -> tuple[str, dict[str, str]]:
    """The base name and labels of a row name (inverse of :func:`labelled`)."""
    m = _LABELS.match(name)
    if m is None or not m["labels"]:
        return name, {}
    return m["base"], dict(item.split("=", 1) for item in m["labels"].split(","))


def status(row: Row) -> str:
    """PASS/FAIL against the target; ``-`` without one; ``n/a`` when not measured."""
    if not math.isfinite(row.value):
        return "n/a"
    if row.passed is None:
        return "-"
    return "PASS" if row.passed else "FAIL"


def row_json(row: Row) -> dict[str, Any]:
    """``{section, name, value, unit, target, pass, direction, note}``; unmeasured: nulls."""
    out = row.to_json()
    if not math.isfinite(row.value):
        out["value"], out["pass"] = None, None
    return out


def row_from_json(obj: dict[str, Any]) -> Row:
    value = obj["value"]
    return Row(obj["section"], obj["name"], math.nan if value is None else float(value),
               obj["unit"], obj.get("target"), obj.get("direction", "<="), obj.get("note", ""))


def _cells(row: Row) -> list[str]:
    target = "" if row.target is None else f"{row.direction} {row.target:g} {row.unit}"
    actual = f"{row.value:.4g} {row.unit}" if math.isfinite(row.value) else row.note
    return [f"{row.section}.{row.name}", target, actual, status(row)]


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """metric | target | actual | PASS/FAIL, aligned text or a Markdown table."""
    header = ["metric", "target", "actual", "status"]
    body = [_cells(r) for r in rows]
    if markdown:
        lines = [header, ["---"] * 4, *body]
        return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |"
                         for line in lines)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *body])


def _points(rows: Sequence[Row], section: str, base: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for r in rows:
        name, labels = parse_name(r.name)
        if r.section == section and name == base and math.isfinite(r.value):
            out.append((labels, r.value))
    return out


def _plot_latency(rows: Sequence[Row], path: Path) -> bool:
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for labels, v in _points(rows, "parity", "length_e2e_ms"):
        lines[f"{labels['model']} B={labels['B']}"].append((int(labels["G"]), v))
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(lines.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel="output tokens", ylabel="end-to-end latency (ms, median)", xscale="log",
           yscale="log", title="Latency against output length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_quality(rows: Sequence[Row], path: Path) -> bool:
    pts = _points(rows, "parity", "chrf")
    diff = sorted((int(lab["K"]), v) for lab, v in pts if lab["model"] == "diffusion")
    ar = [v for lab, v in pts if lab["model"] == "ar"]
    if not diff:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = zip(*diff, strict=True)
    ax.plot(xs, ys, marker="o", label="diffusion")
    if ar:
        ax.axhline(ar[0], color="k", linestyle="--", label="AR twin")
    parity = [r.value for r in rows if r.section == "parity" and r.name == "s_parity"
              and math.isfinite(r.value)]
    if parity:
        ax.plot([parity[0]], [dict(diff)[int(parity[0])]], "r*", markersize=14,
                label=f"S_parity = {parity[0]:g}")
    ax.set(xlabel="diffusion steps K", ylabel="chrF (held-out continuations)", xscale="log",
           title="Quality against steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_rounds(rows: Sequence[Row], base: str, ylabel: str, path: Path) -> bool:
    pts = sorted((int(lab["round"]), v) for lab, v in _points(rows, "federation", base)
                 if "round" in lab)  # the unlabelled row is the final summary
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = zip(*pts, strict=True)
    ax.plot(xs, ys, marker="o")
    ax.set(xlabel="round", ylabel=ylabel, title=f"Federation: {ylabel} per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(rows: Sequence[Row], out_dir: Path, header: str) -> Path:
    """``report.md`` with the table, notes and every plot that has data; its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "latency_vs_length.png": ("Latency against output length (diffusion vs AR twin)",
                                  lambda p: _plot_latency(rows, p)),
        "quality_vs_steps.png": ("Quality against steps, with the parity point",
                                 lambda p: _plot_quality(rows, p)),
        "federation_ppl.png": ("Federation held-out perplexity per round",
                               lambda p: _plot_rounds(rows, "heldout_ppl", "held-out ppl", p)),
        "federation_bytes.png": ("Federation bytes per round",
                                 lambda p: _plot_rounds(rows, "bytes", "bytes", p)),
    }
    parts = ["# ruvdllm-bench report", "", header, "", format_table(rows, markdown=True), ""]
    notes = [f"- `{r.section}.{r.name}`: {r.note}" for r in rows
             if r.note and math.isfinite(r.value)]
    if notes:
        parts += ["## Notes", "", *notes, ""]
    parts += ["## Figures", ""]
    for file, (title, draw) in figures.items():
        if draw(out_dir / file):
            parts += [f"### {title}", "", f"![{title}]({file})", ""]
        else:
            parts += [f"### {title}", "", "not plotted: no rows for it in this run", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
