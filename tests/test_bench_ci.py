"""The whole suite on CI's tiny configuration (bench/ci.toml): every section runs."""

import json
import math

import pytest

from bench import cli


def test_ci_configuration_runs_every_section(tmp_path, capsys):
    out, report = tmp_path / "bench.json", tmp_path / "report"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--config", "bench/ci.toml", "--quick", "--json", str(out),
                  "--report", str(report)])
    assert exc.value.code == 0
    rows = json.loads(out.read_text())
    assert {r["section"] for r in rows} == set(cli.SECTIONS)
    for r in rows:
        if r["value"] is None:  # only rows that say why they have no value
            assert r["note"].startswith(("not measured on cpu", "not available", "not reached"))
            assert r["pass"] is None
        else:
            assert math.isfinite(r["value"]), r
    names = {(r["section"], r["name"]) for r in rows}
    assert {("inference", "fast_path_speedup"), ("memory", "int4_total_mb_b1"),
            ("quality", "int8_ppl_ratio_max"), ("parity", "s_parity")} <= names
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["metric", "target", "actual", "status"]
    assert (report / "report.md").exists() and (report / "quality_vs_steps.png").exists()
