"""The committed gRPC stubs match ``proto/autoglm/v1/inference.proto``: CI fails when someone
edits the .proto without running ``python -m auto_glm.rpc.codegen``."""

from __future__ import annotations

import filecmp
import re
import shutil
from pathlib import Path

import pytest

from auto_glm.rpc import codegen

__all__: list[str] = []


def test_committed_stubs_are_current(capsys: pytest.CaptureFixture) -> None:
    assert codegen.main(["--check"]) == 0, capsys.readouterr().err
    assert "current" in capsys.readouterr().out


def test_generate_writes_the_committed_files_with_package_imports(tmp_path: Path) -> None:
    codegen.generate(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(codegen.FILES)
    for name in codegen.FILES:
        assert filecmp.cmp(tmp_path / name, codegen.TARGET / name, shallow=False), name
    grpc_module = (tmp_path / "inference_pb2_grpc.py").read_text()
    assert "from auto_glm.rpc.v1 import inference_pb2" in grpc_module
    assert "from autoglm.v1 import" not in grpc_module


@pytest.mark.parametrize("damaged", codegen.FILES)
def test_check_names_a_stale_stub_and_fails(
    damaged: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    stale = tmp_path / "v1"
    shutil.copytree(codegen.TARGET, stale)
    path = stale / damaged
    path.write_text(path.read_text() + "# edited by hand\n")
    monkeypatch.setattr(codegen, "TARGET", stale)

    assert codegen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert re.findall(r"inference_pb2\w*\.pyi?", err) == [damaged]
    assert "python -m auto_glm.rpc.codegen" in err


def test_regenerating_repairs_stale_stubs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    stale = tmp_path / "v1"
    shutil.copytree(codegen.TARGET, stale)
    (stale / "inference_pb2.py").write_text("# edited by hand\n")
    monkeypatch.setattr(codegen, "TARGET", stale)

    assert codegen.main([]) == 0
    assert codegen.main(["--check"]) == 0, capsys.readouterr().err
