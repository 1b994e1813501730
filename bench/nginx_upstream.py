"""A zero-latency upstream that costs almost no CPU: nginx answering every POST with one fixed JSON body."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from cli.stack import free_port

BODY = ('{"id":"chatcmpl-static","object":"chat.completion","created":1700000000,"model":"bench-model",'
        '"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
        '"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}')

CONFIG = """
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            add_header x-request-id req_static;
            return 200 '{body}';
        }}
    }}
}}
"""


def find_nginx() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("nginx is needed for the zero-latency run: apt-get install nginx-light")


@contextmanager
def nginx_upstream() -> Iterator[str]:
    """Yields the base URL (ending in /v1) of a running nginx."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="batchgate-nginx-") as root:
        conf = Path(root) / "nginx.conf"
        conf.write_text(CONFIG.format(root=root, port=port, body=BODY))
        proc = subprocess.Popen([find_nginx(), "-c", str(conf), "-p", root], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b"{}", timeout=1)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            proc.wait()
