"""Tenants on a real server: API keys, model lists, quotas with OpenAI's headers, cache
isolation, usage accounting, the admin API, and all of it across a restart."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, update

from auto_glm.tenants import TenantLimits, TenantStore
from auto_glm.tenants.schema import api_keys
from tests.serving.conftest import EngineGate, Served, start_service, stop_service, until

pytestmark = pytest.mark.integration

ADMIN = "admin-key-0123456789abcdef"
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


class Tenants:
    """The store behind a server, with one key per tenant."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.store = TenantStore(url)
        self.keys: dict[str, str] = {}

    def add(self, name: str, **limits) -> str:
        self.store.create_tenant(name, TenantLimits(**limits))
        self.keys[name] = self.store.create_key(name)[1]
        return self.keys[name]


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    found = Tenants(f"sqlite:///{tmp_path_factory.mktemp('store') / 'tenants.db'}")
    found.add("alpha")
    found.add("beta")
    found.add("other-models", models=("some-other-model",))
    found.add("rpm2", rpm=2)
    found.add("tpm", tpm=300)
    found.add("daily", daily_tokens=60)
    found.add("tpm-chat", tpm=200)  # both far below the model's context (512)
    found.add("daily-chat", daily_tokens=150)
    found.add("one-at-a-time", max_concurrent=1)
    found.add("urgent-capped", max_priority=5)
    yield found
    found.store.close()


def _serve(checkpoint: Path, tenants: Tenants, **settings) -> tuple[Served, threading.Thread]:
    options = {"max_num_seqs": 16, "max_queued_requests": 128, **settings}
    return start_service(checkpoint, database_url=tenants.url, admin_key=ADMIN, **options)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tenants: Tenants) -> Iterator[Served]:
    served, thread = _serve(tiny_checkpoint, tenants)
    yield served
    stop_service(served, thread)


def client(served: Served, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=key, max_retries=0)


def complete(served: Served, key: str, **options):
    """A completion that generates exactly ``max_tokens`` (4 by default): EOS is ignored."""
    options["extra_body"] = {"ignore_eos": True, **options.get("extra_body", {})}
    return client(served, key).completions.create(
        model=served.name, **{"prompt": "Hello", "max_tokens": 4, **options}
    )


# ---- 401 ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, "needs an API key"),
        ({"authorization": "Bearer agk_nope_nope"}, ""),
        ({"authorization": "Bearer not-a-key"}, ""),
        ({"authorization": "Basic dXNlcjpwYXNz"}, ""),
        ({"x-api-key": "agk_" + "x" * 40}, ""),
        ({"authorization": "Bearer " + "k" * 10_000}, ""),
    ],
)
def test_missing_or_bad_keys_get_401(server: Served, headers: dict, fragment: str) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/completions", json={"prompt": "x"}, headers=headers
    )
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and fragment in error["message"]
    assert "k" * 100 not in error["message"]  # a key is never echoed back
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # probes stay open


def test_every_inference_route_needs_a_key(server: Served, tenants: Tenants) -> None:
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("POST", "/generate", {"prompt": "x"}),
        ("POST", "/infer", {"prompt": "x"}),
    ]:
        response = httpx.request(method, f"{server.base_url}{path}", json=body)
        assert response.status_code == 401, (path, response.text)
        ok = httpx.request(
            method,
            f"{server.base_url}{path}",
            json=body and {**body, "max_tokens" if "messages" in body else "max_new_tokens": 2},
            headers={"x-api-key": tenants.keys["alpha"]},
        )
        assert ok.status_code == 200, (path, ok.text)


def test_revoked_and_expired_keys_fail_on_the_next_request(
    server: Served, tenants: Tenants
) -> None:
    info, key = tenants.store.create_key("alpha")
    assert complete(server, key).usage.completion_tokens == 4
    tenants.store.revoke_key(info.key_id)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        complete(server, key)
    info, short = tenants.store.create_key("alpha", expires_in=timedelta(hours=1))
    assert complete(server, short).usage.completion_tokens == 4
    with create_engine(tenants.url).begin() as db:  # the hour passes
        db.execute(
            update(api_keys)
            .where(api_keys.c.key_id == info.key_id)
            .values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
        )
    with pytest.raises(openai.AuthenticationError, match="expired"):
        complete(server, short)


