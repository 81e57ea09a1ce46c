"""Images from http(s) URLs: only from allowed hosts, within a time and a byte budget.

A URL's host must be listed in ``allowed_media_domains`` (``*.example.com`` allows its
subdomains); redirects are followed only within those hosts; the download stops as soon as
it passes ``max_image_bytes`` or ``media_fetch_timeout``, which bounds the whole download.
Proxies from the environment are not used: the allowed hosts are reached directly. The
server awaits :func:`fetch` on its event loop (a client that leaves cancels it);
:func:`fetch_blocking` is for callers that block.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx

from auto_glm.media.images import MediaError, MediaLimits, too_many_bytes

__all__ = ["fetch", "fetch_blocking"]

_MAX_REDIRECTS = 3


def _allowed(host: str, limits: MediaLimits) -> bool:
    host = host.lower().rstrip(".")
    for entry in limits.allowed_media_domains:
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def _check_host(url: httpx.URL, limits: MediaLimits, label: str) -> None:
    if not _allowed(url.host, limits):
        listed = ", ".join(limits.allowed_media_domains) or "none"
        raise MediaError(
            f"{label} is on host {url.host[:100]!r}, which is not in allowed_media_domains "
            f"(allowed: {listed}); send the image as a data: URL, or add the host to "
            "allowed_media_domains",
            "image_url_not_allowed",
        )


def fetch_blocking(url: str, limits: MediaLimits, label: str) -> bytes:
    """:func:`fetch` for a caller that blocks (the Python API), on an event loop of its own
    in a thread of its own, so that it also works where the caller's thread runs a loop."""
    with ThreadPoolExecutor(1, thread_name_prefix="autoglm-fetch") as one:
        return one.submit(asyncio.run, fetch(url, limits, label)).result()


async def fetch(url: str, limits: MediaLimits, label: str) -> bytes:
    """The bytes at ``url`` (http or https), on an allowed host, within ``max_image_bytes``;
    the whole download, from connecting to the last byte, within ``media_fetch_timeout``
    (a host that sends its headers or body a byte at a time is cut off there too). Raises
    MediaError naming the problem; cancelling the caller stops the download."""
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise MediaError(
            f"{label} is not a valid URL ({exc}); check it, or send the image as a data: URL",
            "invalid_image",
        ) from exc
    _check_host(target, limits, label)
    timeout = limits.media_fetch_timeout
    try:
        return await asyncio.wait_for(_download(target, url, limits, label), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
        raise MediaError(
            f"{label} did not arrive within media_fetch_timeout={timeout:g} s; use a faster "
            "host, send the image as a data: URL, or raise media_fetch_timeout",
            "image_fetch_failed",
        ) from exc
    except httpx.HTTPError as exc:
        raise MediaError(
            f"{label} could not be fetched from {url[:200]} ({type(exc).__name__}: "
            f"{exc}); check the URL, or send the image as a data: URL",
            "image_fetch_failed",
        ) from exc


async def _download(target: httpx.URL, url: str, limits: MediaLimits, label: str) -> bytes:
    client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=None)
    async with client:
        for _ in range(_MAX_REDIRECTS + 1):
            request = client.build_request("GET", target, headers={"Accept": "image/*"})
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    target = response.url.join(response.headers["location"])
                    if target.scheme not in ("http", "https") or not _allowed(target.host, limits):
                        raise MediaError(
                            f"{label} redirects to {str(target)[:200]!r}, outside "
                            "allowed_media_domains; link to the image itself",
                            "image_url_not_allowed",
                        )
                    continue
                if response.status_code != 200:
                    raise MediaError(
                        f"{label} could not be fetched: {url[:200]} answered HTTP "
                        f"{response.status_code}; check the URL",
                        "image_fetch_failed",
                    )
                length = response.headers.get("content-length", "")
                declared = int(length) if length.isdigit() else 0
                if declared > limits.max_image_bytes:
                    raise too_many_bytes(declared, limits, label)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limits.max_image_bytes:
                        raise too_many_bytes(size, limits, label)
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                await response.aclose()
    raise MediaError(
        f"{label} redirects more than {_MAX_REDIRECTS} times; link to the image itself",
        "image_fetch_failed",
    )
