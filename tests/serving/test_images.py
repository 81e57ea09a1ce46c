"""Chat with images against a real server on the tiny GLM-4.1V checkpoint.

The phone agent's requests are replayed as it sends them (a 1080x2400 PNG screenshot as a
data URL, earlier turns as text), through the official openai client; every bad image gets
a 400 (the body limit a 413) naming the problem, and the server keeps serving afterwards.
Remote images come from a real HTTP server on 127.0.0.1 (tests/serving/image_host.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from auto_glm.checkpoints.random_vision import build_random_vision_checkpoint
from auto_glm.serving import ServerConfig
from tests.fleet.conftest import start_fleet, stop_fleet
from tests.serving.conftest import (
    TINY_KV,
    Served,
    free_port,
    start_service,
    stop_service,
    until,
)
from tests.serving.image_host import (
    HTML,
    SLOW_S,
    SVG,
    data_url,
    encode,
    image_host,
    png_claiming,
    screenshot,
)

pytestmark = pytest.mark.integration

SHOT = encode(screenshot(busy_rows=400))  # about 1.3 MB, as a real screenshot's PNG
GREEDY = {"max_new_tokens": 4, "temperature": 0}
SYSTEM = "You are a phone agent. Think in <think></think>, act in <answer></answer>."


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    with image_host(SHOT, big_bytes=11 << 20) as base:  # over the default max_image_bytes
        yield base


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_vision_checkpoint(  # room for 10 earlier turns and the image
        tmp_path_factory.mktemp("glm4v"), text_overrides={"max_position_embeddings": 2048}
    )


@pytest.fixture(scope="module")
def vision(checkpoint: Path, host: str) -> Iterator[Served]:
    served, thread = start_service(
        checkpoint, allowed_media_domains=["127.0.0.1"], media_fetch_timeout=1.0
    )
    yield served
    stop_service(served, thread)


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def agent_messages(image_url: str, earlier_turns: int = 10) -> list[dict]:
    """What the phone agent sends: the system prompt, earlier turns as text only (its user
    turns as lists of text parts), and the current screen with the task."""
    messages = [{"role": "system", "content": SYSTEM}]
    for step in range(earlier_turns // 2):
        text = f"Task: set an alarm for 7:00. Screen {step}: the clock app."
        messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
        action = f'do(action="Tap", element=[500,{step}00])'
        answer = f"<think>Step {step}: open the clock.</think><answer>{action}</answer>"
        messages.append({"role": "assistant", "content": answer})
    task = "Task: set an alarm for 7:00. What next?"
    messages.append(
        {"role": "user", "content": [_image(image_url), {"type": "text", "text": task}]}
    )
    return messages


def _chat(served: Served, messages: list[dict], **body) -> httpx.Response:
    return httpx.post(
        f"{served.base_url}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 4, "temperature": 0, **body},
        timeout=60,
    )


def test_the_phone_agents_request_streams_a_reply(vision: Served) -> None:
    assert 1_000_000 < len(SHOT) < 3_000_000, len(SHOT)
    messages = agent_messages(data_url(SHOT))
    client = vision.openai()
    common = dict(model=vision.name, messages=messages, temperature=0, top_p=0.85)
    stream = client.chat.completions.create(
        **common,
        frequency_penalty=0.2,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(**common, frequency_penalty=0.2, max_tokens=8)
    assert content and content == whole.choices[0].message.content
    # the image's tokens are part of the prompt: more than the same request without it
    text_only = client.chat.completions.create(
        model=vision.name, messages=messages[:-1] + [messages[-1] | {"content": "x"}], max_tokens=1
    )
    assert chunks[-1].usage.prompt_tokens > text_only.usage.prompt_tokens + 4
    vision.wait_idle()


def test_through_an_engine_process_the_agents_request_gets_the_same_reply(
    vision: Served, checkpoint: Path
) -> None:
    """``engine_process``: the image is preprocessed in the server's process and its
    tensors cross to the engine's; the reply is the in-process server's, token for token."""
    config = ServerConfig(
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
        model_name_or_path=str(checkpoint),
        served_model_name=vision.name,
        device="cpu",
        dtype="float32",
        kv_cache_memory=TINY_KV,
        engine_process=True,
    )
    server = start_fleet(config)
    try:
        messages = agent_messages(data_url(SHOT), earlier_turns=2)
        body = {"max_tokens": 8, "temperature": 0}
        got = server.openai().chat.completions.create(model=vision.name, messages=messages, **body)
        want = vision.openai().chat.completions.create(model=vision.name, messages=messages, **body)
        assert got.choices[0].message.content == want.choices[0].message.content
        # the image's tokens counted alike (the cached ones depend on each server's past)
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
            want.usage.prompt_tokens,
            want.usage.completion_tokens,
        )
    finally:
        stop_fleet(server)


def test_an_image_from_an_allowed_host(vision: Served, host: str) -> None:
    response = _chat(vision, agent_messages(f"{host}/shot.png", earlier_turns=0))
    assert response.status_code == 200, response.text


CORRUPT = "data:image/png;base64,iVBORw0KGgo!!not-base64"


@pytest.mark.parametrize(
    ("url", "code", "text"),
    [
        (CORRUPT, "invalid_image", "not valid base64"),
        (data_url(SHOT[: len(SHOT) // 2]), "invalid_image", "truncated or corrupt"),
        (data_url(SVG), "unsupported_image_format", "is an SVG document"),
        (data_url(HTML), "unsupported_image_format", "is an HTML document"),
        (data_url(png_claiming(5000, 5000)), "image_too_large", "max_image_pixels=16777216"),
        ("https://example.com/shot.png", "image_url_not_allowed", "allowed_media_domains"),
        ("file:///etc/passwd", "image_url_not_allowed", "scheme 'file'"),
        ("{host}/big.png", "image_too_large", f"max_image_bytes={10 << 20}"),
        ("{host}/slow.png", "image_fetch_failed", "media_fetch_timeout=1 s"),
        ("{host}/trickle.png", "image_fetch_failed", "media_fetch_timeout=1 s"),
        ("{host}/away.png", "image_url_not_allowed", "outside allowed_media_domains"),
    ],
    ids=[
        "base64",
        "truncated",
        "svg",
        "html",
        "pixels",
        "host",
        "file",
        "big",
        "slow",
        "trickle",
        "away",
    ],
)
def test_a_bad_image_is_a_clear_400_and_the_server_stays_healthy(
    vision: Served, host: str, url: str, code: str, text: str
) -> None:
    response = _chat(vision, agent_messages(url.format(host=host), earlier_turns=2))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and text in error["message"], error
    assert error["param"] == "messages.3.content.0"
    assert _chat(vision, agent_messages(data_url(SHOT), earlier_turns=0)).status_code == 200
    vision.wait_idle()


def test_an_image_the_processor_refuses_is_named_with_its_part_and_size(vision: Served) -> None:
    # GLM-4.1V's processor refuses an aspect ratio over 200: the 400 named only "messages"
    thin = Image.new("RGB", (4000, 2), "white")
    content = [
        _image(data_url(SHOT)),
        {"type": "text", "text": "and this strip"},
        _image(data_url(encode(thin))),
    ]
    response = _chat(vision, [{"role": "user", "content": content}])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_image", "messages.0.content.2")
    assert error["message"].startswith("image 2 (4000x2 pixels) cannot be prepared")
    assert "aspect ratio" in error["message"] and "crop or pad it" in error["message"]
    assert _chat(vision, agent_messages(data_url(SHOT), earlier_turns=0)).status_code == 200
    vision.wait_idle()


def test_too_many_images_are_refused_before_any_is_decoded(vision: Served) -> None:
    content = [_image(CORRUPT)] * 100 + [{"type": "text", "text": "all of them"}]
    response = _chat(vision, [{"role": "user", "content": content}])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "too_many_images", error
    assert "100 images, over max_images_per_request=8" in error["message"]


def test_a_50_mb_image_is_stopped_by_the_body_limit(vision: Served) -> None:
    huge = data_url(b"\x89PNG\r\n\x1a\n" + bytes(50 << 20))
    response = _chat(vision, [{"role": "user", "content": [_image(huge)]}])
    assert response.status_code == 413, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "max_request_bytes" in error["message"]
    assert httpx.get(f"{vision.base_url}/health").status_code == 200


def test_the_python_api_takes_paths_bytes_and_pil_images(vision: Served, tmp_path: Path) -> None:
    image = screenshot(300, 600, 50)
    path = tmp_path / "screen.png"
    path.write_bytes(encode(image))
    replies = []
    for source in (path, str(path), path.read_bytes(), image):
        content = [{"type": "image", "image": source}, {"type": "text", "text": "What next?"}]
        messages = [{"role": "user", "content": content}]
        replies.append(vision.model.chat(messages, **GREEDY))
    openai_style = [_image(data_url(encode(image))), {"type": "text", "text": "What next?"}]
    replies.append(vision.model.chat([{"role": "user", "content": openai_style}], **GREEDY))
    assert len(set(replies)) == 1 and replies[0], replies  # the same pixels, the same reply
    with pytest.raises(ValueError, match="is an SVG document"):
        vision.model.chat([{"role": "user", "content": [{"type": "image", "image": SVG}]}])


def test_the_python_api_refuses_images_for_a_text_only_model(served: Served) -> None:
    content = [{"type": "image", "image": Image.new("RGB", (8, 8))}]
    with pytest.raises(ValueError, match="does not accept images"):
        served.model.chat([{"role": "user", "content": content}])


def test_a_drain_waits_for_a_call_whose_image_is_still_downloading(
    checkpoint: Path, host: str
) -> None:
    """The drain counted only calls handed to the engine: it ended at once, and the call
    whose image was downloading got a bare 500 when the server stopped."""
    served, thread = start_service(
        checkpoint, allowed_media_domains=["127.0.0.1"], media_fetch_timeout=SLOW_S + 5
    )
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_chat, served, agent_messages(f"{host}/slow.png", 0))
        until(lambda: served.admission.num_in_flight == 1)  # accepted, downloading
        served.admission.begin_drain()
        refused = _chat(served, agent_messages(data_url(SHOT), 0))  # a new call
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "draining")
        assert thread.is_alive()  # still draining: the first call is in flight
        response = answer.result(timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    thread.join(timeout=30)
    served.model.close()
    assert not thread.is_alive(), "the server did not stop after draining"