def test_concurrent_revocation_ends_access_without_losing_accepted_work(
    server: Served, tenants: Tenants
) -> None:
    info, key = tenants.store.create_key("beta")
    streams = [
        client(server, key).completions.create(
            model=server.name,
            prompt="Hold",
            max_tokens=40,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for _ in range(4)
    ]
    tenants.store.revoke_key(info.key_id)
    for stream in streams:  # accepted before the revocation: each runs to its end
        assert sum(len(c.choices[0].text) > 0 for c in stream if c.choices) > 0
    with pytest.raises(openai.AuthenticationError):
        complete(server, key)
    server.wait_idle()


# ---- 403 -----------------------------------------------------------------------------------
def test_model_outside_the_tenants_list_is_403(server: Served, tenants: Tenants) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        complete(server, tenants.keys["other-models"])
    assert caught.value.body["code"] == "model_not_allowed"
    assert "some-other-model" in caught.value.body["message"]
    assert complete(server, tenants.keys["alpha"]).usage.completion_tokens == 4


# ---- 429 -----------------------------------------------------------------------------------
def test_rpm_limit_429_with_openai_headers(server: Served, tenants: Tenants) -> None:
    url = f"{server.base_url}/v1/completions"
    headers = {"authorization": f"Bearer {tenants.keys['rpm2']}"}
    body = {"prompt": "x", "max_tokens": 1}
    first = httpx.post(url, json=body, headers=headers)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert httpx.post(url, json=body, headers=headers).status_code == 200
    refused = httpx.post(url, json=body, headers=headers)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rpm_exceeded" and "2 requests per minute (rpm)" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-tokens" not in refused.headers  # no tpm limit: no token headers


def test_tpm_limit_names_the_limit_with_token_headers(server: Served, tenants: Tenants) -> None:
    key = tenants.keys["tpm"]
    # alone more than the limit: a 400, as a retry would be refused alike (the openai
    # client retries a 429 by itself)
    with pytest.raises(openai.BadRequestError) as caught:
        complete(server, key, max_tokens=400)
    body = caught.value.body
    assert (body["code"], body["param"]) == ("request_too_large", "max_tokens")
    assert "300 tokens per minute (tpm), so it can never run" in body["message"]
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "300"
    assert int(headers["x-ratelimit-remaining-tokens"]) == 300  # nothing used yet
    assert "retry-after" not in headers
    api = client(server, key).completions.with_raw_response
    first = api.create(model=server.name, prompt="Hello", max_tokens=50, temperature=0)
    usage = first.parse().usage
    # the headers are written at admission: the reservation, prompt + max_tokens
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 300 - usage.prompt_tokens - 50
    second = api.create(model=server.name, prompt="Hello", max_tokens=4, temperature=0)
    # by then the first call was settled to what it used
    remaining = 300 - usage.total_tokens - usage.prompt_tokens - 4
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == remaining


def test_a_chat_without_max_tokens_runs_to_what_the_tenants_limits_hold(
    server: Served, tenants: Tenants
) -> None:
    """A chat without max_tokens asks for the rest of the context (OpenAI's default), which
    a tenant whose tpm or daily_tokens is smaller could never reserve: every such call was
    a 429 telling it to lower max_tokens. It now runs to what the smaller limit holds (the
    prompt once, each choice an equal share), and the limit still holds."""
    messages = [{"role": "user", "content": "Hi"}]
    until_eos = {"ignore_eos": True}
    api = client(server, tenants.keys["daily-chat"]).chat.completions
    reply = api.create(model=server.name, messages=messages, temperature=0, extra_body=until_eos)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.total_tokens == 150, reply.usage
    api = client(server, tenants.keys["tpm-chat"]).chat.completions
    reply = api.create(model=server.name, messages=messages, n=2, extra_body=until_eos)
    share = (200 - reply.usage.prompt_tokens) // 2
    assert [c.finish_reason for c in reply.choices] == ["length", "length"]
    assert reply.usage.completion_tokens == 2 * share, reply.usage
    with pytest.raises(openai.RateLimitError) as caught:  # the minute's budget is spent
        api.create(model=server.name, messages=messages)
    assert caught.value.body["code"] == "tpm_exceeded"


def test_daily_budget_429_until_midnight(server: Served, tenants: Tenants) -> None:
    key = tenants.keys["daily"]
    spent = 0
    while spent + 30 <= 60:  # each call uses exactly what it reserves
        spent += complete(server, key, max_tokens=20, prompt="Hi").usage.total_tokens
    with pytest.raises(openai.RateLimitError) as caught:
        complete(server, key, max_tokens=20, prompt="Hi")
    assert caught.value.body["code"] == "daily_tokens_exceeded"
    assert "daily_tokens" in caught.value.body["message"]


def test_max_concurrent_429(server: Served, tenants: Tenants) -> None:
    key = tenants.keys["one-at-a-time"]
    stream = client(server, key).completions.create(
        model=server.name,
        prompt="Long",
        max_tokens=200,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))  # admitted and running
    with pytest.raises(openai.RateLimitError) as caught:
        complete(server, key)
    assert caught.value.body["code"] == "max_concurrent_exceeded"
    assert "max_concurrent=1" in caught.value.body["message"]
    assert caught.value.response.headers["retry-after"] == "1"
    stream.close()
    server.wait_idle()
    assert complete(server, key).usage.completion_tokens == 4


