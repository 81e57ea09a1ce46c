"""Ray Serve on a real local Ray cluster (2 CPUs, the demo model and a tiny GLM-4.1V), inside
a loopback-only network namespace (see tests/cluster/test_namespace.py): replicas, failover,
autoscaling, prefix affinity and images, through the real HTTP proxy with real clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from auto_glm.checkpoints import build_random_vision_checkpoint, demo_model_path
from auto_glm.cluster.app import build_app
from auto_glm.cluster.quotas import KeptBook
from auto_glm.cluster.remote import RemoteEngineClient
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.config import ServerConfig
from auto_glm.tenants import Tenant, TenantLimits, TenantStore
from auto_glm.tenants.loads import Load
from auto_glm.tenants.quotas import QuotaExceeded, RateState
from tests.serving.conftest import start_service, stop_service
from tests.serving.image_host import data_url, encode, screenshot
from tests.serving.test_images import agent_messages

pytestmark = [pytest.mark.slow, pytest.mark.integration]
APP = "autoglm"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RAY_TEMP: list[Path] = []


def ray_logs() -> str:
    """Everything the cluster's processes logged (replica logs, worker stdout and stderr)."""
    logs = RAY_TEMP[0] / "session_latest" / "logs"
    return "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # socket paths: under 108 bytes
    RAY_TEMP.append(temp)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp), log_to_driver=False)
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


DEPLOYED: list[dict] = []  # the settings of each deploy, the app's last


def deploy(model: Path | None = None, **settings) -> None:
    """Run the app on ``model`` (the demo model by default) with these settings, unless the
    last deploy had the same (tests in a row share one app: a deploy takes 10 s or more)."""
    if DEPLOYED and DEPLOYED[-1] == {"model": model, **settings}:
        return
    config = ServerConfig(
        model_name_or_path=str(model or demo_model_path()),
        ray=True,
        replica_cpus=0.5,
        kv_cache_memory="64MiB",
        device="cpu",
        log_level="warning",
        **{"max_num_seqs": 8, **settings},
    )
    serve.run(build_app(config), name=APP, route_prefix="/")
    DEPLOYED.append({"model": model, **settings})


def replica_actors() -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#engine#")
    ]


def replica_count() -> int:
    states = serve.status().applications[APP].deployments["engine"].replica_states
    return states.get("RUNNING", 0)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.2)


@dataclass
class Outcome:
    tokens: int = 0
    done: bool = False
    error: str | None = None
    first_token_at: float | None = None
    cached: int = 0
    completion: int = 0
    events: list[dict] = field(default_factory=list)


