"""``ruvdllm-bench``: run benchmark sections and check them against bench.toml targets.

Each section is the module ``bench.<name>`` (see bench/common.py for the row
contract); a section whose module does not exist yet is reported as not
available. A config file may name ``base = "other.toml"`` (relative to itself)
to be merged over it, which is how bench/ci.toml shrinks bench.toml for CI.

Exit codes: 0 done; 1 a section raised or ``--baseline`` found regressions;
2 user error (unknown section, bad config or options), with one line on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import platform
import subprocess
import sys
import time
import tomllib
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.baseline import regressions
from bench.common import BenchContext, Row
from bench.report import format_table, row_from_json, row_json, status, write_report
from ruvdllm.cli import check_output

SECTIONS = ("inference", "talora", "dgr", "memory", "federation", "quality", "parity",
            "robustness")
THRESHOLDS = ("latency_increase_pct", "throughput_decrease_pct", "memory_increase_pct")


class BenchError(Exception):
    """A user error: reported in one line, exit code 2."""


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``, tables recursively."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def default_config() -> Path:
    """``bench.toml`` of the current folder, else the one of the checkout this package is in.

    The second keeps ``ruvdllm-bench`` working from any folder of an editable install.
    """
    here = Path("bench.toml")
    checkout = Path(__file__).resolve().parent.parent / "bench.toml"
    return here if here.exists() or not checkout.exists() else checkout


def load_config(path: Path) -> dict[str, Any]:
    """The TOML config at ``path``, merged over its ``base`` file if it names one."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as err:
        raise BenchError(f"cannot read config {path}: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BenchError(f"{path}: invalid TOML: {err}") from None
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise BenchError(f"{path}: base must be a file name")
    return merge(load_config(path.parent / base), raw)


def _table(config: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise BenchError(f"config: [{where}] must be a table")
    return value


def section_targets(config: dict[str, Any], section: str) -> dict[str, dict[str, Any]]:
    """``[<section>.targets]``, each checked for a number, a unit and a direction."""
    targets = _table(_table(config, section, section), "targets", f"{section}.targets")
    for name, spec in targets.items():
        where = f"[{section}.targets] {name}"
        if not isinstance(spec, dict) or not isinstance(spec.get("target"), int | float):
            raise BenchError(f"config: {where} needs {{ target = <number>, unit, direction }}")
        if spec.get("direction") not in ("<=", ">="):
            raise BenchError(f"config: {where}: direction must be \"<=\" or \">=\"")
        if not isinstance(spec.get("unit"), str):
            raise BenchError(f"config: {where}: unit must be a string")
    return targets


def section_params(config: dict[str, Any], section: str, quick: bool) -> dict[str, Any]:
    """``[<section>]`` without its targets, with ``[<section>.quick]`` merged under --quick."""
    params = dict(_table(config, section, section))
    params.pop("targets", None)
    overrides = _table(params, "quick", f"{section}.quick")
    params.pop("quick", None)
    return merge(params, overrides) if quick else params


def baseline_thresholds(config: dict[str, Any]) -> dict[str, float]:
    table = _table(config, "baseline", "baseline")
    missing = [k for k in THRESHOLDS if not isinstance(table.get(k), int | float)]
    if missing:
        raise BenchError(f"config: [baseline] needs numbers {', '.join(missing)}")
    return {k: float(table[k]) for k in THRESHOLDS}


def run_section(name: str, params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    """The section's rows; one row saying so when its module does not exist or it fails."""
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"bench.{name}":
            raise
        return [Row(name, "available", math.nan, "",
                    note=f"not available (no module bench.{name})")]
    try:
        rows: list[Row] = module.run(params, ctx)
    except Exception as err:
        traceback.print_exc()
        return [Row(name, "error", math.nan, "", note=f"error: {type(err).__name__}: {err}")]
    return rows


def parse_sections(only: str | None) -> list[str]:
    if only is None:
        return list(SECTIONS)
    names = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise BenchError(f"unknown section {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(SECTIONS)}")
    return names


def read_baseline(path: Path) -> list[Row]:
    """Rows of a previous ``--json`` file."""
    try:
        return [row_from_json(obj) for obj in json.loads(path.read_text())]
    except OSError as err:
        raise BenchError(f"cannot read baseline {path}: {err.strerror}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise BenchError(f"baseline {path} is not a ruvdllm-bench --json file: {err}") from None


def _header(args: argparse.Namespace) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    hardware = (torch.cuda.get_device_name() if args.device == "cuda"
                else f"{platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} threads")
    return "\n".join([
        f"**Date**: {datetime.datetime.now().isoformat(timespec='seconds')}  ",
        f"**Commit**: {commit}  ",
        f"**Hardware**: {hardware}; torch {torch.__version__}  ",
        f"**Command**: `ruvdllm-bench {' '.join(args.argv)}`"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ruvdllm-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=default_config(),
                   help="targets and parameters (default: ./bench.toml, else the checkout's)")
    p.add_argument("--only", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="merge [<section>.quick] overrides")
    p.add_argument("--json", type=Path, help="write the rows as a JSON list")
    p.add_argument("--report", type=Path, help="write report.md and PNG plots to this folder")
    p.add_argument("--baseline", type=Path, help="a previous --json file: flag regressions")
    return p


def _run(args: argparse.Namespace) -> int:
    sections = parse_sections(args.only)
    config = load_config(args.config)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    for flag, path, is_folder in (("--json", args.json, False), ("--report", args.report, True)):
        try:  # before the first section: a long run must not lose its rows at the end
            check_output(path, is_folder)
        except ValueError as err:
            raise BenchError(f"{flag} {err}") from None
    thresholds = baseline_thresholds(config) if args.baseline else {}
    baseline = read_baseline(args.baseline) if args.baseline else []
    ctx = BenchContext(device=args.device, quick=args.quick,
                       targets={s: section_targets(config, s) for s in SECTIONS})
    plans = {s: section_params(config, s, args.quick) for s in sections}

    rows: list[Row] = []
    for name, params in plans.items():
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rows += run_section(name, params, ctx)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(format_table(rows))
    counts = {s: sum(status(r) == s for r in rows) for s in ("PASS", "FAIL", "n/a")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # one row per line: readable, diffable and a third of the indented size
        args.json.write_text("[\n" + ",\n".join(json.dumps(row_json(r)) for r in rows) + "\n]\n")
    if args.report:
        print(f"report: {write_report(rows, args.report, _header(args))}")
    found = regressions(rows, baseline, thresholds) if args.baseline else []
    for reg in found:
        print(f"REGRESSION {reg}")
    failed = any(r.name == "error" for r in rows)
    return 1 if found or failed else 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _run(args)
    except BenchError as err:
        print(f"ruvdllm-bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
