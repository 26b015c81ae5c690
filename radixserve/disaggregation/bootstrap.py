"""The prefill server's bootstrap endpoint (--disaggregation-bootstrap-port): a small HTTP server in
which the prefill scheduler publishes how to reach it (its transfer engine's session, its handoff
socket, its KV layout), and the client a decode server reads that with."""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger("radixserve.disaggregation")


class BootstrapServer:
    """GET /health: 200 "OK". GET /info: the published JSON."""

    def __init__(self, host: str, port: int, info: dict[str, Any]) -> None:
        body = json.dumps(info).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                payload = b"OK" if path == "/health" else body if path == "/info" else None
                self.send_response(200 if payload is not None else 404)
                self.send_header("content-type", "application/json" if path == "/info" else "text/plain")
                self.send_header("content-length", str(len(payload or b"")))
                self.end_headers()
                self.wfile.write(payload or b"")

            def log_message(self, format: str, *args: Any) -> None:  # quiet: polled by peers
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, name="pd-bootstrap", daemon=True).start()
        logger.info("PD bootstrap server on %s:%d", host, port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def fetch_info(host: str, port: int, timeout: float = 5.0) -> dict[str, Any]:
    """A prefill server's published info; raises OSError when it cannot be read."""
    with urllib.request.urlopen(f"http://{host}:{port}/info", timeout=timeout) as reply:
        return json.loads(reply.read())


def check_health(host: str, port: int, timeout: float = 5.0) -> None:
    """Raises OSError unless the prefill server's bootstrap endpoint answers /health."""
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout) as reply:
        reply.read()
