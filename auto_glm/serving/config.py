"""Server settings: defaults < ``config.yaml`` < ``AUTOGLM_*`` environment < CLI flags.

Every field of :class:`ServerConfig` can be set in all three places under the same name
(``port`` / ``AUTOGLM_PORT`` / ``--port``). A bad value is reported with the key, where it
came from, and what is allowed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from auto_glm.fleet.spec import ServeSpec, parse_duration

__all__ = ["ENV_PREFIX", "ConfigError", "ServerConfig", "load_config"]

ENV_PREFIX = "AUTOGLM_"
_DEVICES = "auto, cpu, cuda, cuda:N"
_SECRETS = frozenset({"admin_key"})  # never echoed in an error
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
DType = Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]


class ConfigError(ValueError):
    """The server configuration is invalid; the message names the key and the fix."""


class ServerConfig(BaseModel):
    """Everything ``autoglm serve`` needs; field docs double as the README's config table."""

    model_config = ConfigDict(extra="forbid")

    model_name_or_path: str | None = Field(
        None, description="Local model directory or Hugging Face hub id; empty: the demo model"
    )
    served_model_name: str | None = Field(
        None, description="Name clients pass as `model`; default: the model directory's name"
    )
    registry_dir: str | None = Field(
        None,
        description="Model registry root (files of versions added with --copy); empty: "
        "$AUTOGLM_HOME/models. Versions are recorded in database_url",
    )
    serve: list[str] = Field(
        default_factory=list,
        description="Registered models to serve instead of --model, each NAME[@VERSION]"
        "[,keep_alive=10m][,kv_share=2] (repeat the flag; space-separated in the environment)",
    )
    keep_alive: str | None = Field(
        None,
        description="Unload a served model idle this long (e.g. 300, 10m, 2h) and reload it "
        "on the next request; per model: keep_alive= in --serve; empty: never",
    )
    verify_signatures: Literal["off", "optional", "required"] = Field(
        "optional",
        description="Signatures of registered versions at every load: required refuses an "
        "unsigned or badly signed version; optional checks signed ones against trusted_keys",
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Public keys (PEM files, comma-separated) that may sign registered versions",
    )
    device: str = Field("auto", description=f"One of: {_DEVICES}")
    dtype: DType = Field("auto", description="Weight dtype; auto: bfloat16 (float16 on old GPUs)")
    compute_dtype: DType = Field(
        "auto",
        description="Arithmetic dtype; auto: the weight dtype, but float32 on CPUs "
        "without native bfloat16",
    )
    quantization: Literal["none", "int8", "w8a8"] = Field(
        "none",
        description="Linear weights at load: none; int8: INT8 weights (scale per output "
        "channel); w8a8: INT8 weights and activations, on CPUs with AVX512-VNNI or AMX and "
        "CUDA GPUs of compute capability 7.5+",
    )
    kv_cache_dtype: Literal["auto", "int8", "fp8_e4m3"] = Field(
        "auto",
        description="KV cache precision: auto (the compute dtype); int8 or fp8_e4m3 (a "
        "scale per token and KV head): about twice the tokens in the same kv_cache_memory",
    )
    kv_cache_scales: Literal["dynamic", "calibrate", "checkpoint"] = Field(
        "dynamic",
        description="Where a quantized KV cache's scales come from: dynamic (per token and KV "
        "head); calibrate (per layer and KV head, measured at load over a fixed text: exactly "
        "twice the tokens of a bfloat16 cache; needs kv_cache_dtype int8 or fp8_e4m3); "
        "checkpoint (a compressed-tensors kv_cache_scheme's, used whenever there is one)",
    )
    attention_backend: Literal["auto", "torch", "cpu", "triton", "flashinfer"] = Field(
        "auto",
        description="Attention kernels: auto (native kernels on the CPU; on a CUDA GPU "
        "FlashInfer's where the gpu extra installed it, else Triton; plain torch where those "
        "cannot run), torch, cpu, triton or flashinfer",
    )
    cuda_graphs: bool = Field(
        True,
        description="Replay decode steps from CUDA graphs captured at start (a CUDA GPU with "
        "the Triton or FlashInfer backend; elsewhere the engine runs eagerly); false: every "
        "step eagerly",
    )
    host: str = Field(
        "127.0.0.1",
        description="Interface to listen on; 0.0.0.0 (every interface) lets other machines in",
    )
    port: int = Field(8080, ge=1, le=65535, description="TCP port to listen on")
    grpc_port: int | None = Field(
        None, ge=1, le=65535, description="Also serve the gRPC API on this port; empty: no gRPC"
    )
    grpc_tls_cert: str | None = Field(
        None, description="PEM certificate (chain) for gRPC over TLS; needs grpc_tls_key"
    )
    grpc_tls_key: str | None = Field(None, description="PEM private key of grpc_tls_cert")
    grpc_max_message_bytes: ByteSize = Field(
        ByteSize(4 << 20),
        gt=0,
        le=2**31 - 1,  # gRPC's limits are C ints
        description="Largest gRPC message either way, e.g. 4MiB (at most 2GiB - 1 byte)",
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Context length limit (prompt + output); default: the model's"
    )
    kv_cache_memory: ByteSize | None = Field(
        None, description="KV cache size, e.g. 2GiB; default: half the free memory"
    )
    max_num_seqs: int = Field(64, ge=1, description="Most requests decoded in one batch")
    max_num_batched_tokens: int = Field(512, ge=1, description="Most tokens in one engine step")
    max_queued_requests: int = Field(
        256, ge=1, description="Most requests waiting for a batch slot; beyond it: 429"
    )
    max_request_bytes: ByteSize = Field(
        ByteSize(20 << 20),
        gt=0,
        description="Largest request body, e.g. 20MiB (room for a base64 screenshot); "
        "checked while it arrives, before parsing",
    )
    max_prompt_chars: int = Field(
        1_000_000,
        ge=1,
        description="Most characters of prompt text in one request (all prompts or messages "
        "together), checked before tokenizing",
    )
    max_images_per_request: int = Field(
        8, ge=0, description="Most images in one chat request, checked before any is decoded"
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Most pixels (width x height) of one image, read from its header before "
        "decoding",
    )
    max_image_bytes: ByteSize = Field(
        ByteSize(10 << 20), gt=0, description="Largest image file (decoded data URL or download)"
    )
    allowed_media_domains: list[str] = Field(
        default_factory=list,
        description="Hosts image URLs may be fetched from (comma-separated; *.example.com "
        "for subdomains); empty: only data: URLs",
    )
    media_fetch_timeout: float = Field(
        5.0, gt=0, description="Seconds an image download may take from an allowed host"
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names clients may use besides loopback names (comma-separated; "
        "* allows any); checked when bound to loopback or when set",
    )
    database_url: str | None = Field(
        None,
        description="Tenant store: sqlite:///FILE or postgresql+psycopg://...; empty: "
        "$AUTOGLM_HOME/autoglm.db (AUTOGLM_HOME defaults to ~/.cache/autoglm)",
    )
    auth: Literal["auto", "off", "required"] = Field(
        "auto",
        description="API keys on inference routes; auto: required once the store holds a key",
    )
    admin_key: SecretStr | None = Field(
        None, min_length=16, description="Key of the /admin API (16+ characters); empty: disabled"
    )
    metrics_auth: bool = Field(False, description="Make /metrics require the admin key")
    queue_policy: Literal["auto", "fcfs", "priority", "fair"] = Field(
        "auto",
        description="Order of competing requests: fair (weighted share per tenant), priority, "
        "fcfs; auto: fair when the store has tenants, else priority",
    )
    engine_process: bool = Field(
        False,
        description="Run each model's engine (its loop and detokenizing) in a child process, "
        "so the HTTP streams do not share its GIL: faster streaming of large batches on a GPU",
    )
    ray: bool = Field(
        False,
        description="Serve as a Ray Serve application: an ingress and engine replicas "
        "(see the README's Scale-out); needs pip install 'open-autoglm[ray]'",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join (e.g. ray://head:10001); empty: start a local one"
    )
    num_replicas: int = Field(1, ge=1, description="Engine replicas with --ray (fixed count)")
    autoscale: str | None = Field(
        None,
        description="Engine replicas with --ray between MIN,MAX by load, e.g. 1,4; MIN may be "
        "0 (scale to zero); replaces num_replicas",
    )
    autoscale_target_requests: int = Field(
        8, ge=1, description="Ongoing requests per replica that autoscaling aims for"
    )
    upscale_delay_s: float = Field(
        10.0, ge=0, description="Seconds of load above target before a replica is added"
    )
    downscale_delay_s: float = Field(
        60.0, ge=0, description="Seconds of load below target before a replica is removed"
    )
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each engine replica")
    ingress_replicas: int = Field(
        1, ge=1, description="Ingress replicas with --ray (HTTP parsing, auth, streaming)"
    )
    ingress_cpus: float = Field(0.5, gt=0, description="CPUs reserved by each ingress replica")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each engine replica")
    request_timeout: float = Field(
        600.0, gt=0, description="Seconds a request may run before it ends with a 504 error"
    )
    stream_interval: int = Field(
        1,
        ge=1,
        description="Tokens per streamed update after the first: 1 sends each as it is made; "
        "more send fewer, larger events, which a server busy with many streams serves faster",
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM/SIGINT"
    )
    log_level: LogLevel = Field("info", description="Server log level")
    log_format: Literal["json", "text"] = Field(
        "json", description="Log lines: one JSON object per line, or text for humans"
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP collector for traces, e.g. http://otel:4318; empty: none"
    )
    tool_call_parser: Literal["auto", "glm4", "glm45", "hermes", "llama3", "none"] = Field(
        "auto",
        description="How replies are read as tool calls: glm4 (name\\n{json}), glm45 "
        "(<arg_key>/<arg_value>), hermes (Qwen <tool_call>{json}), llama3 (JSON); auto: "
        "from the chat template and architecture; none: calls stay in the content",
    )
    reasoning_parser: Literal["none", "glm45", "deepseek_r1"] = Field(
        "none",
        description="Move <think>...</think> into reasoning_content: glm45 (the reply "
        "opens <think>), deepseek_r1 (the prompt opened it); none: it stays in the content",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        name = value.strip().lower()
        head, _, index = name.partition(":")
        if name in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
            return name
        raise ValueError(f"use one of: {_DEVICES}")

    @field_validator(
        "model_name_or_path",
        "served_model_name",
        "database_url",
        "admin_key",
        "registry_dir",
        "grpc_port",
        "grpc_tls_cert",
        "grpc_tls_key",
        "ray_address",
        "autoscale",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return value or None

    @field_validator("serve", mode="before")
    @classmethod
    def _split_serve(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment: "chat@v2 embed,keep_alive=5m"
            value = value.split()
        if isinstance(value, list):
            return [_serve_entry(entry) for entry in value]
        return value

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _check_keep_alive(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        parse_duration(str(value), "keep_alive")
        return str(value)

    @field_validator("autoscale")
    @classmethod
    def _check_autoscale(cls, value: str | None) -> str | None:
        if value is None:
            return None
        low, sep, high = value.partition(",")
        if not (sep and low.strip().isdigit() and high.strip().isdigit()):
            raise ValueError("use MIN,MAX replicas, e.g. 1,4 (MIN may be 0)")
        if int(high) < max(int(low), 1):
            raise ValueError("MAX must be at least MIN and at least 1")
        return f"{int(low)},{int(high)}"

    @model_validator(mode="after")
    def _one_source(self) -> ServerConfig:
        if self.serve and self.model_name_or_path:
            raise ValueError(
                "model_name_or_path and serve both name what to serve: use --model PATH for "
                "one unregistered model, or --serve NAME[@VERSION] (repeatable) for "
                "registered ones"
            )
        if self.serve and self.served_model_name:
            raise ValueError(
                "served_model_name applies to --model only: with --serve, models are served "
                "under their registered names"
            )
        if bool(self.grpc_tls_cert) != bool(self.grpc_tls_key):
            raise ValueError(
                "grpc_tls_cert and grpc_tls_key go together: give both PEM files for TLS, or "
                "neither for plaintext gRPC"
            )
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ValueError(
                f"grpc_port={self.grpc_port} is also the HTTP port: choose another --grpc-port"
            )
        if self.ray and len(self.serve) > 1:
            raise ValueError(
                "--ray serves one model: give one --serve entry (or --model); run one Ray "
                "application per model for more"
            )
        if self.ray and self.engine_process:
            raise ValueError(
                "engine_process does not apply with --ray: each engine replica is a process "
                "of its own already; drop --engine-process"
            )
        if self.ray:
            self._check_ray_applies()
        if self.verify_signatures == "required" and not self.trusted_keys:
            raise ValueError(
                "verify_signatures=required needs trusted_keys: pass the signers' public keys "
                "with --trusted-keys KEY.pub.pem"
            )
        return self

    def _check_ray_applies(self) -> None:
        """Refuse the settings that ``--ray`` cannot honour, rather than drop them."""
        if self.grpc_port is not None:
            raise ValueError(
                f"grpc_port={self.grpc_port} does not apply with --ray: Serve's proxy carries "
                "HTTP only; drop --grpc-port, or serve gRPC from `autoglm serve` without --ray"
            )
        specs = [ServeSpec.parse(entry) for entry in self.serve]
        if self.keep_alive or any(spec.keep_alive is not None for spec in specs):
            raise ValueError(
                "keep_alive does not apply with --ray: a replica holds its model while it "
                "runs; to unload an idle model, scale to zero with --autoscale 0,N"
            )
        if any(spec.kv_share != 1.0 for spec in specs):
            raise ValueError(
                "kv_share does not apply with --ray: each replica's KV cache is its one "
                "model's; size it with --kv-cache-memory"
            )

    @field_validator("allowed_hosts", "allowed_media_domains", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment or a flag: "a.example,b.example"
            value = value.split(",")
        if isinstance(value, list):
            hosts = [h.strip().lower() if isinstance(h, str) else h for h in value]
            return [h for h in hosts if h != ""]
        return value

    @field_validator("allowed_media_domains")
    @classmethod
    def _check_media_domains(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not _is_host_pattern(entry):
                raise ValueError(
                    f"{entry[:100]!r} is not a host name: write example.com, or "
                    "*.example.com for its subdomains (no scheme, port, path or bare *)"
                )
        return value

    def engine_options(self, has_tenants: bool = False) -> dict[str, Any]:
        """The :class:`~auto_glm.engine.config.EngineConfig` fields these settings fix;
        ``has_tenants`` resolves ``queue_policy: auto``."""
        policy = self.queue_policy
        if policy == "auto":
            policy = "fair" if has_tenants else "priority"
        return {
            "queue_policy": policy,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
            "kv_cache_memory": int(self.kv_cache_memory) if self.kv_cache_memory else None,
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_cache_scales": self.kv_cache_scales,
            "attention_backend": self.attention_backend,
            "cuda_graphs": self.cuda_graphs,
        }


def _is_host_pattern(entry: str) -> bool:
    """A host name, an IP address, or ``*.`` and a host name (its subdomains)."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(entry)
        return True
    return _HOST_PATTERN.fullmatch(entry) is not None


def _serve_entry(entry: Any) -> str:
    """A ``serve`` entry as its string form, checked (mappings come from config files)."""
    spec = ServeSpec.parse(entry)
    options = [f"keep_alive={spec.keep_alive:g}"] if spec.keep_alive is not None else []
    if spec.kv_share != 1.0:
        options.append(f"kv_share={spec.kv_share:g}")
    return ",".join([spec.ref, *options])


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in a mapping (else the last wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}; check the path given by --config "
            f"or ${ENV_PREFIX}CONFIG"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it "
            "as UTF-8"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must be a mapping of key: value, not a {type(data).__name__}"
        )
    return data


def _read_env(environ: Mapping[str, str]) -> dict[str, str]:
    # Only names of fields are read: other AUTOGLM_* variables (AUTOGLM_CACHE) belong to
    # other parts of the package. Empty values count as unset so `VAR=` can clear a default.
    found = {}
    for name in ServerConfig.model_fields:
        value = environ.get(ENV_PREFIX + name.upper())
        if value:
            found[name] = value
    return found


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Merge the config file at ``path``, ``AUTOGLM_*`` variables and ``overrides`` (CLI
    flags; ``None`` values are ignored) into a validated :class:`ServerConfig`."""
    environ = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    merged: dict[str, Any] = {}
    if path is not None:
        for key, value in _read_file(Path(path)).items():
            merged[key], sources[key] = value, f"{path}"
    for key, value in _read_env(environ).items():
        merged[key], sources[key] = value, f"${ENV_PREFIX}{key.upper()}"
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key], sources[key] = value, f"--{key.replace('_', '-')}"
    try:
        return ServerConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, merged, sources)) from None


def _describe(exc: ValidationError, values: dict[str, Any], sources: dict[str, str]) -> str:
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] in ("byte_size", "byte_size_unit"):
            message += "; write a whole number of bytes or one with a unit, e.g. 512MiB or 2GB"
        if not error["loc"]:  # a rule between several keys: the message names them
            problems.append(message)
            continue
        key = str(error["loc"][0])
        where = sources.get(key, "default")
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(ServerConfig.model_fields)
            problems.append(f"unknown key {key!r} (in {where}); allowed keys: {allowed}")
        else:
            shown = "<hidden>" if key in _SECRETS else repr(values.get(key))
            problems.append(f"{key}={shown} (from {where}) is invalid: {message}")
    return "invalid server configuration: " + "; ".join(problems)
