"""The ``autoglm`` command line: help, argument plumbing, errors, and a real generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from auto_glm import cli


class FakeLLM:
    """Records what the CLI asks of the Python API."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        self.init, self.calls, self.closed = kwargs, [], False
        FakeLLM.instances.append(self)

    def generate(self, prompt: str, **options: Any) -> str:
        self.calls.append(("generate", prompt, options))
        return "whole answer"

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        self.calls.append(("stream", prompt, options))
        yield from ["pie", "ces"]

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_llm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    FakeLLM.instances = []
    monkeypatch.setattr("auto_glm.api.AutoGLM", FakeLLM)
    return FakeLLM


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert cli.COMMANDS and all(name in out for name in cli.COMMANDS)


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "generate" in capsys.readouterr().err


def test_generate_streams_by_default(fake_llm, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "Hi", "--max-new-tokens", "7", "--temperature", "0", "--top-p", "0.5"]
    assert cli.main([*argv, "--top-k", "3", "--seed", "4", "--stop", "x", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out == "pieces\n"
    (llm,) = fake_llm.instances
    expected_init = {"model_name": None, "device": "auto", "dtype": "fp32", "allow_pickle": False}
    assert llm.init == expected_init
    options = {"max_new_tokens": 7, "temperature": 0.0, "top_p": 0.5, "top_k": 3, "stop": ["x"]}
    assert llm.calls == [("stream", "Hi", {**options, "seed": 4})]
    assert llm.closed


def test_generate_no_stream(fake_llm, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "Hi", "--no-stream", "--model", "m", "--allow-pickle"]) == 0
    assert capsys.readouterr().out == "whole answer\n"
    (llm,) = fake_llm.instances
    assert llm.init["model_name"] == "m" and llm.init["allow_pickle"]
    assert llm.calls[0][0] == "generate"


def test_load_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "Hi", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("autoglm: error: model directory") and "Traceback" not in err


def test_demo_model_prints_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("auto_glm.checkpoints.demo_model_path", lambda: tmp_path / "demo")
    assert cli.main(["demo-model"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'demo'}\n"


def test_generate_with_a_real_checkpoint(make_checkpoint, capsys) -> None:
    path = make_checkpoint("Glm4ForCausalLM")
    argv = ["generate", "Hello", "--model", str(path), "--max-new-tokens", "8"]
    assert cli.main([*argv, "--temperature", "0", "--dtype", "float32", "--no-stream"]) == 0
    greedy = capsys.readouterr().out
    assert cli.main([*argv, "--temperature", "0", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == greedy  # streaming pieces add up to the same text
    assert greedy.strip()
