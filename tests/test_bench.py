"""ruvdllm-bench: config handling, PASS/FAIL logic, table/JSON format, baseline, errors."""

import json
import math
from pathlib import Path

import pytest

from bench import cli
from bench.baseline import regressions
from bench.common import BenchContext, Row
from bench.quality import chrf
from bench.report import (
    format_table,
    labelled,
    parse_name,
    row_from_json,
    row_json,
    status,
    write_report,
)

THRESHOLDS = {"latency_increase_pct": 20.0, "throughput_decrease_pct": 20.0,
              "memory_increase_pct": 10.0}


def test_bench_toml_targets_are_well_formed():
    config = cli.load_config(Path("bench.toml"))
    for section in cli.SECTIONS:
        cli.section_targets(config, section)  # raises BenchError when malformed
    assert cli.section_targets(config, "quality")["int8_ppl_ratio_max"]["target"] == 1.01
    assert cli.baseline_thresholds(config) == THRESHOLDS


def test_default_config_is_the_current_folders_else_the_checkouts(tmp_path, monkeypatch):
    checkout = Path(cli.__file__).resolve().parent.parent / "bench.toml"
    monkeypatch.chdir(tmp_path)
    assert cli.default_config() == checkout  # run from elsewhere: the checkout's targets
    (tmp_path / "bench.toml").write_text("[quality]\n")
    assert cli.default_config() == Path("bench.toml")  # a local file wins


def test_quick_overrides_and_ci_base_merge():
    config = cli.load_config(Path("bench/ci.toml"))
    full = cli.section_params(config, "parity", quick=False)
    quick = cli.section_params(config, "parity", quick=True)
    assert full["steps"] == [4, 8, 16, 32, 64, 128]  # from bench.toml via base
    assert quick["steps"] == [4, 8]  # ci.toml's quick override
    assert "targets" not in full and "quick" not in full
    assert cli.section_targets(config, "parity")["speedup_at_parity"]["direction"] == ">="


def test_pass_fail_and_not_measured():
    assert status(Row("s", "lat", 10.0, "ms", 20.0, "<=")) == "PASS"
    assert status(Row("s", "lat", 30.0, "ms", 20.0, "<=")) == "FAIL"
    assert status(Row("s", "tps", 30.0, "tok/s", 20.0, ">=")) == "PASS"
    assert status(Row("s", "tps", 10.0, "tok/s", 20.0, ">=")) == "FAIL"
    assert status(Row("s", "x", 1.0, "x")) == "-"
    assert status(Row("s", "x", math.nan, "GB", 6.0, "<=", "not measured on cpu")) == "n/a"


def test_context_row_takes_target_from_config():
    ctx = BenchContext(targets={"inference": {"tokens_per_s_b1": {
        "target": 200.0, "unit": "tok/s", "direction": ">="}}})
    row = ctx.row("inference", "tokens_per_s_b1", 250.0, "tok/s")
    assert (row.target, row.direction, status(row)) == (200.0, ">=", "PASS")


def test_table_and_json_format():
    rows = [Row("inference", "latency_p50_ms_b1", 123.456, "ms", 200.0, "<="),
            Row("memory", "llada8b_int4_total_gb", math.nan, "GB", note="not measured on cpu")]
    text = format_table(rows).splitlines()
    assert text[0].split() == ["metric", "target", "actual", "status"]
    assert text[1].split() == ["inference.latency_p50_ms_b1", "<=", "200", "ms", "123.5", "ms",
                               "PASS"]
    assert "not measured on cpu" in text[2] and text[2].endswith("n/a")
    md = format_table(rows, markdown=True).splitlines()
    assert md[1] == "| --- | --- | --- | --- |"
    objs = json.loads(json.dumps([row_json(r) for r in rows]))  # valid JSON, no NaN
    assert {"section", "name", "value", "unit", "target", "pass"} <= set(objs[0])
    assert objs[0]["pass"] is True and objs[1]["value"] is None and objs[1]["pass"] is None
    assert row_from_json(objs[0]) == rows[0]


def test_labels_round_trip():
    name = labelled("e2e_ms", model="ar", K=8, B=1, G=64)
    assert name == "e2e_ms{model=ar,K=8,B=1,G=64}"
    assert parse_name(name) == ("e2e_ms", {"model": "ar", "K": "8", "B": "1", "G": "64"})
    assert parse_name("s_parity") == ("s_parity", {})


