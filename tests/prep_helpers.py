"""Helpers shared by the data-prep tests: tiny images, and a real HTTP server on 127.0.0.1."""

import http.server
import io
import threading
import time
from collections import Counter

import numpy as np
from PIL import Image


def image_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class ImageServer:
    """Serves /img/N.jpg (a distinct JPEG per N), /slowimg/N.jpg (the same after `delay` s), /missing (404),
    /hang (answers after 8 s), /redirect/K/N.jpg (K redirects, then /img/N.jpg), /loop (redirects to
    itself), /big (over any small size limit), /corrupt.jpg (half a JPEG), /toggle/N.jpg (404 until
    `broken` is cleared), /busy (503). Counts every request per path in `hits`."""

    def __init__(self, delay: float = 0.0):
        self.hits: Counter = Counter()
        self.broken = True
        self.delay = delay
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def do_GET(self):
                server.hits[self.path] += 1
                status, headers, body = server.respond(self.path)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def jpeg(n: int) -> bytes:
        return image_bytes(noise((24 + n % 7, 20), seed=n), "JPEG", quality=90)

    def respond(self, path: str) -> tuple[int, dict, bytes]:
        parts = path.strip("/").split("/")
        number = int(parts[-1].split(".")[0]) if parts[-1].split(".")[0].isdigit() else 0
        if parts[0] == "img":
            return 200, {"Content-Type": "image/jpeg"}, self.jpeg(number)
        if parts[0] == "slowimg":
            time.sleep(self.delay)
            return 200, {}, self.jpeg(number)
        if parts[0] == "redirect":
            hops = int(parts[1])
            target = f"/redirect/{hops - 1}/{parts[2]}" if hops > 1 else f"/img/{parts[2]}"
            return 302, {"Location": target}, b""
        if parts[0] == "loop":
            return 302, {"Location": "/loop"}, b""
        if parts[0] == "hang":
            time.sleep(8)
            return 200, {}, self.jpeg(0)
        if parts[0] == "big":
            return 200, {}, bytes(3 << 20)
        if parts[0] == "corrupt.jpg":
            data = self.jpeg(1)
            return 200, {}, data[: len(data) // 2]
        if parts[0] == "toggle":
            return (404, {}, b"not yet") if self.broken else (200, {}, self.jpeg(number))
        if parts[0] == "busy":
            return 503, {}, b"busy"
        return 404, {}, b"no such thing"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
