"""An upstream that costs almost no CPU: nginx answering every POST with one fixed JSON body.

At zero latency it measures batchgate's own overhead. With a latency it needs the echo module
(`apt-get install libnginx-mod-http-echo`) for `echo_sleep`, so a latency-bound run measures the runner rather
than a Python upstream's CPU on the same cores.
"""

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

ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")

CONFIG = """
{load_module}
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
            {answer}
        }}
    }}
}}
"""


def find_nginx() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("nginx is needed for the zero-latency run: apt-get install nginx-light")


def can_delay() -> bool:
    return ECHO_MODULE.exists()


@contextmanager
def nginx_upstream(latency_ms: float = 0) -> Iterator[str]:
    """Yields the base URL (ending in /v1) of a running nginx answering after `latency_ms`."""
    port = free_port()
    if latency_ms:
        if not can_delay():
            raise SystemExit("a delayed nginx upstream needs: apt-get install libnginx-mod-http-echo")
        load_module = f"load_module {ECHO_MODULE};"
        answer = f"echo_read_request_body; echo_sleep {latency_ms / 1000:.3f}; echo '{BODY}';"
    else:
        load_module, answer = "", f"return 200 '{BODY}';"
    with tempfile.TemporaryDirectory(prefix="batchgate-nginx-") as root:
        conf = Path(root) / "nginx.conf"
        conf.write_text(CONFIG.format(root=root, port=port, body=BODY, load_module=load_module, answer=answer))
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
