"""The gRPC clients against a real server (HTTP and gRPC on one engine, API keys required):
streams, collected completions, chat, models, status codes, deadlines and cancellation."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from auto_glm.client import AsyncGrpcClient, Completion, GrpcCallError, GrpcClient
from auto_glm.tenants import TenantStore
from tests.serving.conftest import EngineGate, Served, free_port, start_service, stop_service, until

pytestmark = pytest.mark.integration

__all__: list[str] = []

CHAT = [{"role": "user", "content": "Hi there"}]
LONG = {"max_tokens": 2000, "ignore_eos": True}  # far longer than any test waits for


@pytest.fixture(scope="module")
def api_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(store URL, key): a store holding a key makes the server require one."""
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'tenants.db'}"
    with TenantStore(url) as store:
        store.create_tenant("alpha")
        return url, store.create_key("alpha")[1]


@pytest.fixture(scope="module")
def server(make_checkpoint, api_key: tuple[str, str]) -> Iterator[Served]:
    checkpoint = make_checkpoint("Glm4ForCausalLM")  # the serving tests' tiny model
    served, thread = start_service(
        checkpoint, grpc_port=free_port(), database_url=api_key[0], max_num_seqs=16
    )
    yield served
    stop_service(served, thread)


@pytest.fixture
def target(server: Served) -> str:
    return f"127.0.0.1:{server.service.config.grpc_port}"


@pytest.fixture
def client(target: str, api_key: tuple[str, str]) -> Iterator[GrpcClient]:
    with GrpcClient(target, api_key=api_key[1], timeout=60) as opened:
        yield opened


def _cancelled_early(server: Served, steps_before: int) -> None:
    """The server aborted the call: every KV block is free long before 2000 steps ran."""
    until(lambda: server.model.engine.stats().kv_usage == 0)
    server.wait_idle()
    assert server.model.engine.stats().num_steps - steps_before < LONG["max_tokens"]


def _check(completion: Completion, server: Served, max_tokens: int) -> None:
    assert completion.model == server.name and completion.version
    assert len(completion.token_ids) == max_tokens and completion.finish_reason == "length"
    usage = completion.usage
    assert usage["completion_tokens"] == max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + max_tokens


def test_options_are_checked_before_any_call(tmp_path: Path) -> None:
    with GrpcClient(f"127.0.0.1:{free_port()}") as nobody:
        with pytest.raises(TypeError, match="max_new_tokens.*fields are: max_tokens, temp"):
            nobody.generate("x", max_new_tokens=3)
        with pytest.raises(TypeError, match="unknown key.*text; a message has role"):
            nobody.chat([{"role": "user", "text": "x"}])
        with pytest.raises(ValueError, match="n=2: use generate"):
            nobody.complete("x", n=2)
        # bytes were sent as token ids, one per byte
        with pytest.raises(TypeError, match="prompt is bytes; pass text as str"):
            nobody.generate(b"hi")
        # protobuf's own message ("Value out of range: 2147483648") named no option
        with pytest.raises(ValueError) as caught:
            nobody.generate("x", max_tokens=8, top_k=2**31)
        assert str(caught.value).startswith(
            "sampling option top_k=2147483648 does not fit SamplingOptions.top_k, a 32-bit "
            "integer (Value out of range"
        )
        with pytest.raises(ValueError, match=r"stop=\[1\] .* SamplingOptions.stop, a list of text"):
            nobody.generate("x", stop=[1])
    with pytest.raises(ValueError, match="cannot read .*missing.pem"):
        GrpcClient(root_certificates=tmp_path / "missing.pem")


def test_generate_streams_new_tokens_and_ends_with_finish_reason_and_usage(
    client: GrpcClient, server: Served
) -> None:
    responses = list(client.generate("Hello", max_tokens=6, ignore_eos=True, temperature=0))
    assert all(r.token_ids for r in responses) and len({r.id for r in responses}) == 1
    assert {(r.model, r.index) for r in responses} == {(server.name, 0)}
    assert [bool(r.finish_reason) for r in responses] == [False] * (len(responses) - 1) + [True]
    assert [r.HasField("usage") for r in responses][-1] and not responses[0].HasField("usage")
    completion = client.complete("Hello", max_tokens=6, ignore_eos=True, temperature=0)
    _check(completion, server, 6)
    assert completion.text == "".join(r.text for r in responses)
    assert completion.token_ids == tuple(i for r in responses for i in r.token_ids)


def test_complete_matches_the_rest_api_and_takes_token_ids(
    client: GrpcClient, server: Served, api_key: tuple[str, str]
) -> None:
    sampling = {"max_tokens": 5, "ignore_eos": True, "temperature": 0}
    body, headers = {"prompt": "Once upon", **sampling}, {"authorization": f"Bearer {api_key[1]}"}
    rest = httpx.post(f"{server.base_url}/v1/completions", json=body, headers=headers)
    assert rest.status_code == 200, rest.text
    completion = client.complete("Once upon", server.name, **sampling)
    assert completion.text == rest.json()["choices"][0]["text"]
    from_ids = client.complete([5, 6, 7], max_tokens=3, ignore_eos=True, stop="never")
    _check(from_ids, server, 3)
    assert from_ids.usage["prompt_tokens"] == 3


def test_chat_and_list_models(client: GrpcClient, server: Served) -> None:
    responses = list(client.chat(CHAT, max_tokens=4, ignore_eos=True))
    assert responses[-1].finish_reason == "length" and responses[-1].usage.completion_tokens == 4
    _check(client.chat_complete(CHAT, server.name, max_tokens=4, ignore_eos=True), server, 4)
    [model] = client.list_models()
    assert model.id == server.name and model.state == "ready" and model.max_model_len > 0
    assert [v.version for v in model.versions] == [model.version]


