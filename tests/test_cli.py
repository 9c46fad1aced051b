"""`ruvdllm` on the command line: a LLaDA-layout checkpoint generates; bad input is one
line on stderr with exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ruvdllm.cli import main
from tests.llada_reference import write_llada


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_llada_checkpoint_generates_through_the_cli(tmp_path):
    write_llada(tmp_path / "ck")
    proc = subprocess.run([sys.executable, "-m", "ruvdllm.cli", "generate", "Once upon a time",
                           "--model", str(tmp_path / "ck"), "--steps", "8", "--gen-length", "16",
                           "--block-length", "8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "a completion is printed"


def test_quantize_then_generate(tmp_path, capsys):
    write_llada(tmp_path / "ck")
    code, _, err = run_cli(["quantize", str(tmp_path / "ck"), str(tmp_path / "q8"),
                              "--scheme", "int8"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]
    for quant, expected in (("none", 0), ("int8", 0), ("int4", 2)):  # int8: used as stored
        code, _, err = run_cli(["generate", "Hi", "--model", str(tmp_path / "q8"), "--steps", "4",
                                "--gen-length", "8", "--block-length", "8", "--quant", quant],
                               capsys)
        assert code == expected, err
    assert "stored quantized as int8; load it with quant int8 or none" in err
    (tmp_path / "notes.txt").write_text("mine")  # quantizing into a folder of other files
    code, _, err = run_cli(["quantize", str(tmp_path / "ck"), str(tmp_path), "--scheme", "int8"],
                           capsys)
    assert code == 2 and "not a checkpoint file" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    code, _, err = run_cli(["quantize", str(tmp_path / "q8"), str(tmp_path / "q4"), "--scheme",
                            "int4"], capsys)
    assert code == 2 and "q8 is stored quantized (int8); quantize a float checkpoint" in err
    assert not (tmp_path / "q4").exists()


def test_fast_path_prints_the_reference_answer(tmp_path, capsys):
    write_llada(tmp_path / "ck")
    common = ["generate", "Once upon a time", "--model", str(tmp_path / "ck"), "--steps", "8",
              "--gen-length", "16", "--block-length", "8", "--repetition-penalty", "1",
              "--cache", "dual", "--device", "cpu"]
    fast, reference = (run_cli([*common, flag], capsys) for flag in ("--fast", "--no-fast"))
    assert fast[0] == 0 and fast[1].strip(), fast[2]
    assert fast == reference


def _broken(tmp_path, kind: str) -> str:
    path = tmp_path / kind
    if kind == "missing":
        return str(path)
    write_llada(path)
    if kind == "corrupt":
        (path / "model.safetensors").write_bytes(b"not a safetensors file")
    elif kind == "mismatch":
        cfg = json.loads((path / "config.json").read_text())
        cfg["d_model"] = 64
        (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("kind,extra,message", [
    ("missing", [], "no such model folder"),
    ("corrupt", [], "corrupt safetensors"),
    ("mismatch", [], "config implies"),
    ("ok", ["--gen-length", "30", "--block-length", "8"], "not divisible"),
    ("ok", ["--steps", "2", "--gen-length", "32", "--block-length", "8"], "fewer than"),
    ("ok", ["--gen-length", "256", "--block-length", "32"], "max_sequence_length"),
    ("ok", ["--fast", "--temperature", "0.5"], "greedy"),
    ("ok", ["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
    ("ok", ["--repetition-penalty", "nan"], "repetition_penalty must be a finite number"),
    ("ok", ["--device", "gpu"], "unknown device 'gpu'"),
    ("ok", ["--device", "mps"], "only cpu and cuda"),
    ("ok", ["--device", "cuda"], "no CUDA device is available"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, kind, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    model = _broken(tmp_path, kind)
    prompt = "word " * (40 if "256" in extra else 2)
    code, out, err = run_cli(["generate", prompt, "--model", model, *extra], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == ""


def _export(tmp_path) -> None:
    """A tiny checkpoint at ck/ and an export folder data/ with four wiki test documents."""
    write_llada(tmp_path / "ck")
    (tmp_path / "data" / "wiki").mkdir(parents=True)
    docs = [{"text": "The river runs past the mill. " * 20} for _ in range(4)]
    (tmp_path / "data" / "wiki" / "test.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in docs))


@pytest.mark.parametrize("extra,message", [
    (["--seq-len", "0"], "seq_len must be at least 2"),
    (["--seq-len", "300"], "exceeds the model's max_sequence_length 256"),
    (["--samples", "0"], "samples must be at least 1"),
    (["--max-tokens", "-5"], "max_tokens must be positive"),
])
def test_eval_refuses_settings_that_cannot_score(tmp_path, capsys, extra, message):
    _export(tmp_path)
    args = ["eval", "--model", str(tmp_path / "ck"), "--data", str(tmp_path / "data"),
            "--domains", "wiki", "--seq-len", "32", "--samples", "1"]
    code, out, err = run_cli(args, capsys)
    assert code == 0 and '"ppl"' in out, err  # the folder scores; each bad setting then fails
    code, out, err = run_cli([*args, *extra], capsys)
    assert code == 2 and message in err and out == ""


def test_eval_checks_its_json_path_first_and_makes_missing_folders(tmp_path, capsys):
    _export(tmp_path)
    (tmp_path / "a_file").write_text("")
    args = ["eval", "--model", str(tmp_path / "ck"), "--data", str(tmp_path / "data"),
            "--domains", "wiki", "--seq-len", "32", "--samples", "1", "--json"]
    code, out, err = run_cli([*args, str(tmp_path / "a_file" / "rows.json")], capsys)
    assert code == 2 and "cannot create it under" in err and out == ""
    code, out, err = run_cli([*args, str(tmp_path / "new" / "rows.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "new" / "rows.json").read_text())[0]["domain"] == "wiki"


@pytest.mark.parametrize("extra,message", [
    (["--prompts", "0"], "--prompts and --prompt-tokens must be at least 1"),
    (["--gen-length", "4096"], "no wiki test document has the 8 + 4096 tokens"),
])
def test_sample_quality_refuses_settings_without_prompts(tmp_path, capsys, extra, message):
    _export(tmp_path)
    code, out, err = run_cli(["sample-quality", "--model", str(tmp_path / "ck"), "--scorer",
                              str(tmp_path / "ck"), "--data", str(tmp_path / "data"),
                              "--prompt-tokens", "8", *extra], capsys)
    assert code == 2 and message in err and out == ""


def test_plot_loss_names_curves_by_run_and_refuses_bad_files(tmp_path, capsys):
    for run, losses in (("small", (3.0, 2.5)), ("large", (2.8, 2.1))):
        (tmp_path / run).mkdir()
        (tmp_path / run / "loss.csv").write_text(
            "step,train_loss,valid_loss,lr,seconds\n"
            + "".join(f"{i * 100},{v + 0.1},{v},1e-3,{i}\n" for i, v in enumerate(losses, 1)))
    csvs = [str(tmp_path / run / "loss.csv") for run in ("small", "large")]
    code, out, err = run_cli(["plot-loss", *csvs, "--out", str(tmp_path / "fig" / "loss.svg")],
                             capsys)
    assert code == 0 and "loss.svg" in out, err
    svg = (tmp_path / "fig" / "loss.svg").read_text()
    assert "small valid" in svg and "large train" in svg
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "nan.csv").write_text("step,train_loss,valid_loss\n1,2,\n")
    for csv_file, out_file, message in (
            ("other.csv", "p.png", "not a loss.csv of a training run"),
            ("nan.csv", "p.png", "missing or non-numeric"),
            ("small/loss.csv", "p.txt", "must end in one of"),
            ("small/loss.csv", "fig", "exists and is a folder")):
        code, _, err = run_cli(["plot-loss", str(tmp_path / csv_file), "--out",
                                str(tmp_path / out_file)], capsys)
        assert (code, err.count("\n")) == (2, 1) and message in err, err
        assert not (tmp_path / "p.png").exists()
