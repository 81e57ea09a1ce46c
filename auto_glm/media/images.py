"""Bytes and data URLs -> checked RGB images: the format, the size and the pixel count.

An image's bytes must really be PNG, JPEG or WebP (whatever a data URL declares), and the
pixel count in its header must be within ``max_image_pixels`` before its pixels are
decoded, so a small file that would decode to gigabytes (a decompression bomb) costs only
the header read.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ACCEPTED_TYPES",
    "MediaError",
    "MediaLimits",
    "check_pixels",
    "data_url_bytes",
    "decode_image",
    "to_rgb",
    "too_many_bytes",
]

ACCEPTED_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_DECLARED = {"image/png", "image/jpeg", "image/jpg", "image/webp"}
_ACCEPTED = "PNG, JPEG or WebP"
_DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_ORIENTATION = 0x0112  # the EXIF tag
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey (PNG), read as such


class MediaError(ValueError):
    """An image was refused; the message names the image, the problem and the fix.
    ``code``: ``invalid_image``, ``unsupported_image_format``, ``image_too_large``,
    ``image_url_not_allowed`` or ``image_fetch_failed``."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class MediaLimits:
    """The limits every image is held to (the server's settings of the same names)."""

    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 10 << 20
    allowed_media_domains: tuple[str, ...] = ()
    media_fetch_timeout: float = 5.0


def _sniff(data: bytes) -> str:
    """The PIL format name of an accepted image, else what the bytes look like."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in (
        (b"GIF8", "a GIF image"),
        (b"BM", "a BMP image"),
        (b"II*\x00", "a TIFF image"),
        (b"MM\x00*", "a TIFF image"),
        (b"%PDF", "a PDF document"),
    ):
        if data.startswith(magic):
            return name
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in head:
        return "an SVG document"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "an HTML document"
    if head.startswith(b"<"):
        return "an XML or HTML document"
    if not data:
        return "empty"
    return f"not an image (it starts with bytes {data[:8].hex(' ')})"


def check_pixels(width: int, height: int, limits: MediaLimits, label: str) -> None:
    """Raise MediaError (``image_too_large``) over ``max_image_pixels``."""
    if width * height > limits.max_image_pixels:
        raise MediaError(
            f"{label} is {width}x{height} = {width * height} pixels, over max_image_pixels="
            f"{limits.max_image_pixels}; send a smaller image (phone screenshots are about "
            "2.6 million pixels), or raise max_image_pixels",
            "image_too_large",
        )


def too_many_bytes(size: int, limits: MediaLimits, label: str) -> MediaError:
    """The error for an image of ``size`` bytes or more, over ``max_image_bytes``."""
    return MediaError(
        f"{label} holds {size} bytes or more, over max_image_bytes={limits.max_image_bytes}; "
        "send a smaller or more compressed image, or raise max_image_bytes",
        "image_too_large",
    )


def decode_image(data: bytes, limits: MediaLimits, label: str = "the image") -> Image.Image:
    """The RGB image in ``data``; raises MediaError for bytes that are not PNG, JPEG or
    WebP, that do not decode, or that are over the limits (pixels checked from the header,
    before anything is decoded)."""
    if len(data) > limits.max_image_bytes:
        raise too_many_bytes(len(data), limits, label)
    kind = _sniff(data)
    if kind not in ACCEPTED_TYPES:
        raise MediaError(
            f"{label} is {kind}, not an image this server decodes; send {_ACCEPTED}",
            "unsupported_image_format",
        )
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError as exc:
        raise MediaError(
            f"{label} declares more pixels than max_image_pixels={limits.max_image_pixels} "
            f"({exc}); send a smaller image",
            "image_too_large",
        ) from exc
    except _DECODE_ERRORS as exc:
        raise _undecodable(label, kind, exc) from exc
    check_pixels(*image.size, limits, label)
    try:
        image.load()
        return to_rgb(image)
    except _DECODE_ERRORS as exc:
        raise _undecodable(label, kind, exc) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB, as it is meant to be seen: turned as its EXIF orientation says (a
    phone's photo), 16-bit grey scaled to 8 bits (Pillow's convert clips it to white), and
    transparent pixels laid on white, as transformers' image processors do."""
    if image.getexif().get(_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GREY:
        grey = np.asarray(image).astype(np.uint32) // 257  # [H, W], 0..65535 -> 0..255
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        white.alpha_composite(image.convert("RGBA"))
        image = white
    return image.convert("RGB")


def _undecodable(label: str, kind: str, exc: BaseException) -> MediaError:
    reason = re.sub(r" <[^<>]* object at 0x[0-9a-f]+>", "", str(exc))  # Pillow names its buffer
    return MediaError(
        f"{label} starts like a {kind} file but does not decode ({reason}); it is truncated or "
        f"corrupt: send the whole file, as {_ACCEPTED}",
        "invalid_image",
    )


def data_url_bytes(url: str, limits: MediaLimits, label: str) -> bytes:
    """The bytes of a base64 ``data:image/...`` URL, within ``max_image_bytes``."""
    header = _DATA_URL.match(url)
    if header is None:
        raise MediaError(
            f"{label} is not a valid data URL; write data:image/png;base64,<base64 bytes>",
            "invalid_image",
        )
    declared = header.group(1).strip().lower()
    params = [p.strip().lower() for p in header.group(2).split(";") if p.strip()]
    if declared not in _DECLARED:
        raise MediaError(
            f"{label} is a data URL of type {declared[:60] or 'none'!r}; accepted types are "
            "image/png, image/jpeg and image/webp",
            "unsupported_image_format",
        )
    if "base64" not in params:
        raise MediaError(
            f"{label} is a data URL without ;base64; write data:{declared};base64,<base64 bytes>",
            "invalid_image",
        )
    payload = url[header.end() :]
    if re.search(r"\s", payload):  # base64 wrapped at 76 columns, as the base64 tool writes it
        payload = "".join(payload.split())
    if len(payload) // 4 * 3 > limits.max_image_bytes:
        raise too_many_bytes(len(payload) // 4 * 3, limits, label)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(
            f"{label} is not valid base64 ({exc}); encode the file's bytes with standard "
            "base64 (base64 -w0 image.png)",
            "invalid_image",
        ) from exc
