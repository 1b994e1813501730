"""An OpenAI-compatible upstream that misbehaves on purpose, over real sockets (raw asyncio streams, HTTP/1.1).

The behaviour of a request is named by the first path segment, with `key=value` options in the segments after it
and before `v1`:  POST /big/size=16777216/mode=chunked/v1/chat/completions. A request to a path starting with /v1
(a Stack's default layout) takes its behaviour from the first message of its body instead, written
"hostile:<behaviour> key=value ...", and answers `ok` without one; so one batch can mix behaviours line by line.

Behaviours (options in brackets):
  ok          200, a small chat completion with `usage`, Content-Length, keep-alive
  nonjson     [status=200 ctype=text/html]  an HTML page
  empty       200 with an empty body
  notobject   200 with a JSON array
  deep        [depth=300]  200 with JSON nested `depth` levels (orjson parses 1024, serializes only 255)
  big         [size=16777216 mode=cl|chunked|gzip status=200]  a `size`-byte JSON body; gzip: a small compressed
              body that inflates to `size` bytes (Content-Length counts the compressed bytes)
  echo        [enc=raw status=401]  echoes the presented key (Authorization: Bearer ...) encoded as `enc`, see ENCODINGS
  truncate    [mode=cl|chunked]  promises Content-Length 1000 and sends 10 bytes, or a chunk and no terminator; closes
  reset       [when=before|mid]  resets the connection (SO_LINGER 0): before answering, or after headers and part
              of the body
  close       closes the connection without answering
  garbage     answers bytes that are not HTTP, then closes
  badgzip     200 with Content-Encoding gzip over bytes that are not gzip
  slow        [s=1]  sleeps, then answers ok
  redirect    [to=URL status=307]  a redirect
  health      200 {"status": "ok"} (any method), for readiness checks

`HostileUpstream` runs it in the calling event loop (unit tests); `python tests/hostile_upstream.py --port N`
runs it as a process (end-to-end and memory tests), printing "ready <port>" once it listens. `key_leaks` finds
a key in a written line by decoding what is there, independently of the scrubber it checks.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import gzip
import json
import re
import socket
import ssl
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, unquote_to_bytes

import orjson

WRITE_SLICE = 64 * 1024


def _json_u(key: bytes, upper: bool = False) -> bytes:
    return b"".join((b"\\u%04X" if upper else b"\\u%04x") % ch for ch in key)


def _pct(key: bytes, upper: bool = True) -> bytes:
    return b"".join((b"%%%02X" if upper else b"%%%02x") % ch for ch in key)


# How `echo` writes the key into its answer. Each value builds the bytes placed inside a JSON string (so they must
# be JSON-string-safe) from the key.
ENCODINGS = {
    "raw": lambda k: k,
    "b64": lambda k: base64.b64encode(k),
    # The key inside a longer base64 blob, at each of the other two byte alignments: b64("x" + key + "..."),
    # b64("xy" + key + "..."), and HTTP Basic credentials b64("user:" + key).
    "b64_1": lambda k: base64.b64encode(b"x" + k + b" trailing bytes"),
    "b64_2": lambda k: base64.b64encode(b"xy" + k + b" trailing bytes"),
    "basic": lambda k: b"Basic " + base64.b64encode(b"user:" + k),
    "b64url": lambda k: base64.urlsafe_b64encode(b"~~" + k + b"??>>"),
    "b64url_nopad": lambda k: base64.urlsafe_b64encode(b"?" + k).rstrip(b"="),
    "hex": lambda k: k.hex().encode(),
    "HEX": lambda k: k.hex().upper().encode(),
    "pct": lambda k: quote(k, safe="").encode(),
    "pct_all": lambda k: _pct(k),
    "pct_all_lower": lambda k: _pct(k, upper=False),
    "json_u": lambda k: _json_u(k),
    "json_U": lambda k: _json_u(k, upper=True),
    # One character escaped: matches no fixed pattern in the raw bytes, but parses back to the key.
    "json_one": lambda k: k[:3] + _json_u(k[3:4]) + k[4:],
    "json_slash": lambda k: k.replace(b"/", b"\\/"),
}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    behaviour: str = "ok"
    opts: dict[str, str] = field(default_factory=dict)

    def key(self) -> bytes:
        return self.headers.get("authorization", "").removeprefix("Bearer ").encode("latin-1")


def chat_completion(content: str = "Hello there.") -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-hostile", "object": "chat.completion", "created": 1700000000, "model": "sim-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    })


def parse_behaviour(path: str, body: bytes) -> tuple[str, dict[str, str]]:
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if parts and parts[0] != "v1":
        opts = {}
        for part in parts[1:]:
            if part == "v1":
                break
            name, _, value = part.partition("=")
            opts[name] = unquote(value)
        return parts[0], opts
    try:
        content = orjson.loads(body)["messages"][0]["content"]
    except Exception:  # noqa: BLE001 - any other body is an ordinary request
        return "ok", {}
    if not isinstance(content, str) or not content.startswith("hostile:"):
        return "ok", {}
    words = content.removeprefix("hostile:").split()
    return words[0], dict(w.partition("=")[::2] for w in words[1:])


class HostileUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.seen: Counter[str] = Counter()  # behaviour -> requests received
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._bodies: dict[tuple, bytes] = {}

    def url(self, behaviour: str = "", **opts: object) -> str:
        """A request URL for `behaviour` (the caller's `url`), e.g. url("big", size=100)."""
        scheme = "https" if self.ssl_context else "http"
        segments = [behaviour, *(f"{k}={v}" for k, v in opts.items())] if behaviour else []
        return "/".join([f"{scheme}://{self.host}:{self.port}", *segments, "v1/chat/completions"])

    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> "HostileUpstream":
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.ssl_context,
                                                  limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

    async def __aenter__(self) -> "HostileUpstream":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- HTTP -------------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await self._read_request(reader, writer)
                if request is None:
                    break
                self.seen[request.behaviour] += 1
                keep = await getattr(self, f"_do_{request.behaviour}", self._do_unknown)(request, writer)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
        try:
            first = await reader.readexactly(1)
            if first == b"\x16":  # a TLS ClientHello sent to this plain-HTTP port: answer as nginx does
                writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                await writer.drain()
                return None
            head = first + await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        behaviour, opts = parse_behaviour(path, body)
        return Request(method, path, headers, body, behaviour, opts)

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str = "application/json",
                       headers: dict[str, str] | None = None) -> bool:
        fields = {"content-type": ctype, "content-length": str(len(body)), "x-request-id": "req_hostile"}
        fields.update(headers or {})
        head = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in fields.items())]
        writer.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
        await writer.drain()
        return True

    @staticmethod
    def _rst(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _do_health(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        return await self._respond(writer, 200, b'{"status": "ok"}')

    async def _do_unknown(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        return await self._respond(writer, 404, b'{"error": {"message": "unknown behaviour"}}')

    async def _do_ok(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        return await self._respond(writer, 200, chat_completion())

    async def _do_nonjson(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        page = b"<html><head><title>502 Bad Gateway</title></head><body>upstream went away" + b" ." * 400 + b"</body></html>"
        return await self._respond(writer, int(req.opts.get("status", 200)), page, req.opts.get("ctype", "text/html"))

    async def _do_empty(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        return await self._respond(writer, 200, b"")

    async def _do_notobject(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        return await self._respond(writer, 200, b'["not", "an", "object"]')

    async def _do_deep(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        depth = int(req.opts.get("depth", 300))
        return await self._respond(writer, int(req.opts.get("status", 200)), b'{"a":' + b"[" * depth + b"]" * depth + b"}")

    def _big_body(self, size: int) -> bytes:
        body = self._bodies.get(("big", size))
        if body is None:
            filler = max(0, size - len(b'{"data":""}'))
            body = self._bodies[("big", size)] = b'{"data":"' + b"a" * filler + b'"}'
        return body

    async def _do_big(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        size = int(req.opts.get("size", 16 * 1024 * 1024))
        mode = req.opts.get("mode", "cl")
        status = int(req.opts.get("status", 200))
        if mode == "gzip":
            key = ("gzip", size)
            if key not in self._bodies:
                self._bodies[key] = gzip.compress(self._big_body(size), 9)
            return await self._respond(writer, status, self._bodies[key], headers={"content-encoding": "gzip"})
        body = memoryview(self._big_body(size))
        if mode == "cl":
            writer.write(f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n".encode())
            for i in range(0, len(body), WRITE_SLICE):
                writer.write(body[i:i + WRITE_SLICE])
                await writer.drain()
        else:
            writer.write(f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".encode())
            for i in range(0, len(body), WRITE_SLICE):
                piece = body[i:i + WRITE_SLICE]
                writer.write(b"%x\r\n" % len(piece))
                writer.write(piece)
                writer.write(b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        return True

    async def _do_echo(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        enc = req.opts.get("enc", "raw")
        status = int(req.opts.get("status", 401))
        key = req.key()
        if enc == "header":  # in a header batchgate copies into the output line
            return await self._respond(writer, status, chat_completion(), headers={"x-request-id": f"req_{key.decode()}"})
        if enc == "ctype":  # in the content-type of a non-JSON answer (quoted in the error message)
            return await self._respond(writer, status, b"<html>nope</html>", ctype=f"text/html; key={key.decode()}")
        if enc == "text":  # a non-JSON answer
            return await self._respond(writer, status, b"<html>Invalid key: " + key + b"</html>", ctype="text/html")
        encoded = ENCODINGS[enc](key)
        if status < 300:  # a 2xx whose content carries it: the output file's case
            body = chat_completion("placeholder").replace(b"placeholder", b"You sent " + encoded)
        else:
            body = b'{"error": {"message": "Incorrect API key provided: ' + encoded + b'", "type": "invalid_request_error", "code": "invalid_api_key"}}'
        return await self._respond(writer, status, body)

    async def _do_truncate(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        if req.opts.get("mode", "cl") == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"a\r\n{\"id\": \"ch\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
                         b"{\"id\": \"ch")
        await writer.drain()
        writer.close()
        return False

    async def _do_reset(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        if req.opts.get("when", "before") == "mid":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"id\": ")
            await writer.drain()
            await asyncio.sleep(0.05)
        self._rst(writer)
        return False

    async def _do_close(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        writer.close()
        return False

    async def _do_garbage(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SPLENDID NONSENSE \x00\x01\x02\r\n\r\n")
        await writer.drain()
        writer.close()
        return False

    async def _do_badgzip(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        return await self._respond(writer, 200, b"this is not gzip at all" * 10, headers={"content-encoding": "gzip"})

    async def _do_slow(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(float(req.opts.get("s", 1)))
        return await self._do_ok(req, writer)

    async def _do_redirect(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        return await self._respond(writer, int(req.opts.get("status", 307)), b"",
                                   headers={"location": req.opts.get("to", "http://127.0.0.1:9/v1/chat/completions")})


def key_leaks(line: bytes, key: str) -> list[str]:
    """Forms of `key` found in a JSON line, by decoding what is there (not by re-encoding the key as the scrubber does).

    Looks in the bytes, then in every string of the line: as is, percent-decoded, JSON-unescaped, and every run
    that could be base64 (either alphabet, each of 4 offsets) or hex (each of 2 offsets) decoded.
    """
    raw = key.encode()
    found = []
    if raw in line:
        found.append("raw bytes")

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for k, v in value.items():
                yield k
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for text in strings(orjson.loads(line)):
        decoded = {"text": text.encode()}
        decoded["percent"] = unquote_to_bytes(text)
        decoded["plus"] = unquote_to_bytes(text.replace("+", " "))
        try:
            decoded["json"] = json.loads(f'"{text}"').encode()
        except ValueError:
            pass
        for run in re.findall(r"[A-Za-z0-9+/_=-]{8,}", text):
            for shift in range(4):
                chunk = run[shift:]
                chunk = chunk[: len(chunk) // 4 * 4]
                for name, alt in (("b64", chunk), ("b64url", chunk.replace("-", "+").replace("_", "/"))):
                    try:
                        decoded[f"{name}+{shift}"] = base64.b64decode(alt)
                    except (binascii.Error, ValueError):
                        pass
        for run in re.findall(r"[0-9a-fA-F]{16,}", text):
            for shift in (0, 1):
                part = run[shift:]
                decoded[f"hex+{shift}"] = binascii.unhexlify(part[: len(part) // 2 * 2])
        found += [f"{name} in {text[:60]!r}" for name, blob in decoded.items() if raw in blob]
    return found


def self_signed_context(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1 (no client trusts it)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


async def _main(port: int) -> None:
    server = await HostileUpstream(port=port).start()
    print(f"ready {server.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(_main(parser.parse_args().port))
    except KeyboardInterrupt:
        sys.exit(0)
