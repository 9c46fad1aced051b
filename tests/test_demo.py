"""`ruvdllm demo` end to end: real SuperLink, SuperNodes and node daemons on loopback.

A kept work folder is run twice: the second run resumes the federation persisted there,
and everything it reports (rounds, versions, the version a node serves) is its own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from node_agent.demo import main


def run(workdir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    main(["--nodes", "2", "--rounds", "1", "--local-steps", "1", "--chars", "3000",
          "--domains", "pydocs", "shakespeare", "--workdir", str(workdir)])
    return capsys.readouterr().out


def test_a_kept_work_folder_resumes_and_reports_only_the_new_run(tmp_path, capsys):
    first = run(tmp_path / "demo", capsys)
    assert "round 1: merged -> version 2 (2/2 accepted" in first
    assert "every node serves version 2" in first and "adapter-v2" in first
    second = run(tmp_path / "demo", capsys)
    assert "resuming the federation in" in second and "1 rounds so far, version 2" in second
    assert re.findall(r"^round (\d+):", second, re.M) == ["2"]
    assert "round 2: merged -> version 3 (2/2 accepted" in second
    assert "every node serves version 3" in second and "adapter-v3" in second
    assert re.search(r"domain\s+v1\s+v3", second)


@pytest.mark.parametrize("bad", [["--nodes", "1"], ["--rounds", "0"], ["--local-steps", "0"],
                                 ["--chars", "-5"], ["--domains", "nope"]])
def test_bad_options_are_refused_before_anything_starts(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        main([*bad, "--workdir", str(tmp_path / "w")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "w" / "coordinator").exists()
