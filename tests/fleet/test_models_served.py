"""Several registered models in one server: routing by `model`, the version header, the KV
cache split, keep_alive unloads and reloads, and verification at every load."""

from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import logging
import threading
import time
import weakref

import pytest

from auto_glm.registry import IntegrityError, SignatureError
from auto_glm.serving.table_setup import build_table
from tests.fleet.conftest import KV, Registry, start_fleet, stop_fleet
from tests.serving.conftest import until

HEADER = "x-autoglm-model-version"


def complete(client, model: str | None, **extra) -> tuple[int, dict, str | None]:
    body = {"prompt": "hello", "max_tokens": 3, "ignore_eos": True, **extra}
    if model is not None:
        body["model"] = model
    response = client.post("/v1/completions", json=body)
    return response.status_code, response.json(), response.headers.get(HEADER)


def test_two_models_serve_concurrently_and_route_by_name(fleet) -> None:
    with fleet.client() as client:
        listed = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["version"], m["state"]) for m in listed] == [
            ("chat", "v1", "ready"),
            ("other", "v1", "ready"),
        ]
        # chat@v2 is registered but not served until traffic names it
        assert listed[0]["versions"] == [{"version": "v1", "state": "ready", "weight": 1.0}]
        assert complete(client, None)[1]["model"] == "chat"  # no model: the first served
        status, body, version = complete(client, "gone")
        assert status == 404 and body["error"]["code"] == "model_not_found" and version is None
        assert body["error"]["message"] == (
            "model 'gone' is not served here; this server serves 'chat', 'other' "
            "(see GET /v1/models)"
        )
        # refused by the version it was routed to, which the error names
        status, body, version = complete(client, "other", prompt=[10**6])
        assert (status, body["error"]["code"], version) == (400, "invalid_prompt", "v1")
    with concurrent.futures.ThreadPoolExecutor(16) as pool, fleet.client() as client:
        results = list(pool.map(lambda i: complete(client, ["chat", "other"][i % 2]), range(32)))
    assert all(status == 200 for status, _, _ in results)
    assert [body["model"] for _, body, _ in results] == ["chat", "other"] * 16
    assert {version for _, _, version in results} == {"v1"}
    assert all(body["usage"]["completion_tokens"] == 3 for _, body, _ in results)
    engines = {v.model: v.engine for v in fleet.table.loaded()}
    assert engines["chat"] is not engines["other"]
    for engine in engines.values():  # the 32 MiB are split by equal shares
        assert (
            KV - engine.core.runner.bytes_per_block
            < engine.num_blocks * (engine.core.runner.bytes_per_block)
            <= KV
        )


def test_kv_shares_split_the_cache_memory(registry: Registry) -> None:
    table = build_table(registry.settings(["chat,kv_share=3", "other"], kv_cache_memory=KV * 4))
    try:
        engines = {v.model: v.engine for v in table.loaded()}
        used = {name: e.num_blocks * e.core.runner.bytes_per_block for name, e in engines.items()}
        assert KV * 3 - 8192 < used["chat"] <= KV * 3 and KV - 8192 < used["other"] <= KV
    finally:
        table.close()


def test_an_idle_model_is_unloaded_after_keep_alive_and_reloaded_on_demand(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_fleet(registry.settings(["chat@v1", "other,keep_alive=0.5"]))
    try:
        [other] = server.table.models["other"].versions.values()
        with server.client() as client:
            until(lambda: other.state.value == "unloaded", timeout=10)
            states = {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]}
            assert states == {"chat": "ready", "other": "unloaded"}
            assert client.get("/ready").status_code == 200  # idle models do not make it unready
            with caplog.at_level(logging.INFO, logger="auto_glm.fleet"):
                status, body, version = complete(client, "other")  # waits for the reload
            assert (status, version, body["usage"]["completion_tokens"]) == (200, "v1", 3)
            messages = [r.getMessage() for r in caplog.records]
            assert any(m.startswith("verifying other@v1: ") for m in messages)
            assert any(m.startswith("other@v1 is ready") for m in messages)
            chat = server.table.models["chat"].versions["v1"]
            assert chat.state.value == "ready"  # no keep_alive: never unloaded
    finally:
        stop_fleet(server)