def test_max_queued_429(
    tiny_checkpoint: Path, tenants: Tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenants.add("queue1", max_queued=1)
    served, thread = start_service(tiny_checkpoint, database_url=tenants.url, max_num_seqs=1)
    held = EngineGate(served, monkeypatch)  # nothing leaves the queue until released
    headers = {"authorization": f"Bearer {tenants.keys['queue1']}"}

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=served.base_url, timeout=60) as http:

            def call(i: int):
                body = {"prompt": f"queued {i}", "max_tokens": 2}
                return asyncio.create_task(http.post("/v1/completions", json=body, headers=headers))

            first = call(0)
            await asyncio.to_thread(held.entered.wait, 10)  # running, inside a held step
            second = call(1)
            await asyncio.to_thread(lambda: until(lambda: served.admission.num_waiting == 1))
            refused = await call(2)
            assert refused.json()["error"]["code"] == "max_queued_exceeded"
            assert "max_queued=1" in refused.json()["error"]["message"]
            held.release()
            return [refused.status_code, (await first).status_code, (await second).status_code]

    try:
        assert asyncio.run(scenario()) == [429, 200, 200]
    finally:
        held.release()
        stop_service(served, thread)


def test_tpm_quota_holds_under_64_concurrent_requests(
    tiny_checkpoint: Path, tenants: Tenants
) -> None:
    tenants.add("burst", tpm=1000)
    served, thread = _serve(tiny_checkpoint, tenants, max_num_seqs=64)
    try:
        api = openai.AsyncOpenAI(
            base_url=f"{served.base_url}/v1", api_key=tenants.keys["burst"], max_retries=0
        )

        async def one():
            try:
                return await api.completions.create(
                    model=served.name,
                    prompt="Burst",
                    max_tokens=40,
                    extra_body={"ignore_eos": True},
                )
            except openai.RateLimitError as exc:
                assert exc.body["code"] == "tpm_exceeded"
                return None

        async def burst():
            return await asyncio.gather(*(one() for _ in range(64)))

        results = asyncio.run(burst())
        done = [r for r in results if r is not None]
        per_call = done[0].usage.total_tokens
        assert 1000 // per_call == len(done)  # exactly as many as fit: no overshoot at all
        assert sum(r.usage.total_tokens for r in done) <= 1000
    finally:
        stop_service(served, thread)


# ---- priority, isolation ----------------------------------------------------------------------
def test_priority_is_capped_by_the_tenants_max_priority(server: Served, tenants: Tenants) -> None:
    seen = []
    for key, asked in [(tenants.keys["urgent-capped"], 0), (tenants.keys["alpha"], -3)]:
        stream = client(server, key).completions.create(
            model=server.name,
            prompt="Prio",
            max_tokens=100,
            stream=True,
            extra_body={"ignore_eos": True, "priority": asked},
        )
        next(iter(stream))
        [generation] = list(server.admission.active)
        seen.append(generation.requests[0].priority)
        stream.close()
        server.wait_idle()
    assert seen == [5, -3]  # raised to max_priority=5; no cap for alpha


