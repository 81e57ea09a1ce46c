"""Server settings: precedence, validation messages, the example file and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from auto_glm.serving import ConfigError, ServerConfig, load_config
from auto_glm.serving.cli import main

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = load_config(environ={})
    assert (config.host, config.port, config.device, config.model_name_or_path) == (
        "127.0.0.1",
        8080,
        "auto",
        None,
    )


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 9001\nmax_num_seqs: 8\nlog_level: debug\ndevice: cpu\n")
    environ = {"AUTOGLM_PORT": "9002", "AUTOGLM_MAX_NUM_SEQS": "4", "AUTOGLM_CACHE": "/x"}
    config = load_config(path, {"port": "9003", "device": None}, environ=environ)
    assert config.port == 9003  # flag
    assert config.max_num_seqs == 4  # environment
    assert config.log_level == "debug"  # file
    assert config.device == "cpu"  # a flag left unset does not override
    assert config.max_queued_requests == 256  # default


def test_empty_environment_value_counts_as_unset(tmp_path: Path) -> None:
    # `AUTOGLM_PORT=` (as compose files and `env -u`-less shells leave it) must neither fail
    # validation nor hide the file's value: the key falls through to the file, then the default
    path = write(tmp_path, "port: 9001\nmodel_name_or_path: /models/glm\n")
    environ = {"AUTOGLM_PORT": "", "AUTOGLM_MODEL_NAME_OR_PATH": "", "AUTOGLM_MAX_NUM_SEQS": ""}
    config = load_config(path, environ=environ)
    assert (config.port, config.model_name_or_path, config.max_num_seqs) == (
        9001,
        "/models/glm",
        64,
    )


def test_example_config_is_valid_and_documents_every_key() -> None:
    config = load_config(REPO / "config.example.yaml", environ={})
    assert config.kv_cache_memory == 1 << 30
    text = (REPO / "config.example.yaml").read_text()
    assert all(f"{name}:" in text for name in ServerConfig.model_fields)


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("log_level: loud\n", {}, ["log_level='loud'", "'critical'", "'trace'"]),
        ("prot: 80\n", {}, ["unknown key 'prot'", "allowed keys:", "port"]),
        ("", {"AUTOGLM_PORT": "eighty"}, ["port='eighty'", "$AUTOGLM_PORT", "valid integer"]),
        ("", {"AUTOGLM_DEVICE": "tpu"}, ["device='tpu'", "auto, cpu, cuda, cuda:N"]),
        ("max_num_seqs: 0\n", {}, ["max_num_seqs=0", "greater than or equal to 1"]),
        # an entry that could never match a URL's host was taken without a word
        (
            "",
            {"AUTOGLM_ALLOWED_MEDIA_DOMAINS": "images.example.com,http://example.com/"},
            ["'http://example.com/' is not a host name", "$AUTOGLM_ALLOWED_MEDIA_DOMAINS"],
        ),
        ("allowed_media_domains: ['*']\n", {}, ["'*' is not a host name", "*.example.com"]),
        ("kv_cache_memory: 12XB\n", {}, ["byte unit: XB", "e.g. 512MiB or 2GB"]),
        ("port: 8081\nport: 8082\n", {}, ["not valid YAML", "key 'port' is given twice"]),
        ("", {"AUTOGLM_MAX_REQUEST_BYTES": "-1"}, ["max_request_bytes='-1'", "e.g. 512MiB"]),
        # grpc's C ints: refused here, not by an OverflowError once the model has loaded
        ("grpc_max_message_bytes: 3GiB\n", {}, ["grpc_max_message_bytes", "2147483647"]),
        ("- a list\n", {}, ["must be a mapping"]),
        ("port: [\n", {}, ["not valid YAML"]),
    ],
)
def test_errors_name_the_key_and_the_allowed_values(
    tmp_path: Path, text: str, environ: dict, expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ=environ)
    for fragment in expected:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ({"grpc_port": "9000"}, "grpc_port=9000 does not apply with --ray"),
        ({"keep_alive": "10m"}, "scale to zero with --autoscale 0,N"),
        ({"serve": ["chat@v2,keep_alive=5m"]}, "keep_alive does not apply with --ray"),
        ({"serve": ["chat,kv_share=0.5"]}, "kv_share does not apply with --ray"),
    ],
)
def test_a_setting_ray_cannot_honour_is_refused_not_dropped(overrides: dict, said: str) -> None:
    # these were accepted and silently ignored: no gRPC port, no unloading
    with pytest.raises(ConfigError, match=said):
        load_config(overrides={**overrides, "ray": True}, environ={})
    load_config(overrides=overrides, environ={})  # without --ray they apply


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("served_model_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value).startswith(f"config file {path} is not UTF-8 text (byte 22")
    assert str(caught.value).endswith("save it as UTF-8")


def test_cli_reports_a_bad_setting_with_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = write(tmp_path, "port: 8080\n")
    assert main(["--config", str(path), "--port", "70000"]) == 2
    assert "port='70000' (from --port)" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_queue_policy_auto_is_fair_with_tenants_and_priority_without() -> None:
    config = load_config(environ={})
    assert config.engine_options(has_tenants=True)["queue_policy"] == "fair"
    assert config.engine_options(has_tenants=False)["queue_policy"] == "priority"
    fixed = load_config(environ={"AUTOGLM_QUEUE_POLICY": "fcfs"})
    assert fixed.engine_options(has_tenants=True)["queue_policy"] == "fcfs"
    with pytest.raises(ConfigError, match="queue_policy='lottery'"):
        load_config(environ={"AUTOGLM_QUEUE_POLICY": "lottery"})


def test_admin_key_is_never_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"AUTOGLM_ADMIN_KEY": "short-secret"})
    assert "short-secret" not in str(caught.value) and "admin_key=<hidden>" in str(caught.value)
