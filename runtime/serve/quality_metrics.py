"""The quality counters of `sdrun serve` as Prometheus metrics: `GET /metrics` on their own port.

Triton's metrics endpoint (`--metrics-port`) serves Triton's own counters and PyTriton offers no way to add
ours, so they are served beside it, by default on the next port, in the same text format.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4"  # Prometheus' text exposition format


def start_metrics_server(host: str, port: int, text: Callable[[], str]) -> ThreadingHTTPServer:
    """Serve `text()` at http://host:port/metrics from a daemon thread; `shutdown()` the result to stop."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server hook's name)
            if self.path != PATH:
                self.send_error(404)
                return
            body = text().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="sdrun-quality-metrics").start()
    return server
