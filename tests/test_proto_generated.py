"""The committed generated modules are exactly what grpcio-tools makes from ruvdllm.proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("ruvdllm_pb2.py", "ruvdllm_pb2_grpc.py", "ruvdllm_pb2.pyi")


def test_regenerating_gives_identical_output(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "proto" / "ruvdllm.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        assert (tmp_path / "proto" / name).read_bytes() == (ROOT / "proto" / name).read_bytes(), (
            name
        )


def test_generated_modules_import_as_package():
    from proto import ruvdllm_pb2, ruvdllm_pb2_grpc

    assert ruvdllm_pb2.LoRADelta.DESCRIPTOR.full_name == "ruvdllm.v1.LoRADelta"
    assert hasattr(ruvdllm_pb2_grpc, "CoordinatorServicer") and hasattr(
        ruvdllm_pb2_grpc, "NodeAgentStub"
    )


def test_every_field_is_documented():
    lines = (ROOT / "proto" / "ruvdllm.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        is_field = (
            stripped.endswith(";")
            and "=" in stripped
            and not stripped.startswith(("//", "syntax", "package"))
        )
        is_decl = stripped.startswith(("message ", "service ", "rpc ", "enum "))
        if is_field or is_decl:
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"
