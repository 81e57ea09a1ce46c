"""Python clients of the gRPC API (``autoglm serve --grpc-port 50051``).

:class:`GrpcClient` blocks; :class:`AsyncGrpcClient` runs on asyncio (``grpc.aio``; create
it inside the event loop that uses it). Both stream ``GenerateResponse`` / ``ChatResponse``
messages as the server sends them, or collect one choice into a :class:`Completion`.
Sampling options are keyword arguments named like the ``SamplingOptions`` fields of
``proto/autoglm/v1/inference.proto`` (``max_tokens``, ``temperature``, ...). A failed call
raises :class:`GrpcCallError`. Leaving a stream early (``break``, ``close()``, ``aclose()``)
cancels the call, and the server frees what it held for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from grpc import aio

from auto_glm.rpc.v1 import inference_pb2 as pb
from auto_glm.rpc.v1.inference_pb2_grpc import InferenceStub

__all__ = ["SAMPLING_FIELDS", "AsyncGrpcClient", "Completion", "GrpcCallError", "GrpcClient"]

_FIELD_KINDS = {
    FieldDescriptor.TYPE_INT32: "a 32-bit integer",
    FieldDescriptor.TYPE_UINT32: "a 32-bit integer >= 0",
    FieldDescriptor.TYPE_INT64: "a 64-bit integer",
    FieldDescriptor.TYPE_DOUBLE: "a number",
    FieldDescriptor.TYPE_BOOL: "True or False",
    FieldDescriptor.TYPE_STRING: "text",
}
SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in pb.SamplingOptions.DESCRIPTOR.fields)
_MESSAGE_FIELDS = tuple(f.name for f in pb.ChatMessage.DESCRIPTOR.fields)
Prompt = str | Sequence[int]
Messages = Sequence[dict]  # {"role": ..., "content": ..., "name": ...}
Timeout = float | None  # seconds; None: the client's default


class GrpcCallError(RuntimeError):
    """A call the server refused or ended with an error: its status ``code``, the server's
    ``message`` (the REST API's), and ``retry_after`` seconds when the server asked to wait."""

    def __init__(
        self, code: grpc.StatusCode, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __reduce__(self) -> tuple:  # pickles (e.g. across processes) with all three fields
        return type(self), (self.code, self.message, self.retry_after)


@dataclass(frozen=True)
class Completion:
    """One choice of a call, collected from its stream."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # stop or length
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens, cached_tokens
    model: str
    version: str


def _call_error(error: Any) -> GrpcCallError:
    """``error``: a ``grpc.RpcError`` of either API (it is also the call)."""
    retry_after = next(
        (float(value) for key, value in error.trailing_metadata() or () if key == "retry-after"),
        None,
    )
    return GrpcCallError(error.code(), error.details() or "", retry_after)


def _sampling(options: dict[str, Any]) -> pb.SamplingOptions:
    unknown = sorted(set(options) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown sampling option(s) {', '.join(unknown)}; the SamplingOptions fields "
            f"are: {', '.join(SAMPLING_FIELDS)}"
        )
    given = {name: value for name, value in options.items() if value is not None}
    if isinstance(given.get("stop"), str):
        given["stop"] = [given["stop"]]
    try:
        return pb.SamplingOptions(**given)
    except (TypeError, ValueError) as exc:
        for name, value in given.items():  # protobuf's message names no field: find it
            try:
                pb.SamplingOptions(**{name: value})
            except (TypeError, ValueError):
                field = pb.SamplingOptions.DESCRIPTOR.fields_by_name[name]
                kind = _FIELD_KINDS.get(field.type, "of another type")
                if field.is_repeated:
                    kind = f"a list of {kind}"
                raise ValueError(
                    f"sampling option {name}={value!r} does not fit SamplingOptions.{name}, "
                    f"{kind} ({exc})"
                ) from None
        raise


def _generate_request(prompt: Prompt, model: str | None, options: dict) -> pb.GenerateRequest:
    sampling = _sampling(options)
    if isinstance(prompt, str):
        return pb.GenerateRequest(model=model or "", prompt=prompt, sampling=sampling)
    if isinstance(prompt, bytes | bytearray | memoryview):  # else read as token ids
        raise TypeError(
            f"prompt is {type(prompt).__name__}; pass text as str (decode it first) or "
            "token ids as a list of int"
        )
    ids = pb.TokenIds(ids=list(prompt))
    return pb.GenerateRequest(model=model or "", prompt_token_ids=ids, sampling=sampling)


def _chat_request(messages: Messages, model: str | None, options: dict) -> pb.ChatRequest:
    built = []
    for number, message in enumerate(messages):
        unknown = sorted(set(message) - set(_MESSAGE_FIELDS))
        if unknown:
            raise TypeError(
                f"messages[{number}] has unknown key(s) {', '.join(unknown)}; a message has "
                f"{', '.join(_MESSAGE_FIELDS)}"
            )
        built.append(pb.ChatMessage(**message))
    return pb.ChatRequest(model=model or "", messages=built, sampling=_sampling(options))


def _one_choice(options: dict) -> None:
    if options.get("n") not in (None, 1):
        raise ValueError(
            f"complete() and chat_complete() collect one choice, but n={options['n']}: use "
            "generate() or chat() and group the responses by their index"
        )


def _completion(responses: list) -> Completion:
    if not responses:
        raise GrpcCallError(grpc.StatusCode.UNKNOWN, "the server ended the call without output")
    last = responses[-1]
    return Completion(
        text="".join(r.text for r in responses),
        token_ids=tuple(i for r in responses for i in r.token_ids),
        finish_reason=last.finish_reason,
        usage={f.name: getattr(last.usage, f.name) for f in pb.Usage.DESCRIPTOR.fields},
        model=last.model,
        version=last.version,
    )


def _pem(root_certificates: bytes | str | Path) -> bytes:
    """PEM bytes as given, PEM text, or the path of a PEM file (str or Path)."""
    if isinstance(root_certificates, bytes):
        return root_certificates
    if isinstance(root_certificates, str) and root_certificates.startswith("-----BEGIN"):
        return root_certificates.encode()
    try:
        return Path(root_certificates).read_bytes()
    except OSError as exc:
        raise ValueError(
            f"root_certificates: cannot read {root_certificates}: {exc.strerror}; pass the "
            "path of the CA's PEM file, or its contents as bytes"
        ) from exc


class _Client:
    """What both clients share: the channel, the key, the default deadline."""

    _grpc: ModuleType  # grpc or grpc.aio: makes the channel

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        root_certificates: bytes | str | Path | None = None,
        timeout: float | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        ways = () if max_message_bytes is None else ("send", "receive")
        options = [(f"grpc.max_{way}_message_length", max_message_bytes) for way in ways]
        if root_certificates is None:
            self._channel = self._grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(_pem(root_certificates))
            self._channel = self._grpc.secure_channel(target, credentials, options=options)
        self._stub = InferenceStub(self._channel)

    def _options(self, timeout: Timeout) -> dict[str, Any]:
        deadline = self.timeout if timeout is None else timeout
        return {"timeout": deadline, "metadata": self._metadata}


class GrpcClient(_Client):
    """A blocking client; ``timeout`` (seconds) is every call's deadline unless a call sets
    its own. ``root_certificates`` (a CA's PEM: bytes, text or a file path) turns on TLS."""

    _grpc = grpc

    def generate(
        self, prompt: Prompt, model: str | None = None, *, timeout: Timeout = None, **sampling
    ) -> Iterator[pb.GenerateResponse]:
        request = _generate_request(prompt, model, sampling)
        return self._stream(self._stub.Generate, request, timeout)

    def complete(
        self, prompt: Prompt, model: str | None = None, *, timeout: Timeout = None, **sampling
    ) -> Completion:
        _one_choice(sampling)
        return _completion(list(self.generate(prompt, model, timeout=timeout, **sampling)))

    def chat(
        self, messages: Messages, model: str | None = None, *, timeout: Timeout = None, **sampling
    ) -> Iterator[pb.ChatResponse]:
        return self._stream(self._stub.Chat, _chat_request(messages, model, sampling), timeout)

    def chat_complete(
        self, messages: Messages, model: str | None = None, *, timeout: Timeout = None, **sampling
    ) -> Completion:
        _one_choice(sampling)
        return _completion(list(self.chat(messages, model, timeout=timeout, **sampling)))

    def list_models(self, *, timeout: Timeout = None) -> list[pb.Model]:
        try:
            reply = self._stub.ListModels(pb.ListModelsRequest(), **self._options(timeout))
        except grpc.RpcError as exc:
            raise _call_error(exc) from exc
        return list(reply.models)

    def _stream(self, method: Any, request: Any, timeout: Timeout) -> Iterator[Any]:
        call = method(request, **self._options(timeout))
        try:
            yield from call
        except grpc.RpcError as exc:
            raise _call_error(exc) from exc
        finally:
            call.cancel()  # the consumer stopped early; a no-op once the call has ended

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncGrpcClient(_Client):
    """The asyncio client, with :class:`GrpcClient`'s methods as coroutines and async
    iterators. ``break`` cancels the call once the iterator is collected; ``await
    stream.aclose()`` (or ``contextlib.aclosing``) cancels it at once."""

    _grpc = aio

    def generate(
        self, prompt: Prompt, model: str | None = None, *, timeout: Timeout = None, **sampling
    ) -> AsyncIterator[pb.GenerateResponse]:
        request = _generate_request(prompt, model, sampling)
        return self._stream(self._stub.Generate, request, timeout)

    async def complete(
        self, prompt: Prompt, model: str | None = None, *, timeout: Timeout = None, **sampling
    ) -> Completion:
        _one_choice(sampling)
        stream = self.generate(prompt, model, timeout=timeout, **sampling)
        return _completion([response async for response in stream])

    def chat(
        self, messages: Messages, model: str | None = None, *, timeout: Timeout = None, **sampling
    ) -> AsyncIterator[pb.ChatResponse]:
        return self._stream(self._stub.Chat, _chat_request(messages, model, sampling), timeout)

    async def chat_complete(
        self, messages: Messages, model: str | None = None, *, timeout: Timeout = None, **sampling
    ) -> Completion:
        _one_choice(sampling)
        stream = self.chat(messages, model, timeout=timeout, **sampling)
        return _completion([response async for response in stream])

    async def list_models(self, *, timeout: Timeout = None) -> list[pb.Model]:
        try:
            reply = await self._stub.ListModels(pb.ListModelsRequest(), **self._options(timeout))
        except grpc.RpcError as exc:
            raise _call_error(exc) from exc
        return list(reply.models)

    async def _stream(self, method: Any, request: Any, timeout: Timeout) -> AsyncIterator:
        call = method(request, **self._options(timeout))
        try:
            async for response in call:
                yield response
        except grpc.RpcError as exc:
            raise _call_error(exc) from exc
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
