"""A non-editable install (`pip install .`, the README's first command) carries every data
file the installed code opens beside its modules: the embedded models and tokenizer, the
gRPC schema and the Flower app's pyproject.toml that `coordinator.launch` hands to
`flwr run`. An editable install reads them from the checkout, so only a built wheel shows
one missing."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folders (or file patterns) of data that installed code reads next to its own modules.
DATA = ("ruvdllm/assets/", "coordinator/flwr_app/", "proto/ruvdllm.proto")


def tracked(*paths: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", *paths], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return out.splitlines()


def test_wheel_carries_the_data_files_installed_code_opens(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in tracked():  # a copy, so the build leaves no build/ or egg-info in the tree
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("ruvdllm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    wanted = tracked(*DATA)
    assert "coordinator/flwr_app/pyproject.toml" in wanted
    assert any(w.startswith("ruvdllm/assets/default/") for w in wanted)
    missing = [w for w in wanted if w not in names]
    assert not missing, f"absent from the wheel: {missing}"