def test_baseline_flags_regressions_by_kind():
    base = [Row("inference", "lat", 100.0, "ms"), Row("inference", "tps", 100.0, "tok/s"),
            Row("memory", "mem", 100.0, "MB"), Row("quality", "ppl", 10.0, "ppl")]
    ok = [Row("inference", "lat", 115.0, "ms"), Row("inference", "tps", 85.0, "tok/s"),
          Row("memory", "mem", 105.0, "MB"), Row("quality", "ppl", 99.0, "ppl")]
    assert regressions(ok, base, THRESHOLDS) == []
    bad = [Row("inference", "lat", 130.0, "ms"), Row("inference", "tps", 70.0, "tok/s"),
           Row("memory", "mem", 120.0, "MB"), Row("inference", "new", 1.0, "ms")]
    found = regressions(bad, base, THRESHOLDS)
    assert [(r.name, r.kind) for r in found] == [("lat", "latency"), ("tps", "throughput"),
                                                 ("mem", "memory")]
    assert found[1].change_pct == pytest.approx(-30.0)


def test_chrf():
    assert chrf("the cat sat", "the cat sat") == pytest.approx(100.0)
    assert chrf("", "the cat") == 0.0
    assert 0.0 < chrf("the cat sat", "the dog sat") < 100.0
    assert chrf("xyz", "abc") == 0.0


def test_report_writes_markdown_and_plots(tmp_path):
    rows = [Row("parity", labelled("length_e2e_ms", model=m, B=1, G=g), float(g * k), "ms")
            for m, k in (("diffusion", 1), ("ar", 2)) for g in (32, 64)]
    rows += [Row("parity", labelled("chrf", model="diffusion", K=k), float(k), "chrF")
             for k in (4, 8)]
    rows += [Row("parity", labelled("chrf", model="ar"), 6.0, "chrF"),
             Row("parity", "s_parity", 8.0, "steps")]
    path = write_report(rows, tmp_path, "header")
    text = path.read_text()
    assert (tmp_path / "latency_vs_length.png").stat().st_size > 0
    assert (tmp_path / "quality_vs_steps.png").stat().st_size > 0
    assert not (tmp_path / "federation_ppl.png").exists()
    assert "not plotted" in text and "| parity.s_parity |" in text


def test_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--only", "inference,nosuch"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown section nosuch" in err[0]


@pytest.mark.parametrize("text, message", [
    ("[quality.targets]\nx = { target = 'a', unit = 'x', direction = '<=' }\n", "needs"),
    ("[quality.targets]\nx = { target = 1, unit = 'x', direction = '<' }\n", "direction"),
    ("[quality\n", "invalid TOML"),
    (b"\x8e\xff", "invalid TOML"),
])
def test_bad_config_is_refused(tmp_path, capsys, text, message):
    path = tmp_path / "bench.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit) as exc:
        cli.main(["--config", str(path), "--only", "quality"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, target, message", [
    ("--json", "a_file/rows.json", "cannot create it under"),
    ("--json", "a_folder", "exists and is a folder"),
    ("--report", "a_file", "exists and is not a folder"),
])
def test_unwritable_outputs_are_refused_before_measuring(tmp_path, capsys, flag, target,
                                                         message):
    (tmp_path / "bench.toml").write_text("[quality]\n")  # quality without params: fails fast
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--config", str(tmp_path / "bench.toml"), "--only", "quality",
                  flag, str(tmp_path / target)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "== quality" not in err
    with pytest.raises(SystemExit):  # a missing folder on the way is made
        cli.main(["--config", str(tmp_path / "bench.toml"), "--only", "quality",
                  "--json", str(tmp_path / "new" / "rows.json")])
    assert json.loads((tmp_path / "new" / "rows.json").read_text())[0]["name"] == "error"


def test_missing_section_module_is_reported_not_skipped():
    rows = cli.run_section("nosuchsection", {}, BenchContext())
    assert len(rows) == 1 and "not available" in rows[0].note
    assert status(rows[0]) == "n/a"


def test_failing_section_becomes_error_row():
    rows = cli.run_section("quality", {}, BenchContext())  # no params: KeyError inside
    assert rows[0].name == "error" and "KeyError" in rows[0].note


def test_round_plots_ignore_the_unlabelled_summary_row(tmp_path):
    from bench.common import Row
    from bench.report import _plot_rounds

    rows = [Row("federation", "heldout_ppl", 40.0, "ppl"),
            Row("federation", "heldout_ppl{round=1}", 50.0, "ppl"),
            Row("federation", "heldout_ppl{round=2}", 40.0, "ppl")]
    assert _plot_rounds(rows, "heldout_ppl", "held-out ppl", tmp_path / "p.png")
    assert (tmp_path / "p.png").exists()
    assert not _plot_rounds(rows[:1], "heldout_ppl", "held-out ppl", tmp_path / "q.png")


def test_federation_refuses_a_keep_folder_that_is_not_empty(tmp_path):
    """`keep` must name a new or empty folder: the run would mix its store with another's."""
    from bench import federation

    (tmp_path / "coordinator").mkdir()
    with pytest.raises(ValueError, match="is not empty"):
        federation.run({"keep": str(tmp_path)}, BenchContext())
    assert [p.name for p in tmp_path.iterdir()] == ["coordinator"]
