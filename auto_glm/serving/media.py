"""The image parts of chat messages -> validated RGB images, off the event loop.

The count of images is checked first (``max_images_per_request``); then every image is
fetched on the event loop (asynchronously, within ``media_fetch_timeout``) and decoded on a
small thread pool of its own, so a slow allowed host or a large PNG never stalls the event
loop, the tokenizer pool or the engine thread. What is checked
per image (format, size, pixels, hosts) is :mod:`auto_glm.media`; each refusal becomes a 400
whose ``param`` points at the image part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from auto_glm.media import (
    MediaError,
    MediaLimits,
    decode_image,
    fetch,
    image_from_url,
    is_fetched,
)
from auto_glm.serving.config import ServerConfig
from auto_glm.serving.errors import APIError
from auto_glm.serving.protocol import ChatMessage, ImageURL

__all__ = ["ImageLoader", "image_parts"]

_WORKERS = 4


def image_parts(messages: Sequence[ChatMessage]) -> list[tuple[str, ImageURL]]:
    """Every image of the conversation in order, with the ``param`` path naming its part."""
    found = []
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type == "image_url":
                    found.append((f"messages.{i}.content.{j}", part.image_url))
    return found


class ImageLoader:
    """Holds the media limits and the pool that fetches and decodes images."""

    def __init__(self, limits: MediaLimits, max_images_per_request: int) -> None:
        self.limits = limits
        self.max_images_per_request = max_images_per_request
        self._pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="autoglm-media")

    @classmethod
    def from_config(cls, config: ServerConfig) -> ImageLoader:
        limits = MediaLimits(
            max_image_pixels=config.max_image_pixels,
            max_image_bytes=int(config.max_image_bytes),
            allowed_media_domains=tuple(config.allowed_media_domains),
            media_fetch_timeout=config.media_fetch_timeout,
        )
        return cls(limits, config.max_images_per_request)

    def check_count(self, count: int) -> None:
        """400 for more images than ``max_images_per_request``, before any is decoded."""
        if count > self.max_images_per_request:
            raise APIError(
                400,
                f"the request holds {count} images, over max_images_per_request="
                f"{self.max_images_per_request}; send fewer images (earlier turns can be "
                "sent as text), or raise max_images_per_request (--max-images-per-request)",
                param="messages",
                code="too_many_images",
            )

    async def load(self, parts: Sequence[tuple[str, ImageURL]]) -> list[Image.Image]:
        """The images of ``parts``, in order; APIError 400 naming the first bad one."""
        self.check_count(len(parts))
        jobs = [asyncio.ensure_future(self._load(image.url, param)) for param, image in parts]
        try:
            return list(await asyncio.gather(*jobs))
        except BaseException:
            for job in jobs:  # the others are of no use now: stop them
                job.cancel()
            raise

    async def _load(self, url: str, param: str) -> Image.Image:
        """One image: downloaded on the event loop (within media_fetch_timeout, and stopped
        when the call is), decoded on the pool."""
        label = f"the image at {param}"
        loop = asyncio.get_running_loop()
        try:
            if is_fetched(url):
                data = await fetch(url, self.limits, label)
                return await loop.run_in_executor(
                    self._pool, decode_image, data, self.limits, label
                )
            return await loop.run_in_executor(self._pool, image_from_url, url, self.limits, label)
        except MediaError as exc:
            raise APIError(400, str(exc), param=param, code=exc.code) from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
