"""``autoglm models`` end to end: through ``auto_glm.cli.main`` and as a separate process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from auto_glm.cli import main

Keys = tuple[Path, Path]


@pytest.fixture
def models(sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """``models(*args) -> (status, stdout, stderr)`` on a fresh SQLite database."""

    def run(*args: str) -> tuple[int, str, str]:
        status = main(
            ["models", "--database", sqlite_url, "--registry", str(tmp_path / "reg"), *args]
        )
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_add_list_show_verify_remove(models, model_dir: Path) -> None:
    status, out, _ = models("add", "glm", str(model_dir), "--version", "1")
    assert status == 0
    assert out.startswith("Added glm@1: 6 files, ") and "Glm4ForCausalLM, float32, unsigned" in out
    assert models("add", "glm", str(model_dir), "--version", "2", "--copy")[0] == 0
    status, out, _ = models("list")
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME", "VERSION", "FILES", "SIZE", "ARCHITECTURE", "DTYPE", "SIGNED", "ADDED"
    ]  # fmt: skip
    assert [line.split()[:3] for line in lines[1:]] == [["glm", "1", "6"], ["glm", "2", "6"]]
    status, out, _ = models("show", "glm")
    assert out.startswith("model: glm (2 versions)\n")
    assert "version:      2 (latest)" in out and "architecture: Glm4ForCausalLM" in out
    assert "(copied into the registry)" in out and "signed by:    unsigned" in out
    status, out, _ = models("verify", "glm")
    assert status == 0
    assert out.startswith("OK glm@2: 6 files, ") and out.count("\n") == 1
    assert out.rstrip().endswith("signature: none (unsigned)")
    status, out, _ = models("remove", "glm@2")
    assert out.startswith("Removed glm@2 and deleted its copied files in ")
    status, out, _ = models("remove", "glm@1")
    assert "were not copied and are kept" in out and model_dir.is_dir()
    assert models("list")[1].startswith("No models registered yet")


def test_verify_names_each_bad_file_and_exits_1(models, model_dir: Path) -> None:
    models("add", "glm", str(model_dir), "--version", "1")
    (model_dir / "evil.py").write_text("x")
    (model_dir / "tokenizer.json").write_text("{}")
    status, out, err = models("verify", "glm@1")
    assert (status, out) == (1, "")
    lines = err.splitlines()
    assert lines[0] == "autoglm: error: glm@1 failed its integrity check:"
    assert lines[1].startswith("  - 'tokenizer.json' has 2 bytes, expected ")
    assert lines[2] == (
        "  - unexpected file 'evil.py' is not in the manifest of glm@1; remove it or register "
        "a new version"
    )
    assert lines[3] == "2 problems."


def test_keygen_sign_and_verify_with_trusted_keys(
    models, model_dir: Path, tmp_path: Path, other_keys: Keys
) -> None:
    status, out, _ = models("keygen", str(tmp_path / "keys"))
    private, public = (
        tmp_path / "keys" / "signing-key.pem",
        tmp_path / "keys" / "signing-key.pub.pem",
    )
    assert status == 0 and private.is_file() and public.is_file()
    fingerprint = out.splitlines()[-1].removeprefix("Key fingerprint: ")
    models("add", "glm", str(model_dir), "--version", "1")
    status, _, err = models(
        "verify", "glm@1", "--signatures", "required", "--trusted-key", str(public)
    )
    assert status == 1 and "glm@1 has no signature and verify_signatures is required" in err
    status, out, _ = models("sign", "glm@1", "--sign-key", str(private))
    assert out == f"Signed glm@1 with key {fingerprint}.\n"
    status, out, _ = models(
        "verify", "glm@1", "--signatures", "required", "--trusted-key", str(public)
    )
    assert status == 0 and out.rstrip().endswith(f"verified, signed by sha256:{fingerprint[:16]}")
    status, _, err = models(
        "verify", "glm@1", "--signatures", "required", "--trusted-key", str(other_keys[1])
    )
    assert status == 1 and "does not verify with any trusted key" in err
    status, out, _ = models(
        "add", "glm", str(model_dir), "--version", "2", "--sign-key", str(private)
    )
    assert f"sha256:{fingerprint[:16]}; files in" in out
    assert f"signed by:    key {fingerprint}" in models("show", "glm")[1]


def test_show_takes_one_version_and_verify_reads_every_trusted_key(
    models, model_dir: Path, tmp_path: Path
) -> None:
    models("add", "glm", str(model_dir), "--version", "1")
    models("add", "glm", str(model_dir), "--version", "2")
    status, out, _ = models("show", "glm@1")
    assert status == 0 and out.startswith("model: glm (1 version)\n")
    assert "version:      1" in out and "version:      2" not in out
    status, _, err = models("show", "glm@9")
    assert status == 2 and "unknown version '9' of model 'glm': its versions are 1, 2" in err
    # an unsigned version checked no key, so a wrong key file passed unnoticed
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("hello\n")
    status, out, err = models("verify", "glm@1", "--trusted-key", str(not_a_key))
    assert (status, out) == (2, "") and f"{not_a_key} is not a PEM public key" in err


def test_refusals_exit_2_with_one_line(models, model_dir: Path) -> None:
    cases = {
        ("verify", "nope"): "unknown model 'nope': none is registered yet",
        ("remove", "glm"): "'glm' names no version: write NAME@VERSION, e.g. glm@1",
        ("add", "a/b", str(model_dir), "--version", "1"): "invalid model name 'a/b'",
    }
    for args, message in cases.items():
        status, out, err = models(*args)
        assert (status, out) == (2, ""), err
        assert err.startswith("autoglm: error: ") and err.count("\n") == 1 and message in err


def test_options_come_from_the_environment_and_after_the_action(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    database = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("AUTOGLM_DATABASE_URL", database)
    monkeypatch.setenv("AUTOGLM_REGISTRY_DIR", str(tmp_path / "env-reg"))
    assert main(["models", "add", "glm", str(model_dir), "--version", "1", "--copy"]) == 0
    assert (tmp_path / "env-reg" / "glm" / "1" / "config.json").is_file()
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["models", "list", "--database", other]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("No models registered yet")


def test_as_a_process_with_exit_statuses(model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "AUTOGLM_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"}

    def autoglm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "auto_glm.cli", "models", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    assert autoglm("add", "glm", str(model_dir), "--version", "1").returncode == 0
    assert autoglm("verify", "glm@1").returncode == 0
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    failed = autoglm("verify", "glm@1")
    assert failed.returncode == 1 and "'model.safetensors' has the wrong content" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert autoglm("show", "missing").returncode == 2
    # a reader that leaves at once (`| head -1`): no "Broken pipe" error, the status of a
    # writer killed by SIGPIPE
    reader = subprocess.Popen(
        [sys.executable, "-m", "auto_glm.cli", "models", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    reader.stdout.close()  # before the child, still importing, writes its table
    _, err = reader.communicate(timeout=120)
    assert (reader.returncode, err) == (141, b"")
