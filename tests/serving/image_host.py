"""Test images, and a real HTTP server on 127.0.0.1 that hosts them for the URL tests.

Paths: ``/shot.png`` (a phone screenshot), ``/big.png`` (more bytes than the tests'
``max_image_bytes``, sent without a Content-Length, so only counting stops it),
``/slow.png`` (answers after ``SLOW_S``), ``/trickle.png`` (its headers a byte at a time,
over about 12 s: no read waits long, the whole does), ``/away.png`` (redirects to
``localhost``, another host name), ``/page.svg`` (an SVG) and anything else 404.
"""

from __future__ import annotations

import base64
import contextlib
import io
import random
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageDraw

__all__ = [
    "HTML",
    "SLOW_S",
    "SVG",
    "data_url",
    "encode",
    "image_host",
    "png_claiming",
    "screenshot",
]

SLOW_S = 3.0
HTML = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><script>x()</script></svg>'


def screenshot(width: int = 1080, height: int = 2400, busy_rows: int = 300) -> Image.Image:
    """A phone screenshot: a status bar, rows of "text", buttons, and a photo-like band of
    ``busy_rows`` noisy rows (what makes a real screenshot's PNG large)."""
    image = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, 80), fill=(30, 30, 30))
    for row in range(40):
        y = 200 + row * 50
        draw.rectangle((40, y, 40 + (row * 97) % (width - 80), y + 24), fill=(60, 60, 60))
    draw.rounded_rectangle((100, height - 300, width - 100, height - 180), 30, fill=(0, 120, 255))
    rng = random.Random(0)
    band = Image.frombytes("RGB", (width, busy_rows), rng.randbytes(width * busy_rows * 3))
    image.paste(band, (0, 600))
    return image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose header claims ``width`` x ``height`` (a decompression bomb's
    shape: the pixels are never there)."""
    data = bytearray(encode(Image.new("L", (8, 8))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@contextmanager
def image_host(shot: bytes, big_bytes: int) -> Iterator[str]:
    """Serve the paths above on 127.0.0.1; yields the base URL (``http://127.0.0.1:PORT``)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the test output clean
            pass

        def _send(self, body: bytes, media_type: str, length: bool = True) -> None:
            self.send_response(200)
            self.send_header("Content-Type", media_type)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # the server under test may give up on it, as the limit tests expect
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def do_GET(self) -> None:
            port = self.server.server_address[1]
            if self.path == "/shot.png":
                self._send(shot, "image/png")
            elif self.path == "/big.png":
                self.close_connection = True  # no Content-Length: the body ends at close
                self._send(shot + b"\0" * big_bytes, "image/png", length=False)
            elif self.path == "/slow.png":
                time.sleep(SLOW_S)
                self._send(shot, "image/png")
            elif self.path == "/trickle.png":  # the status line, a byte a quarter second
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n":
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.25)
                self.close_connection = True
            elif self.path == "/away.png":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/shot.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/page.svg":
                self._send(SVG, "image/svg+xml")
            else:
                self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