def test_another_tenants_prompt_is_never_served_from_its_cache(
    server: Served, tenants: Tenants
) -> None:
    prompt = "Shared system prompt for isolation. " * 12  # several full KV blocks
    alpha, beta = tenants.keys["alpha"], tenants.keys["beta"]
    complete(server, alpha, prompt=prompt)
    again = complete(server, alpha, prompt=prompt)
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # alpha's own cache works
    for i, extra in enumerate([{}, {"user": "alpha"}, {"seed": 1}, {"priority": -9}]):
        other = tenants.add(f"isolated-{i}")  # each asks as a tenant that never sent it
        reply = complete(server, other, prompt=prompt, extra_body=extra)
        assert reply.usage.prompt_tokens_details.cached_tokens == 0, extra
    for field in ["cache_salt", "tenant"]:  # nothing can name another tenant's cache
        with pytest.raises(openai.UnprocessableEntityError):
            complete(server, beta, prompt=prompt, extra_body={field: "alpha"})


# ---- usage, admin, restart ---------------------------------------------------------------------
def _admin(served: Served, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN}"}
    return httpx.request(method, f"{served.base_url}/admin{path}", headers=headers, **kwargs)


def test_admin_api_is_guarded(server: Served, tenants: Tenants) -> None:
    url = f"{server.base_url}/admin/tenants"
    assert httpx.get(url).status_code == 401
    forbidden = httpx.get(url, headers={"authorization": f"Bearer {tenants.keys['alpha']}"})
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "admin_key_required"
    names = {t["name"] for t in _admin(server, "GET", "/tenants").json()}
    assert {"alpha", "beta", "rpm2"} <= names