def test_an_unloaded_engine_is_freed_and_the_heap_frozen_again(registry: Registry) -> None:
    table = build_table(registry.settings(["chat@v1", "other"]))
    try:
        [other] = table.models["other"].versions.values()
        weights = weakref.ref(other.engine.loaded.model)
        table.loader.unload(other, "the test unloads it")
        # freed by the loader's collection, not the test's; then chat's engine runs on a
        # frozen heap again
        until(lambda: weights() is None and gc.get_freeze_count() > 0, timeout=10)
        chat = table.models["chat"].versions["v1"].engine
        assert id(chat.loaded.model) not in {id(obj) for obj in gc.get_objects()}
    finally:
        table.close()


def _flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_changed_weight_file_is_refused_at_start(registry: Registry) -> None:
    entry = registry.store.get("chat", "v1")
    weights = next(entry.path.glob("*.safetensors"))
    _flip_one_byte(weights)
    with pytest.raises(IntegrityError) as caught:
        build_table(registry.settings(["chat@v1"]))
    message = str(caught.value)
    expected = entry.manifest.digests()[weights.name]
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert weights.name in message and expected in message and actual in message


def test_a_file_changed_while_unloaded_is_refused_at_reload(registry: Registry) -> None:
    server = start_fleet(registry.settings(["chat@v1", "other,keep_alive=0.3"]))
    try:
        [other] = server.table.models["other"].versions.values()
        until(lambda: other.state.value == "unloaded", timeout=10)
        entry = registry.store.get("other", "v1")
        (entry.path / "evil.py").write_text("import os\n")
        with server.client() as client:
            status, body, _ = complete(client, "other")
            assert status == 503 and body["error"]["code"] == "model_unavailable"
            assert "evil.py" in body["error"]["message"]
            assert complete(client, "chat")[0] == 200  # the other model is untouched
            (entry.path / "evil.py").unlink()
            assert complete(client, "other")[0] == 200  # fixed: the next request loads it
    finally:
        stop_fleet(server)


def test_required_signatures_refuse_unsigned_and_wrongly_signed_versions(
    registry: Registry, tmp_path
) -> None:
    from auto_glm.registry import generate_key_pair

    private, public = generate_key_pair(tmp_path / "keys")
    config = registry.settings(
        ["chat@v1"], verify_signatures="required", trusted_keys=[str(public)]
    )
    with pytest.raises(SignatureError, match="chat@v1 has no signature"):
        build_table(config)
    other_private, _ = generate_key_pair(tmp_path / "other-keys")
    registry.store.sign("chat", "v1", other_private)  # a key the server does not trust
    with pytest.raises(SignatureError, match="does not verify with any trusted key"):
        build_table(config)
    registry.store.sign("chat", "v1", private)
    table = build_table(config)
    try:
        assert [v.ref for v in table.loaded()] == ["chat@v1"]
    finally:
        table.close()


def test_the_server_answers_while_a_version_loads(fleet) -> None:
    started = time.monotonic()
    with fleet.admin() as admin, fleet.client() as client:
        answers = []

        def probe() -> None:
            while time.monotonic() - started < 1.5:
                answers.append(client.get("/health").status_code)
                time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        response = admin.put("/admin/models/chat/traffic", json={"weights": {"v2": 1}})
        prober.join()
        assert response.status_code == 200, response.text
        assert answers and set(answers) == {200}


def test_a_canary_that_cannot_be_reloaded_gives_its_traffic_back(registry: Registry) -> None:
    server = start_fleet(registry.settings(["chat@v1,keep_alive=0.3"]))
    try:
        with server.admin() as admin:
            split = {"weights": {"v1": 0.5, "v2": 0.5}, "sticky": "user", "stable": "v1"}
            assert admin.put("/admin/models/chat/traffic", json=split).status_code == 200
        versions = server.table.models["chat"].versions
        until(lambda: versions["v2"].state.value == "unloaded", timeout=10)
        _flip_one_byte(next(registry.store.get("chat", "v2").path.glob("*.safetensors")))
        users = [f"user-{i}" for i in range(20)]  # some of them are v2's
        with server.client() as client:
            answers = [complete(client, "chat", user=user) for user in users]
        assert [(status, version) for status, _, version in answers] == [(200, "v1")] * 20
        [event] = server.table.models["chat"].rollbacks
        assert event.version == "v2" and event.reason.startswith("cannot load: ")
        assert "Hash mismatch" in event.reason or "sha256" in event.reason
    finally:
        stop_fleet(server)
