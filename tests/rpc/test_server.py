"""The gRPC API on a real server (raw grpcio stubs): streaming equal to REST, every error
code with REST's message, cancellation and deadlines that free the KV cache, health that
follows draining, reflection, auth, TLS, message limits, metrics and traces."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from auto_glm.rpc.v1 import inference_pb2 as pb
from auto_glm.rpc.v1 import inference_pb2_grpc as pb_grpc
from auto_glm.tenants import TenantLimits, TenantStore
from tests.serving.conftest import (
    EngineGate,
    Served,
    free_port,
    start_service,
    stop_service,
    until,
    wait_ready,
)

pytestmark = pytest.mark.integration

ADMIN = "admin-key-0123456789abcdef"
LONG = pb.SamplingOptions(max_tokens=4000, ignore_eos=True)


class GrpcServed:
    def __init__(self, served: Served, thread: threading.Thread) -> None:
        self.served, self.thread = served, thread
        self.port = served.service.config.grpc_port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.InferenceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        stop_service(self.served, self.thread)


def serve(checkpoint: Path, **settings) -> GrpcServed:
    served, thread = start_service(checkpoint, grpc_port=free_port(), **settings)
    return GrpcServed(served, thread)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('grpc-store') / 'tenants.db'}"
    keys = {}
    with TenantStore(url) as tenants:
        for name, limits in {
            "acme": TenantLimits(),
            "narrow": TenantLimits(models=("another-model",)),
            "slow": TenantLimits(rpm=1),
        }.items():
            tenants.create_tenant(name, limits)
            keys[name] = tenants.create_key(name)[1]
    yield url, keys


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, store) -> Iterator[GrpcServed]:
    url, _ = store
    running = serve(tiny_checkpoint, database_url=url, admin_key=ADMIN, max_num_seqs=8)
    yield running
    running.stop()


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def failure(call) -> grpc.RpcError:
    """The error that ends a streamed call (read to its end)."""
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    return caught.value


def test_streamed_generation_equals_the_rest_answer(server: GrpcServed, store) -> None:
    _, keys = store
    options = pb.SamplingOptions(max_tokens=12, temperature=0, ignore_eos=True)
    call = server.stub.Generate(
        pb.GenerateRequest(prompt="The sky is", sampling=options), metadata=auth(keys["acme"])
    )
    responses = list(call)
    assert len(responses) >= 2  # streamed, not one blob
    assert [r.finish_reason for r in responses[:-1]] == [""] * (len(responses) - 1)
    last = responses[-1]
    assert last.finish_reason == "length" and last.version == "local"
    assert (last.usage.completion_tokens, last.usage.total_tokens) == (
        12,
        12 + last.usage.prompt_tokens,
    )
    ids = [t for r in responses for t in r.token_ids]
    text = "".join(r.text for r in responses)
    rest = httpx.post(
        f"{server.served.base_url}/v1/completions",
        json={"prompt": "The sky is", "max_tokens": 12, "temperature": 0, "ignore_eos": True},
        headers={"Authorization": f"Bearer {keys['acme']}"},
    ).json()
    assert rest["choices"][0]["text"] == text and len(ids) == 12
    assert rest["usage"]["prompt_tokens"] == last.usage.prompt_tokens
    assert dict(call.initial_metadata())["x-autoglm-model-version"] == "local"


def test_chat_and_list_models(server: GrpcServed, store) -> None:
    _, keys = store
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="Hello")],
        sampling=pb.SamplingOptions(max_tokens=4, ignore_eos=True, logprobs=2),
    )
    responses = list(server.stub.Chat(request, metadata=auth(keys["acme"])))
    assert sum(len(r.token_ids) for r in responses) == 4
    assert all(len(lp.top) == 2 for r in responses for lp in r.logprobs)
    assert responses[-1].usage.completion_tokens == 4
    models = server.stub.ListModels(pb.ListModelsRequest(), metadata=auth(keys["acme"]))
    [model] = models.models
    assert (model.id, model.version, model.state) == (server.served.name, "local", "ready")
    assert model.max_model_len > 0


@pytest.mark.parametrize(
    ("key", "request_", "code", "message", "version"),
    [
        (None, pb.GenerateRequest(prompt="x"), grpc.StatusCode.UNAUTHENTICATED, "API key", None),
        ("wrong", pb.GenerateRequest(prompt="x"), grpc.StatusCode.UNAUTHENTICATED, "API key", None),
        (
            "narrow",
            pb.GenerateRequest(prompt="x"),
            grpc.StatusCode.PERMISSION_DENIED,
            "may not use",
            None,
        ),
        (
            "acme",
            pb.GenerateRequest(prompt="x", model="gone"),
            grpc.StatusCode.NOT_FOUND,
            "model 'gone' is not served here",
            None,
        ),
        (
            "acme",
            pb.GenerateRequest(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt: Field required",
            None,
        ),
        (
            "acme",
            pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(temperature=3)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.temperature: Input should be less than or equal to 2",
            None,
        ),
        (
            "acme",
            pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(logprobs=21)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.logprobs: Input should be less than or equal to 20",
            None,
        ),
        (
            "acme",
            pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt_token_ids.ids",
            None,
        ),
        (
            "acme",
            pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[10**6])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside the vocabulary",
            "local",  # refused by the version it was routed to, which the error names
        ),
    ],
)
def test_refusals_have_the_rest_message_and_their_code(
    server: GrpcServed, store, key, request_, code, message, version
) -> None:
    _, keys = store
    metadata = () if key is None else auth(keys.get(key, "agk_bad_key"))
    error = failure(server.stub.Generate(request_, metadata=metadata))
    assert error.code() == code and message in error.details(), error.details()
    trailers = dict(error.trailing_metadata())
    assert trailers.get("x-autoglm-model-version") == version
    if message.startswith("sampling."):  # the param is the gRPC request's field
        assert trailers["autoglm-error-param"] == message.split(":")[0]


@pytest.mark.parametrize(
    ("method", "data"),
    [
        # the prompt "x" with its byte made one that is not UTF-8
        ("Generate", pb.GenerateRequest(prompt="x").SerializeToString().replace(b"x", b"\xff")),
        ("Chat", b"\x12\x05\x0a\x03\xff"),  # a message cut short
        ("ListModels", b"\xff\xff\xff"),
    ],
)
def test_a_request_that_is_not_protobuf_is_invalid_argument(
    server: GrpcServed, store, method: str, data: bytes
) -> None:
    _, keys = store
    raw = getattr(server.channel, "unary_unary" if method == "ListModels" else "unary_stream")(
        f"/autoglm.v1.Inference/{method}",
        request_serializer=lambda given: given,
        response_deserializer=lambda given: given,
    )
    with pytest.raises(grpc.RpcError) as caught:  # it was UNKNOWN, and neither logged nor counted
        answer = raw(data, metadata=auth(keys["acme"]))  # a unary call raises here
        list(answer)  # a stream when it is read
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    request_type = "ListModelsRequest" if method == "ListModels" else f"{method}Request"
    assert error.details().startswith(f"the request is not a valid autoglm.v1.{request_type}")
    trailers = dict(error.trailing_metadata())
    assert trailers["autoglm-error-code"] == "invalid_message" and trailers["x-request-id"]


def test_a_chat_error_names_the_grpc_field(server: GrpcServed, store) -> None:
    _, keys = store
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="x")],
        sampling=pb.SamplingOptions(logprobs=21),
    )
    error = failure(server.stub.Chat(request, metadata=auth(keys["acme"])))
    assert error.details().startswith("sampling.logprobs: Input should be less than or equal")
    assert dict(error.trailing_metadata())["autoglm-error-param"] == "sampling.logprobs"


def test_rate_limits_are_resource_exhausted_with_retry_info(server: GrpcServed, store) -> None:
    _, keys = store
    short = pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(max_tokens=1))
    list(server.stub.Generate(short, metadata=auth(keys["slow"])))
    error = failure(server.stub.Generate(short, metadata=auth(keys["slow"])))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 1 requests per minute (rpm)" in error.details()
    trailing = dict(error.trailing_metadata())
    assert int(trailing["retry-after"]) >= 1 and trailing["autoglm-error-code"] == "rpm_exceeded"
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.seconds >= 1


def test_cancel_and_deadline_abort_the_engine_request(server: GrpcServed, store) -> None:
    _, keys = store
    engine = server.served.model.engine
    call = server.stub.Generate(
        pb.GenerateRequest(prompt="cancel me", sampling=LONG), metadata=auth(keys["acme"])
    )
    next(call)  # it runs
    assert engine.stats().kv_usage > 0
    call.cancel()
    until(lambda: engine.stats().kv_usage == 0 and not server.served.admission.num_in_flight)
    error = failure(
        server.stub.Generate(
            pb.GenerateRequest(prompt="too slow", sampling=LONG),
            metadata=auth(keys["acme"]),
            timeout=0.3,
        )
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    until(lambda: engine.stats().kv_usage == 0 and not server.served.admission.num_in_flight)


def test_reflection_lists_the_services(server: GrpcServed) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    [answer] = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {"autoglm.v1.Inference", "grpc.health.v1.Health"} <= names


def test_calls_are_counted_traced_and_logged(server: GrpcServed, store) -> None:
    _, keys = store
    exporter = InMemorySpanExporter()
    server.served.service.app.state.observability.tracer_provider.add_span_processor(
        SimpleSpanProcessor(exporter)
    )
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    metadata = (*auth(keys["acme"]), ("traceparent", parent))
    call = server.stub.Generate(
        pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(max_tokens=2)),
        metadata=metadata,
    )
    list(call)
    # the ids REST answers in headers: the server's request id, and the call's own span
    answered = dict(call.initial_metadata())
    assert len(answered["x-request-id"]) == 32
    assert answered["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert answered["traceparent"] != parent
    # a refused call carries them in its trailers, with the client's id kept
    mine = (*metadata, ("x-request-id", "my-call-1"))
    error = failure(server.stub.Generate(pb.GenerateRequest(prompt=""), metadata=mine))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.trailing_metadata())["x-request-id"] == "my-call-1"
    listed = server.stub.ListModels.with_call(pb.ListModelsRequest(), metadata=mine)[1]
    assert dict(listed.initial_metadata())["x-request-id"] == "my-call-1"
    until(
        lambda: any(
            s.name == "GRPC /autoglm.v1.Inference/Generate" for s in exporter.get_finished_spans()
        )
    )
    span = next(s for s in exporter.get_finished_spans() if s.name.startswith("GRPC "))
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    text = httpx.get(f"{server.served.base_url}/metrics").text
    counted = [
        row
        for row in text.splitlines()
        if row.startswith("autoglm:http_requests_total{") and 'method="GRPC"' in row
    ]
    labels = (
        'route="/autoglm.v1.Inference/Generate"',
        'status="200"',
        'tenant="acme"',
        f'model="{server.served.name}"',
        'version="local"',
    )
    assert any(all(label in row for label in labels) for row in counted), counted


def test_health_turns_not_serving_while_draining(tiny_checkpoint: Path, monkeypatch) -> None:
    running = serve(tiny_checkpoint)
    health = health_pb2_grpc.HealthStub(running.channel)
    check = health_pb2.HealthCheckRequest(service="autoglm.v1.Inference")
    assert health.Check(check).status == health_pb2.HealthCheckResponse.SERVING
    gate = EngineGate(running.served, monkeypatch)  # keeps one call in flight
    call = running.stub.Generate(
        pb.GenerateRequest(
            prompt="hold", sampling=pb.SamplingOptions(max_tokens=2, ignore_eos=True)
        )
    )
    assert gate.entered.wait(10)
    running.served.admission.begin_drain()
    until(lambda: health.Check(check).status == health_pb2.HealthCheckResponse.NOT_SERVING)
    error = failure(running.stub.Generate(pb.GenerateRequest(prompt="late")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
    gate.release()
    assert sum(len(r.token_ids) for r in call) == 2  # accepted work finishes
    running.thread.join(30)
    running.channel.close()
    running.served.model.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_and_the_message_size_limit(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    running = serve(
        tiny_checkpoint,
        grpc_tls_cert=str(cert),
        grpc_tls_key=str(key),
        grpc_max_message_bytes="64KiB",
    )
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        options = (("grpc.ssl_target_name_override", "localhost"),)
        with grpc.secure_channel(f"localhost:{running.port}", credentials, options) as channel:
            stub = pb_grpc.InferenceStub(channel)
            answer = list(
                stub.Generate(
                    pb.GenerateRequest(
                        prompt="tls", sampling=pb.SamplingOptions(max_tokens=2, ignore_eos=True)
                    )
                )
            )
            assert sum(len(r.token_ids) for r in answer) == 2
            error = failure(stub.Generate(pb.GenerateRequest(prompt="x" * 100_000)))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        plain = failure(running.stub.Generate(pb.GenerateRequest(prompt="x"), timeout=5))
        assert plain.code() == grpc.StatusCode.UNAVAILABLE  # plaintext gets no answer
    finally:
        running.stop()


@pytest.mark.slow
def test_sigterm_drains_grpc_and_http_together(tiny_checkpoint: Path) -> None:
    port, grpc_port = free_port(), free_port()
    repo = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "auto_glm.serving",
            "--model",
            str(tiny_checkpoint),
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--kv-cache-memory",
            "16MiB",
            "--log-level",
            "warning",
            "--drain-timeout",
            "60",
        ],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=120, alive=lambda: process.poll() is None)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            call = stub.Generate(
                pb.GenerateRequest(
                    prompt="drain", sampling=pb.SamplingOptions(max_tokens=300, ignore_eos=True)
                )
            )
            first = next(call)
            process.send_signal(signal.SIGTERM)
            rest = list(call)
            tokens = len(first.token_ids) + sum(len(r.token_ids) for r in rest)
            assert tokens == 300 and rest[-1].finish_reason == "length"
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
