"""The prefill server's bootstrap endpoint (--disaggregation-bootstrap-port): a small HTTP server in
which each DP group of the prefill server publishes how to reach it (its handoff socket, its TP
ranks' transfer engines and KV layouts), and the client a decode server reads that with.

    GET /health                200 "OK" (the decode server's heartbeat)
    GET /info                  {"dp_size": N, "groups": [group 0's info, ...]}; 503 until every
                               group has registered
    PUT /register/<dp rank>    a group's info (JSON), from that group's scheduler

DP group 0's scheduler runs the server; the other groups register with it over HTTP."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger("radixserve.disaggregation")


class BootstrapServer:
    def __init__(self, host: str, port: int, dp_size: int) -> None:
        groups: list[dict | None] = [None] * dp_size
        self.groups = groups
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                if path == "/health":
                    self._reply(200, b"OK", "text/plain")
                elif path == "/info":
                    with lock:
                        missing = [g for g, info in enumerate(groups) if info is None]
                        body = json.dumps({"dp_size": len(groups), "groups": groups}).encode()
                    if missing:
                        self._reply(503, f"DP groups {missing} have not registered yet".encode(), "text/plain")
                    else:
                        self._reply(200, body, "application/json")
                else:
                    self._reply(404, b"", "text/plain")

            def do_PUT(self) -> None:  # noqa: N802
                parts = self.path.split("?")[0].strip("/").split("/")
                try:
                    length = int(self.headers.get("content-length", "0"))
                    info = json.loads(self.rfile.read(length))
                    if len(parts) != 2 or parts[0] != "register" or not isinstance(info, dict):
                        raise ValueError("PUT /register/<dp rank> with a JSON object")
                    group = int(parts[1])
                    if not 0 <= group < len(groups):
                        raise ValueError(f"dp rank {group} is not below {len(groups)}")
                except (ValueError, json.JSONDecodeError) as e:
                    self._reply(400, str(e).encode(), "text/plain")
                    return
                with lock:
                    groups[group] = info
                self._reply(200, b"OK", "text/plain")

            def _reply(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # quiet: polled by peers
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, name="pd-bootstrap", daemon=True).start()
        logger.info("PD bootstrap server on %s:%d", host, port)

    def register(self, dp_rank: int, info: dict[str, Any]) -> None:
        self.groups[dp_rank] = info

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def register_group(host: str, port: int, dp_rank: int, info: dict[str, Any], timeout: float = 300.0) -> None:
    """A DP group other than 0: publish its info on group 0's bootstrap server (retried while that
    server starts)."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"http://{host}:{port}/register/{dp_rank}", data=json.dumps(info).encode(),
                                     method="PUT", headers={"content-type": "application/json"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                reply.read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def fetch_info(host: str, port: int, timeout: float = 5.0) -> dict[str, Any]:
    """A prefill server's published info; raises OSError when it cannot be read (or not yet)."""
    with urllib.request.urlopen(f"http://{host}:{port}/info", timeout=timeout) as reply:
        return json.loads(reply.read())


def check_health(host: str, port: int, timeout: float = 5.0) -> None:
    """Raises OSError unless the prefill server's bootstrap endpoint answers /health."""
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout) as reply:
        reply.read()