async def test_async_client(target: str, api_key: tuple[str, str], server: Served) -> None:
    async with AsyncGrpcClient(target, api_key=api_key[1], timeout=60) as client:
        stream = client.generate("Hello", max_tokens=5, ignore_eos=True, temperature=0)
        responses = [response async for response in stream]
        completion = await client.complete("Hello", max_tokens=5, ignore_eos=True, temperature=0)
        _check(completion, server, 5)
        assert completion.text == "".join(r.text for r in responses)
        chat = [r async for r in client.chat(CHAT, max_tokens=3, ignore_eos=True)]
        assert chat[-1].usage.completion_tokens == 3
        _check(await client.chat_complete(CHAT, max_tokens=3, ignore_eos=True), server, 3)
        assert [m.id for m in await client.list_models()] == [server.name]


@pytest.mark.parametrize("key", [None, "agk_not_a_key"])
async def test_missing_or_bad_key_is_unauthenticated(target: str, key: str | None) -> None:
    with GrpcClient(target, api_key=key) as client, pytest.raises(GrpcCallError) as sync:
        client.complete("Hello", max_tokens=2)
    async with AsyncGrpcClient(target, api_key=key) as aclient:
        with pytest.raises(GrpcCallError) as asynchronous:
            await aclient.list_models()
    for error in (sync.value, asynchronous.value):
        assert error.code == grpc.StatusCode.UNAUTHENTICATED and error.retry_after is None
        assert "key" in error.message and str(error).startswith("UNAUTHENTICATED: ")


def test_unknown_model_and_oversized_request(client: GrpcClient, target: str) -> None:
    with pytest.raises(GrpcCallError) as missing:
        client.complete("Hello", "no-such-model", max_tokens=2)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and "no-such-model" in str(missing.value)
    with GrpcClient(target, max_message_bytes=64) as small, pytest.raises(GrpcCallError) as big:
        small.complete("x" * 1000, max_tokens=2)
    assert big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_exceeded_ends_the_call_on_the_server(
    target: str, api_key: tuple[str, str], server: Served
) -> None:
    steps = server.model.engine.stats().num_steps
    with GrpcClient(target, api_key=api_key[1], timeout=0.05) as client:
        with pytest.raises(GrpcCallError) as late:
            client.complete("Hello", **LONG)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(GrpcCallError) as streamed:
            list(client.generate("Hello", timeout=0.05, **LONG))
        assert streamed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    _cancelled_early(server, steps)


def test_breaking_out_of_the_stream_cancels_the_call(client: GrpcClient, server: Served) -> None:
    steps = server.model.engine.stats().num_steps
    for response in client.generate("Hello", **LONG):
        assert response.token_ids
        assert server.model.engine.stats().kv_usage > 0
        break
    _cancelled_early(server, steps)


async def test_async_break_cancels_the_call(
    target: str, api_key: tuple[str, str], server: Served
) -> None:
    steps = server.model.engine.stats().num_steps
    async with AsyncGrpcClient(target, api_key=api_key[1]) as client:
        async for response in client.generate("Hello", **LONG):
            assert response.token_ids
            break
        # the finalizer of the abandoned stream runs on this loop: keep it free meanwhile
        await asyncio.to_thread(_cancelled_early, server, steps)


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey, extension
) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    issuer = "test CA"
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(extension, critical=isinstance(extension, x509.BasicConstraints))
        .sign(signer, hashes.SHA256())
    )


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key): the CA signed 127.0.0.1's cert."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test CA", ca_key, ca_key, x509.BasicConstraints(ca=True, path_length=None))
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    leaf = _certificate("127.0.0.1", key, ca_key, x509.SubjectAlternativeName(names))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    pkcs8, clear = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, clear))
    return paths


def test_tls_and_a_full_queue_give_retry_after(
    make_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = _tls_files(tmp_path)
    served, thread = start_service(
        make_checkpoint("Glm4ForCausalLM"),
        grpc_port=free_port(),
        grpc_tls_cert=str(cert),
        grpc_tls_key=str(key),
        max_num_seqs=1,
        max_queued_requests=1,
        database_url=f"sqlite:///{tmp_path / 'open.db'}",  # no keys: no auth
    )
    gate = EngineGate(served, monkeypatch)
    target = f"127.0.0.1:{served.service.config.grpc_port}"

    async def scenario() -> list[Completion]:
        async with AsyncGrpcClient(target, root_certificates=ca, timeout=60) as client:
            running = asyncio.ensure_future(client.complete("a", max_tokens=2, ignore_eos=True))
            assert await asyncio.to_thread(gate.entered.wait, 10)
            waiting = asyncio.ensure_future(client.complete("b", max_tokens=2, ignore_eos=True))
            await asyncio.to_thread(until, lambda: served.admission.num_waiting == 1)
            with pytest.raises(GrpcCallError) as refused:
                await client.complete("c", max_tokens=2)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.retry_after is not None and refused.value.retry_after >= 1
            gate.release()
            return list(await asyncio.gather(running, waiting))

    try:
        done = asyncio.run(scenario())
        assert [c.finish_reason for c in done] == ["length", "length"]
        with GrpcClient(target, root_certificates=ca.read_bytes()) as client:
            assert client.complete("d", max_tokens=2).usage["completion_tokens"] >= 1
        with GrpcClient(target) as plaintext, pytest.raises(GrpcCallError) as refused:
            plaintext.list_models(timeout=5)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        gate.release()
        stop_service(served, thread)
