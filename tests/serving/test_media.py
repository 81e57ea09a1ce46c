"""auto_glm.media: what is accepted as an image, and every way one is refused, by name.

URL tests fetch from a real HTTP server on 127.0.0.1 (tests/serving/image_host.py).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator

import pytest
from PIL import Image

from auto_glm.media import MediaError, MediaLimits, decode_image, image_from_url, load_image
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

LIMITS = MediaLimits()
SMALL = Image.new("RGBA", (64, 48), (10, 200, 30, 128))


def _error(call, *args) -> MediaError:
    with pytest.raises(MediaError) as info:
        call(*args)
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_decode_to_rgb(fmt: str) -> None:
    source = SMALL if fmt != "JPEG" else SMALL.convert("RGB")
    image = decode_image(encode(source, fmt), LIMITS)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_a_data_url_is_judged_by_its_bytes_not_its_declared_type() -> None:
    png = encode(SMALL)
    assert image_from_url(data_url(png, "image/jpeg"), LIMITS).size == (64, 48)
    wrapped = base64.encodebytes(png).decode()  # 76 columns, as the base64 tool writes
    assert image_from_url(f"data:image/png;base64,{wrapped}", LIMITS).size == (64, 48)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (SVG, "an SVG document"),
        (HTML, "an HTML document"),
        (encode(SMALL, "GIF"), "a GIF image"),
        (b"%PDF-1.7\n", "a PDF document"),
        (b"\x00\x01\x02\x03garbage", "not an image"),
    ],
)
def test_other_files_are_named_and_the_accepted_formats_listed(data: bytes, what: str) -> None:
    error = _error(image_from_url, data_url(data), LIMITS, "image 1")
    assert error.code == "unsupported_image_format"
    assert f"image 1 is {what}" in str(error) and "PNG, JPEG or WebP" in str(error)


def test_a_declared_type_other_than_png_jpeg_webp_is_refused() -> None:
    error = _error(image_from_url, data_url(SVG, "image/svg+xml"), LIMITS)
    assert error.code == "unsupported_image_format" and "'image/svg+xml'" in str(error)


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("data:image/png;base64,iVBORw0KGgo!!!!", "not valid base64"),
        ("data:image/png,rawbytes", "without ;base64"),
        ("data:nonsense", "not a valid data URL"),
        (data_url(encode(SMALL)[:60]), "truncated or corrupt"),
    ],
)
def test_corrupt_data_is_invalid_image(url: str, text: str) -> None:
    error = _error(image_from_url, url, LIMITS)
    assert error.code == "invalid_image" and text in str(error)


@pytest.mark.parametrize("size", [(5000, 5000), (100_000, 100_000)])
def test_pixels_over_the_limit_are_refused_from_the_header(size: tuple[int, int]) -> None:
    # the data holds 8x8 pixels: decoding would fail as corrupt, so this is the header check
    started = time.monotonic()
    error = _error(decode_image, png_claiming(*size), LIMITS, "image 1")
    assert error.code == "image_too_large" and "max_image_pixels=16777216" in str(error)
    assert time.monotonic() - started < 1


def test_bytes_over_the_limit_are_refused_before_base64_decoding() -> None:
    limits = MediaLimits(max_image_bytes=1000)
    error = _error(image_from_url, data_url(encode(screenshot(300, 900, 100))), limits)
    assert error.code == "image_too_large" and "max_image_bytes=1000" in str(error)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.png", "javascript:x"])
def test_other_schemes_are_refused(url: str) -> None:
    error = _error(image_from_url, url, LIMITS)
    assert error.code == "image_url_not_allowed" and "data:image/png;base64" in str(error)


def test_remote_urls_need_allowed_media_domains() -> None:
    error = _error(image_from_url, "https://example.com/cat.png", LIMITS)
    assert error.code == "image_url_not_allowed"
    assert "'example.com'" in str(error) and "allowed_media_domains" in str(error)
    assert "(allowed: none)" in str(error)
    assert _error(image_from_url, "http://[::1", LIMITS).code == "invalid_image"


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    with image_host(encode(screenshot(300, 600, 50)), big_bytes=3 << 20) as base:
        yield base


ALLOWED = MediaLimits(allowed_media_domains=("127.0.0.1",), media_fetch_timeout=1.0)


def test_an_allowed_host_is_fetched(host: str) -> None:
    assert image_from_url(f"{host}/shot.png", ALLOWED).size == (300, 600)


def test_a_download_stops_at_max_image_bytes(host: str) -> None:
    limits = MediaLimits(allowed_media_domains=("127.0.0.1",), max_image_bytes=1 << 20)
    error = _error(image_from_url, f"{host}/big.png", limits)
    assert error.code == "image_too_large" and f"max_image_bytes={1 << 20}" in str(error)


@pytest.mark.parametrize("path", ["/slow.png", "/trickle.png"])
def test_a_slow_host_times_out(host: str, path: str) -> None:
    # /trickle.png sends its headers a byte at a time: each read was within the timeout,
    # and the download ran for as long as the host kept sending
    started = time.monotonic()
    error = _error(image_from_url, f"{host}{path}", ALLOWED)
    assert error.code == "image_fetch_failed" and "media_fetch_timeout=1 s" in str(error)
    assert time.monotonic() - started < SLOW_S


async def test_an_event_loop_in_the_callers_thread_is_no_obstacle(host: str) -> None:
    # a notebook runs a loop in the thread that calls GLMModel.chat
    assert image_from_url(f"{host}/shot.png", ALLOWED).size == (300, 600)


@pytest.mark.parametrize(
    ("path", "code", "text"),
    [
        ("/away.png", "image_url_not_allowed", "redirects to 'http://localhost:"),
        ("/page.svg", "unsupported_image_format", "is an SVG document"),
        ("/missing.png", "image_fetch_failed", "answered HTTP 404"),
    ],
)
def test_fetched_bytes_are_held_to_the_same_rules(
    host: str, path: str, code: str, text: str
) -> None:
    error = _error(image_from_url, f"{host}{path}", ALLOWED)
    assert error.code == code and text in str(error), str(error)


def test_load_image_takes_paths_bytes_and_pil_images(tmp_path) -> None:
    path = tmp_path / "shot.webp"
    path.write_bytes(encode(SMALL, "WEBP"))
    for source in (path, str(path), path.read_bytes(), SMALL, data_url(encode(SMALL))):
        image = load_image(source, LIMITS)
        assert image.mode == "RGB" and image.size == (64, 48)
    error = _error(load_image, tmp_path / "missing.png", LIMITS)
    assert "could not be read" in str(error) and "missing.png" in str(error)
    error = _error(load_image, Image.new("L", (200, 200)), MediaLimits(max_image_pixels=100))
    assert error.code == "image_too_large"


def _palette_with_a_clear_colour() -> bytes:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    return encode_with(image, transparency=0)


def encode_with(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "pixel"),
    [
        # Pillow's convert("RGB") clipped 16-bit grey: 30000 of 65535 came out white
        (encode_with(Image.new("I;16", (4, 4), 30000)), (116, 116, 116)),
        (encode_with(Image.new("I;16", (4, 4), 200)), (0, 0, 0)),
        # transparent pixels are laid on white (as transformers' processors do), not black
        (encode_with(Image.new("RGBA", (4, 4), (0, 0, 0, 0))), (255, 255, 255)),
        (encode_with(Image.new("RGBA", (4, 4), (10, 20, 30, 255))), (10, 20, 30)),
        (encode_with(Image.new("LA", (4, 4), (0, 0))), (255, 255, 255)),
        (_palette_with_a_clear_colour(), (255, 255, 255)),
    ],
    ids=["grey16", "grey16-dark", "clear", "opaque", "grey-alpha", "palette"],
)
def test_images_decode_as_they_are_seen(data: bytes, pixel: tuple) -> None:
    image = decode_image(data, LIMITS)
    assert (image.mode, image.getpixel((0, 0))) == ("RGB", pixel)


def test_a_photo_is_turned_as_its_exif_orientation_says() -> None:
    photo = Image.new("RGB", (40, 20), "red")
    exif = photo.getexif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    turned = encode_with(photo, "JPEG", exif=exif.tobytes())
    assert decode_image(turned, LIMITS).size == (20, 40)
    assert load_image(Image.open(io.BytesIO(turned)), LIMITS).size == (20, 40)


def test_a_corrupt_image_is_named_without_pillows_buffer() -> None:
    damaged = bytearray(encode(Image.new("RGB", (64, 64), "blue")))
    damaged[40:60] = bytes(20)
    error = _error(decode_image, bytes(damaged), LIMITS)
    assert error.code == "invalid_image" and "object at 0x" not in str(error)
    assert "(cannot identify image file)" in str(error)
