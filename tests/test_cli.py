"""The ``autoglm`` command line: help, argument plumbing, errors, and a real generation."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from auto_glm import GLMModel, cli
from auto_glm.engine.config import EngineConfig
from auto_glm.layers.attention_backends import ATTENTION_BACKENDS
from auto_glm.serving.config import ServerConfig


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert cli.COMMANDS and all(name in out for name in cli.COMMANDS)


_IMPORTED = (
    "import sys\n"
    "from auto_glm.cli import main\n"
    "try:\n"
    "    status = main(sys.argv[1:])\n"
    "except SystemExit as stop:\n"
    "    status = stop.code\n"
    "loaded = ['tenants', 'registry', 'serving', 'bench', 'engine', 'torch']\n"
    "print(status, [p for p in loaded if f'auto_glm.{p}' in sys.modules or p in sys.modules])\n"
)


@pytest.mark.parametrize(
    ("argv", "ended"),
    [
        (["tenants", "list", "--database", "sqlite:///{tmp}/store.db"], "0 ['tenants']"),
        (["tenants", "--bogus"], "2 ['tenants']"),  # refused by `tenants`'s own arguments
        (["demo-model", "--help"], "0 []"),
        (["--version"], "0 []"),
        (["tenant"], "2 []"),  # no such command: refused before any command's arguments
    ],
)
def test_a_command_imports_only_its_own_modules(tmp_path: Path, argv: list[str], ended: str):
    """`autoglm tenants ...` starts without the registry's, the server's or the engine's
    modules (and torch), and `--version` without any command's: a store command takes
    about a second, not the several that importing every command's arguments took."""
    argv = [word.format(tmp=tmp_path) for word in argv]
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTED, *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == ended, done.stderr[-2000:]


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "generate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["generate", "Hi", "--max-tokens", "3"],
            "autoglm generate: error: unrecognized arguments: --max-tokens 3 "
            "(did you mean --max-new-tokens for --max-tokens?); see autoglm generate --help",
        ),
        (
            ["serve", "--kv-cache-mib=64", "--prot", "1", "--zzz"],
            "autoglm serve: error: unrecognized arguments: --kv-cache-mib=64 --prot 1 --zzz "
            "(did you mean --kv-cache-memory for --kv-cache-mib, --port for --prot?)",
        ),
        (  # a command's own command
            ["tenants", "create", "acme", "--max-concurent", "2"],
            "autoglm tenants create: error: unrecognized arguments: --max-concurent 2 "
            "(did you mean --max-concurrent for --max-concurent?)",
        ),
        (["--zzz"], "autoglm: error: unrecognized arguments: --zzz; see autoglm --help"),
    ],
)
def test_an_unknown_option_is_named_by_its_command_with_the_nearest_one(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert said in err, err
    assert err.startswith(f"usage: {said.split(':')[0]} "), err  # the command's usage


def test_options_reach_the_engine(make_checkpoint, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI prints what the Python API returns for the same options, streamed or not."""
    path = make_checkpoint("Glm4ForCausalLM")
    options = {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 4}
    with GLMModel(str(path), device="cpu", dtype="float32") as model:
        expected = model.generate("Hi", **options)
    argv = [
        "generate",
        "Hi",
        "--model",
        str(path),
        "--dtype",
        "fp32",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "20",
        "--seed",
        "4",
    ]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert cli.main([*argv, "--no-stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_stop_string_option(make_checkpoint, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_checkpoint("Glm4ForCausalLM")
    argv = [
        "generate",
        "Hi",
        "--model",
        str(path),
        "--dtype",
        "fp32",
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
        "--no-stream",
    ]
    assert cli.main(argv) == 0
    free = capsys.readouterr().out.rstrip("\n")
    stop = free[len(free) // 2 :][:2]
    assert cli.main([*argv, "--stop", stop]) == 0
    assert capsys.readouterr().out.rstrip("\n") == free[: free.index(stop)]


def test_load_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "Hi", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("autoglm: error: model directory") and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens 0 is invalid: it must be at least 1"),
        (["--top-p", "2"], "--top-p 2.0 is invalid: it must be in (0, 1]"),
    ],
)
def test_a_bad_sampling_flag_is_named_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], said: str
) -> None:
    # the missing model would fail to load (status 1): the flag is refused first
    assert cli.main(["generate", "Hi", "--model", str(tmp_path / "missing"), *flags]) == 2
    assert capsys.readouterr().err == f"autoglm generate: {said}\n"


def test_demo_model_prints_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo-model"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert (printed / "config.json").is_file() and (printed / "model.safetensors").is_file()


def test_generate_with_a_real_checkpoint(make_checkpoint, capsys) -> None:
    path = make_checkpoint("Glm4ForCausalLM")
    argv = ["generate", "Hello", "--model", str(path), "--max-new-tokens", "8"]
    assert cli.main([*argv, "--temperature", "0", "--dtype", "float32", "--no-stream"]) == 0
    greedy = capsys.readouterr().out
    assert cli.main([*argv, "--temperature", "0", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == greedy  # streaming pieces add up to the same text
    assert greedy.strip()


def test_flashinfer_is_a_setting_of_the_engine_the_server_and_the_cli(make_checkpoint):
    assert EngineConfig(attention_backend="flashinfer").attention_backend == "flashinfer"
    served = typing.get_args(ServerConfig.model_fields["attention_backend"].annotation)
    assert served == ATTENTION_BACKENDS
    args = cli.build_parser().parse_args(["serve", "--attention-backend", "flashinfer"])
    assert args.attention_backend == "flashinfer"
    path = make_checkpoint("Glm4ForCausalLM", seed=5, partial_rotary_factor=0.5, head_dim=16)
    with pytest.raises(ValueError, match=r"attention_backend='flashinfer' cannot run on cpu"):
        GLMModel(str(path), device="cpu", dtype="float32", attention_backend="flashinfer")
