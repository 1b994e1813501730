"""A local webhook receiver that verifies each delivery's Standard Webhooks signature and records it."""

from __future__ import annotations

import base64
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


def providers_toml(sim_port: int, receiver_port: int, tenant: str = "tenant-a", max_concurrency: int = 64) -> str:
    """A providers file: the simulator as the default provider, and a webhook to the receiver for `tenant`."""
    return f"""
[providers.default]
base_url = "http://127.0.0.1:{sim_port}/v1"
api_key_env = "BATCHGATE_UPSTREAM_API_KEY"
max_concurrency = {max_concurrency}

[tenants.{tenant}]
webhook_url = "http://127.0.0.1:{receiver_port}/hooks/batchgate"
webhook_secret = "{SECRET}"
"""


class Receiver:
    def __init__(self, port: int) -> None:
        self.port = port
        self.deliveries: list[dict] = []
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                event = Webhook(SECRET).verify(body, headers)  # raises on a bad signature
                receiver.deliveries.append({"event": event, "headers": headers, "received_at": time.time()})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
