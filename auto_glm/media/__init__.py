"""Images for vision models: data URLs, allowed http(s) hosts, files and bytes -> RGB images.

What is checked is in :mod:`.images` (format, bytes, pixels, before decoding) and
:mod:`.fetch` (allowed hosts, time and byte budget). Everything here blocks but
:func:`fetch`: the server awaits that on its event loop and runs the rest on a thread pool
(:mod:`auto_glm.serving.media`); ``GLMModel.chat`` calls :func:`load_image` directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from auto_glm.media.fetch import fetch, fetch_blocking
from auto_glm.media.images import (
    ACCEPTED_TYPES,
    MediaError,
    MediaLimits,
    check_pixels,
    data_url_bytes,
    decode_image,
    to_rgb,
    too_many_bytes,
)

__all__ = [
    "ACCEPTED_TYPES",
    "MediaError",
    "MediaLimits",
    "decode_image",
    "fetch",
    "image_from_url",
    "is_fetched",
    "load_image",
]


def _scheme(url: str) -> str:
    return url[:12].partition(":")[0].lower()


def is_fetched(url: str) -> bool:
    """Whether the image of ``url`` is downloaded (http or https) with :func:`fetch`."""
    return _scheme(url) in ("http", "https")


def image_from_url(url: str, limits: MediaLimits, label: str = "the image") -> Image.Image:
    """The image of a ``data:`` URL or an ``http(s)://`` URL on an allowed host."""
    scheme = _scheme(url)
    if scheme == "data":
        return decode_image(data_url_bytes(url, limits, label), limits, label)
    if scheme in ("http", "https"):
        return decode_image(fetch_blocking(url, limits, label), limits, label)
    raise MediaError(
        f"{label} has a URL of scheme {scheme[:20]!r}; send a data:image/png;base64,... URL, "
        "or an http(s) URL on a host in allowed_media_domains",
        "image_url_not_allowed",
    )


def load_image(source: Any, limits: MediaLimits, label: str = "the image") -> Image.Image:
    """The RGB image of a PIL image, bytes, a file path, or a data:/http(s) URL string."""
    if isinstance(source, Image.Image):
        check_pixels(*source.size, limits, label)
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), limits, label)
    if isinstance(source, str) and source[:12].lower().startswith(("data:", "http:", "https:")):
        return image_from_url(source, limits, label)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            size = path.stat().st_size
            if size > limits.max_image_bytes:
                raise too_many_bytes(size, limits, f"{label} ({path})")
            data = path.read_bytes()
        except OSError as exc:
            raise MediaError(
                f"{label} could not be read from {path}: {exc.strerror}; check the path",
                "invalid_image",
            ) from exc
        return decode_image(data, limits, f"{label} ({path})")
    raise MediaError(
        f"{label} is a {type(source).__name__}; give a PIL image, bytes, a file path, or a "
        "data:/http(s) URL",
        "invalid_image",
    )