async def stream(
    client: httpx.AsyncClient, prompt: str, max_tokens: int, outcome: Outcome | None = None
) -> Outcome:
    """One streamed completion; ``outcome`` (filled as the stream goes) lets a caller watch."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        # every token's chunk comes, also one whose text the detokenizer holds back (part of
        # a character): the chosen tokens are counted, not the chunks with text
        "logprobs": 0,
    }
    outcome = outcome if outcome is not None else Outcome()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        buffer = ""
        async for part in response.aiter_text():
            buffer += part
            *events, buffer = buffer.split("\n\n")
            for event in events:
                if event == "data: [DONE]":
                    outcome.done = True
                elif event.startswith("data: "):
                    chunk = json.loads(event[6:])
                    if "error" in chunk:
                        outcome.error = chunk["error"]["message"]
                    elif chunk.get("usage"):
                        outcome.cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                        outcome.completion = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["logprobs"]:
                        outcome.tokens += len(chunk["choices"][0]["logprobs"]["tokens"])
                        outcome.first_token_at = outcome.first_token_at or time.monotonic()
    return outcome


def test_the_namespace_holds_only_loopback() -> None:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]


def test_two_replicas_serve_64_streams_with_none_lost(base_url: str) -> None:
    deploy(num_replicas=2)
    assert replica_count() == 2

    async def run() -> list[Outcome]:
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            return await asyncio.gather(*(stream(client, f"stream {i}", 24) for i in range(64)))

    outcomes = asyncio.run(run())
    assert all(o.done and o.error is None for o in outcomes), [o.error for o in outcomes]
    assert all(o.tokens >= 1 for o in outcomes)
    text = httpx.get(f"{base_url}/metrics").text
    served = {
        line.split('replica="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("autoglm:request_success_total{")
    }
    assert len(served) == 2  # both replicas took requests, each with its own label
    listening = subprocess.run(["ss", "-tlnH"], capture_output=True, text=True).stdout
    for line in listening.splitlines():
        local = line.split()[3]
        assert local.startswith(
            ("127.0.0.1:", "[::ffff:127.0.0.1]:", "*:", "[::1]:", "0.0.0.0:")
        ), line


def test_repeated_prefixes_land_on_the_replica_that_cached_them(base_url: str) -> None:
    deploy(num_replicas=2)
    system = " ".join(f"rule {i}: be brief and exact." for i in range(30))  # 4+ blocks

    async def run() -> list[Outcome]:
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            firsts = [await stream(client, f"{system} tenant {k}.", 2) for k in range(8)]
            again = [
                await stream(client, f"{system} tenant {k}. question {q}", 2)
                for k in range(8)
                for q in range(3)
            ]
            return firsts + again

    outcomes = asyncio.run(run())
    repeats = outcomes[8:]
    hits = sum(1 for o in repeats if o.cached > 0)
    # random routing over 2 replicas would hit about half of them
    assert hits / len(repeats) >= 0.9, [o.cached for o in repeats]


def test_the_choices_and_prompts_of_one_call_are_each_routed(base_url: str) -> None:
    """One HTTP call with n choices (or a list of prompts) makes that many calls to the
    engine deployment at once, and each must be routed on its own. Made inside the ingress's
    HTTP request, they all carried that request's internal id, and Serve's router, which
    hands a chosen replica to the waiting call with that id, left all but one waiting for
    ever: such calls hung, most of the time."""
    deploy(num_replicas=1)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for i in range(4):
            chat = client.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": f"hi {i}"}],
                    "max_tokens": 3,
                    "n": 4,
                },
            )
            assert chat.status_code == 200, chat.text
            choices = chat.json()["choices"]  # sampled: a choice may end at EOS
            assert [c["index"] for c in choices] == [0, 1, 2, 3]
            assert all(c["finish_reason"] in ("length", "stop") for c in choices), choices
            batch = client.post(
                "/v1/completions", json={"prompt": ["hey", "hey", "ho"], "max_tokens": 2}
            )
            assert batch.status_code == 200, batch.text
            assert [c["index"] for c in batch.json()["choices"]] == [0, 1, 2]


def test_a_stream_its_client_closes_is_cancelled_in_its_replica(base_url: str) -> None:
    """A client that goes away mid-stream frees its replica at once: the engine there stops
    generating, long before the 4,000 tokens asked for."""
    deploy(num_replicas=1)

    def running() -> float:
        """The replica's running requests, as a one-token call's last chunk reported them."""
        httpx.post(f"{base_url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        for line in httpx.get(f"{base_url}/metrics").text.splitlines():
            if line.startswith("autoglm:num_requests_running{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no autoglm:num_requests_running in /metrics")

    async def cut() -> int:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            outcome = Outcome()
            task = asyncio.create_task(stream(client, "endless", 4000, outcome))
            while outcome.tokens < 3:
                await asyncio.sleep(0.02)
            task.cancel()
            return outcome.tokens

    assert asyncio.run(cut()) >= 3
    wait_for(lambda: running() == 0, 10, "the replica stopped the closed stream")


def test_a_stream_whose_delivery_fails_at_the_ingress_is_cancelled_in_its_replica(
    base_url: str,
) -> None:
    """The ingress's work on one stream raising (here its sink: the caller went away) ends
    that request with the error and cancels its call, so the replica stops generating it
    long before the 4,000 tokens asked for; it used to generate them all for nobody. The
    ingress's client runs here, on a real handle to the real replica."""
    deploy(num_replicas=1)
    handle = serve.get_deployment_handle("engine", app_name=APP)

    async def run() -> tuple[list[BaseException], int]:
        info = await handle.describe.remote()
        client = RemoteEngineClient(handle, info)

        async def steps() -> int:
            """The replica's step count, from the stats of a one-token request's last chunk."""
            done = asyncio.get_running_loop().create_future()
            client.submit([1, 2, 3], SamplingParams(max_tokens=1), done.set_result)
            assert (await done).finished
            return client.stats().num_steps

        before = await steps()
        errors: list[BaseException] = []
        delivered = 0

        def sink(item) -> None:
            nonlocal delivered
            if isinstance(item, BaseException):
                errors.append(item)
                return
            delivered += 1
            if delivered == 3:
                raise RuntimeError("the caller's connection broke")

        params = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
        client.submit([5, 6, 7], params, sink)
        deadline = time.monotonic() + 60
        last = -1
        while (now := await steps()) - last > 3:  # busy: more than the probe's own steps
            assert time.monotonic() < deadline, "the replica idle within 60 s"
            last = now
            await asyncio.sleep(0.5)
        return errors, now - before

    errors, steps = asyncio.run(run())
    assert [str(e) for e in errors] == ["the caller's connection broke"]
    assert steps < 1000, steps