def test_admin_limits_past_the_database_are_400_naming_the_limit(server: Served) -> None:
    # tpm 2**70 reached SQLite, whose OverflowError was a 500
    for body in ({"name": "huge", "tpm": 2**70}, {"name": "huge", "max_priority": -(2**40)}):
        refused = _admin(server, "POST", "/tenants", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "tenant_store_error"
        assert "is invalid" in refused.json()["error"]["message"]
    assert "huge" not in {t["name"] for t in _admin(server, "GET", "/tenants").json()}


def test_admin_limits_take_json_numbers_only(server: Served) -> None:
    """true was stored as rpm=1 and "5" as 5: a mistyped body changed a limit silently."""
    for body in ({"name": "loose", "rpm": True}, {"name": "loose", "rpm": "5"}):
        refused = _admin(server, "POST", "/tenants", json=body)
        assert refused.status_code == 422, refused.text
        assert "rpm" in refused.text
    refused = _admin(server, "POST", "/tenants/nobody/keys", json={"expires_in_days": "1"})
    assert refused.status_code == 422 and "expires_in_days" in refused.text
    assert "loose" not in {t["name"] for t in _admin(server, "GET", "/tenants").json()}


def test_stored_usage_equals_the_responses_and_survives_a_restart(
    tiny_checkpoint: Path, tenants: Tenants
) -> None:
    served, thread = _serve(tiny_checkpoint, tenants)
    created = _admin(served, "POST", "/tenants", json={"name": "acct", "rpm": 100})
    assert created.status_code == 201, created.text
    new_key = _admin(served, "POST", "/tenants/acct/keys", json={})
    key = new_key.json()["key"]
    listed = _admin(served, "GET", "/keys", params={"tenant": "acct"}).json()
    assert [k["key_id"] for k in listed] == [new_key.json()["info"]["key_id"]]
    assert key not in str(listed)
    totals = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}

    def add(usage) -> None:
        totals["requests"] += 1
        totals["prompt_tokens"] += usage.prompt_tokens
        totals["completion_tokens"] += usage.completion_tokens
        totals["cached_tokens"] += usage.prompt_tokens_details.cached_tokens

    api = client(served, key)
    add(complete(served, key, prompt="Count me", max_tokens=5).usage)
    add(complete(served, key, prompt=["One", "Two words"], max_tokens=3, n=2).usage)
    add(complete(served, key, prompt="Count me", max_tokens=5).usage)  # cached prefix
    chat = api.chat.completions.create(
        model=served.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=6
    )
    add(chat.usage)
    chunks = list(
        api.chat.completions.create(
            model=served.name,
            messages=[{"role": "user", "content": "Stream"}],
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    add(chunks[-1].usage)
    [row] = _admin(served, "GET", "/usage", params={"tenant": "acct"}).json()
    assert {k: row[k] for k in totals} == totals and row["errors"] == 0
    assert row["model"] == served.name
    stop_service(served, thread)

    served, thread = _serve(tiny_checkpoint, tenants)  # the same database, a new process state
    try:
        assert complete(served, key).usage.completion_tokens == 4  # the key still works
        [row] = _admin(served, "GET", "/usage", params={"tenant": "acct"}).json()
        assert row["requests"] == totals["requests"] + 1
        assert _admin(served, "DELETE", f"/keys/{listed[0]['key_id']}").json()["active"] is False
        with pytest.raises(openai.AuthenticationError):
            complete(served, key)
    finally:
        stop_service(served, thread)


def test_failed_calls_count_as_errors_and_refused_ones_not_at_all(
    server: Served, tenants: Tenants
) -> None:
    tenants.add("errs")
    key = tenants.keys["errs"]
    with pytest.raises(openai.BadRequestError):
        complete(server, key, prompt=[5] * 10_000)  # refused before admission: no usage
    complete(server, key)
    stream = client(server, key).completions.create(
        model=server.name,
        prompt="Cut",
        max_tokens=300,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()  # the client hangs up: the call ends unfinished
    server.wait_idle()
    [row] = _admin(server, "GET", "/usage", params={"tenant": "errs"}).json()
    assert (row["requests"], row["errors"]) == (2, 1)
    assert row["completion_tokens"] >= 4 + 1


def test_metrics_can_require_the_admin_key(tiny_checkpoint: Path, tenants: Tenants) -> None:
    served, thread = _serve(tiny_checkpoint, tenants, metrics_auth=True)
    try:
        assert httpx.get(f"{served.base_url}/metrics").status_code == 401
        ok = httpx.get(f"{served.base_url}/metrics", headers={"authorization": f"Bearer {ADMIN}"})
        assert ok.status_code == 200 and "autoglm:" in ok.text
        assert httpx.get(f"{served.base_url}/health").status_code == 200
    finally:
        stop_service(served, thread)


def test_auth_turns_on_when_the_first_key_is_created(tiny_checkpoint: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    served, thread = start_service(tiny_checkpoint, database_url=url, admin_key=ADMIN)
    try:
        assert (
            httpx.post(
                f"{served.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 1}
            ).status_code
            == 200
        )
        assert _admin(served, "POST", "/tenants", json={"name": "first"}).status_code == 201
        key = _admin(served, "POST", "/tenants/first/keys", json={}).json()["key"]
        time.sleep(1.1)  # auth=auto checks the store at most once a second
        assert (
            httpx.post(f"{served.base_url}/v1/completions", json={"prompt": "x"}).status_code == 401
        )
        assert complete(served, key).usage.completion_tokens == 4
    finally:
        stop_service(served, thread)


def test_metrics_and_log_lines_carry_the_tenant(server: Served, tenants: Tenants) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    access = logging.getLogger("auto_glm.access")
    level = access.level
    access.setLevel(logging.INFO)  # the test server logs at warning
    access.addHandler(handler)
    try:
        complete(server, tenants.keys["beta"], max_tokens=3)
        until(lambda: records)  # the access line is written after the response is sent
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert [getattr(r, "tenant", None) for r in records if r.path == "/v1/completions"] == ["beta"]
    text = httpx.get(f"{server.base_url}/metrics").text
    samples = {
        (s.name, s.labels.get("tenant"), s.labels.get("finish_reason")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("autoglm:request_success_total", "beta", "length")] >= 1
    assert samples[("autoglm:generation_tokens_total", "beta", None)] >= 3
    assert ("autoglm:generation_tokens_total", "", None) in samples  # anonymous: shown at 0
    assert samples[("autoglm:http_requests_total", "beta", None)] >= 1