def test_a_bad_schema_or_logit_bias_is_refused_by_the_ingress_before_a_stream_starts(
    base_url: str,
) -> None:
    """As on one server: the ingress checks the structured output and logit_bias before the
    call goes to a replica, so a stream is refused with a 400 naming the problem; it used
    to be a 200 whose only event was the replica's error."""
    deploy(num_replicas=1)
    cannot = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}
    refused = [
        ({"response_format": cannot}, "invalid_schema", "Invalid type: wat"),
        ({"logit_bias": {"99999999": 5}}, "invalid_logit_bias", "99999999"),
    ]
    for extra, code, named in refused:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
        for stream in (True, False):
            reply = httpx.post(
                f"{base_url}/v1/chat/completions", json={**body, "stream": stream}, timeout=60
            )
            assert reply.status_code == 400, (stream, reply.text)
            error = reply.json()["error"]
            assert error["code"] == code and named in error["message"], (stream, error)


def test_ingress_replicas_share_one_budget_per_tenant(base_url: str, tmp_path: Path) -> None:
    """With two ingress replicas, a tenant's rpm and max_concurrent hold for the
    application: each call is counted once, by the one quota keeper, whichever replica the
    proxy picks. With budgets per replica, the tenant got up to twice its limits."""
    url = f"sqlite:///{tmp_path / 'tenants.db'}"
    store = TenantStore(url)
    store.create_tenant("acme", TenantLimits(rpm=4))
    _, key = store.create_key("acme")
    store.create_tenant("metered", TenantLimits(tpm=300))
    _, metered = store.create_key("metered")
    leaver = store.create_tenant("leaver", TenantLimits(rpm=100, tpm=1000))
    few = store.create_tenant("few", TenantLimits(rpm=3))
    many = store.create_tenant("many", TenantLimits(rpm=100))
    store.create_tenant("busy", TenantLimits(max_concurrent=2))
    _, busy = store.create_key("busy")
    store.close()
    deploy(ingress_replicas=2, database_url=url, auth="required")
    assert serve.status().applications[APP].deployments["ingress"].replica_states == {"RUNNING": 2}
    replies = [
        httpx.post(
            f"{base_url}/v1/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"prompt": f"call {i}", "max_tokens": 1},
            timeout=60,
        )
        for i in range(12)
    ]
    assert [r.status_code for r in replies] == [200] * 4 + [429] * 8, [r.text for r in replies]
    left = [r.headers["x-ratelimit-remaining-requests"] for r in replies[:4]]
    assert left == ["3", "2", "1", "0"]
    assert {r.json()["error"]["code"] for r in replies[4:]} == {"rpm_exceeded"}

    # a call reserves its prompt and max_tokens, and gives back what it did not use: the
    # first call ends at once (its end-of-text token is forced), the second sees the refund
    def ends_at_once(prompt: str) -> httpx.Response:
        return httpx.post(
            f"{base_url}/v1/completions",
            headers={"authorization": f"Bearer {metered}"},
            json={"prompt": prompt, "max_tokens": 100, "logit_bias": {"0": 100}},
            timeout=60,
        )

    first = ends_at_once("first call")
    time.sleep(0.5)  # its settlement, sent without waiting, reaches the keeper
    second = ends_at_once("the second call")
    used = first.json()["usage"]["total_tokens"]
    assert used < first.json()["usage"]["prompt_tokens"] + 100
    reserved = second.json()["usage"]["prompt_tokens"] + 100
    left = int(second.headers["x-ratelimit-remaining-tokens"])
    assert left == 300 - used - reserved, (used, reserved, left)
    # a call over the whole tpm alone: a 400, not a 429 to retry, also from the keeper
    over = httpx.post(
        f"{base_url}/v1/completions",
        headers={"authorization": f"Bearer {metered}"},
        json={"prompt": "too much", "max_tokens": 400},
        timeout=60,
    )
    assert (over.status_code, over.json()["error"]["code"]) == (400, "request_too_large")
    assert "retry-after" not in over.headers

    # a call cancelled while the keeper reserves for it (its client left) gives it back
    async def leave_while_reserving() -> RateState:
        keeper = serve.get_deployment_handle("quotas", app_name=APP)
        call = asyncio.ensure_future(KeptBook(keeper).reserve(leaver, 100, Load(), 1))
        await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        deadline = time.monotonic() + 10
        while True:
            state, _ = await keeper.check_requests.remote(leaver)
            if state.remaining_tokens == 1000 or time.monotonic() > deadline:
                return state

    state = asyncio.run(leave_while_reserving())
    assert (state.remaining_requests, state.remaining_tokens) == (99, 1000)

    # calls made at once go to the keeper together, and each gets its own answer
    async def twenty_at_once() -> list[tuple[str, str]]:
        book = KeptBook(serve.get_deployment_handle("quotas", app_name=APP))

        async def reserve(tenant: Tenant) -> tuple[str, str]:
            try:
                return tenant.name, (await book.reserve(tenant, 1, Load(), 1)).tenant
            except QuotaExceeded as exc:
                return tenant.name, exc.limit

        return await asyncio.gather(*(reserve(t) for t in [few, many] * 10))

    assert sorted(Counter(asyncio.run(twenty_at_once())).items()) == [
        (("few", "few"), 3),
        (("few", "rpm"), 7),
        (("many", "many"), 10),
    ]

    # ten long streams at once: two run, whichever replicas took them, eight are refused
    refusals: list[str] = []

    async def ten_at_once() -> list[tuple[int, str | None]]:
        answered: list[tuple[int, str | None]] = []
        everyone = asyncio.Event()
        body = {"prompt": "long", "max_tokens": 2000, "ignore_eos": True, "stream": True}

        async def call(http: httpx.AsyncClient) -> None:
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                error = None if reply.status_code == 200 else json.loads(await reply.aread())
                answered.append((reply.status_code, error and error["error"]["code"]))
                if error:
                    refusals.append(error["error"]["message"])
                if len(answered) == 10:
                    everyone.set()
                await everyone.wait()  # a running stream holds its slot until then

        headers = {"authorization": f"Bearer {busy}"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
            await asyncio.gather(*(call(http) for _ in range(10)))
        return answered

    answered = asyncio.run(ten_at_once())
    assert sorted(answered, key=str) == [(200, None)] * 2 + [(429, "max_concurrent_exceeded")] * 8
    assert set(refusals) == {  # each call counted once, running or being admitted
        "tenant 'busy' has 2 requests in flight and this call adds 1, over its limit "
        "max_concurrent=2; retry after 1 s"
    }
    # the two streams were closed: their slots come back within a moment
    deadline = time.monotonic() + 5
    while True:
        reply = httpx.post(
            f"{base_url}/v1/completions",
            headers={"authorization": f"Bearer {busy}"},
            json={"prompt": "again", "max_tokens": 1},
            timeout=60,
        )
        if reply.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert reply.status_code == 200, reply.text


def test_a_vision_models_screenshot_request_is_answered_as_on_one_server(
    base_url: str, tmp_path: Path
) -> None:
    """The phone agent's request (a screenshot and earlier turns) to GLM-4.1V on Ray: the
    ingress preprocesses the image and the replica answers it, streamed and whole, with the
    single server's greedy reply and usage. It used to be refused, 400 "use a vision model"."""
    checkpoint = build_random_vision_checkpoint(
        tmp_path / "glm4v", text_overrides={"max_position_embeddings": 2048}
    )
    deploy(model=checkpoint, num_replicas=1)
    body = {
        "model": "glm4v",
        "messages": agent_messages(data_url(encode(screenshot(busy_rows=400)))),
        "max_tokens": 6,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    one, thread = start_service(checkpoint, served_model_name="glm4v")
    try:
        replies = {}
        for name, url in (("one server", one.base_url), ("ray", base_url)):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            whole = client.chat.completions.create(**{**body, "stream_options": None})
            chunks = list(client.chat.completions.create(**body, stream=True))
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            replies[name] = (whole.choices[0].message.content, streamed, chunks[-1].usage)
    finally:
        stop_service(one, thread)
    assert replies["ray"] == replies["one server"]
    text, streamed, usage = replies["ray"]
    assert text == streamed and usage.completion_tokens == 6
    assert usage.prompt_tokens > 500  # the screenshot's tokens are in the prompt


def test_a_killed_replica_is_replaced_and_no_request_is_lost(base_url: str) -> None:
    # 4 batch slots per replica and 24 requests: the victim has streams under way and more
    # queued behind them (sent again to the other replica when it dies)
    deploy(num_replicas=2, max_queued_requests=64, max_num_seqs=4)
    victim = replica_actors()[0]

    async def run() -> tuple[list[Outcome], float]:
        outcomes = [Outcome() for _ in range(24)]
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            tasks = [
                asyncio.create_task(stream(client, f"long {i} " * (1 + i % 5), 120, outcomes[i]))
                for i in range(24)
            ]
            # 6 streams under way: with 4 batch slots per replica, both replicas stream
            deadline = time.monotonic() + 120
            while sum(o.tokens > 0 for o in outcomes) < 6:
                assert time.monotonic() < deadline, "6 streams under way within 120 s"
                await asyncio.sleep(0.05)
            killed_at = time.monotonic()
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            await asyncio.gather(*tasks)
            return outcomes, killed_at

    outcomes, killed_at = asyncio.run(run())
    assert all(o.done for o in outcomes)  # every stream ended properly: nothing hangs or drops
    # ray.kill returns before the actor dies, so a stream may get its first token from the
    # victim just after killed_at: classify by how each stream ended, not by the clock
    failed = [o for o in outcomes if o.error is not None]
    finished = [o for o in outcomes if o.error is None]
    assert failed, f"the killed replica had streams under way: {outcomes}"
    assert all("after streaming part of the reply" in o.error and o.tokens >= 1 for o in failed), [
        o.error for o in failed
    ]
    assert all(o.completion == 120 for o in finished), [o.completion for o in finished]
    late = [o for o in finished if o.first_token_at is None or o.first_token_at > killed_at]
    assert late, f"requests still waiting when the replica died were served in full: {outcomes}"
    # the requests queued on the killed replica were sent again, to the other one
    assert "failed before streaming" in ray_logs()
    wait_for(
        lambda: replica_count() == 2 and victim not in replica_actors(),
        60,
        "Serve replaced the killed replica",
    )


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(base_url: str) -> None:
    deploy(autoscale="1,2", autoscale_target_requests=2, upscale_delay_s=1, downscale_delay_s=3)
    wait_for(lambda: replica_count() == 1, 60, "one replica at rest")

    async def load() -> list[Outcome]:
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            return await asyncio.gather(*(stream(client, f"scale {i}", 300) for i in range(16)))

    outcomes = []
    runner = threading.Thread(target=lambda: outcomes.extend(asyncio.run(load())))
    runner.start()
    wait_for(lambda: replica_count() == 2, 90, "a second replica under load")
    runner.join()
    assert all(o.done and o.error is None for o in outcomes)
    wait_for(lambda: replica_count() == 1, 90, "back to one replica after the load")
