"""Calling an upstream provider: one request, retried on transient failures, classified into an outcome.

aiohttp is the client: measured on this hardware a bare aiohttp loop drives ~13x the requests/s of a bare
httpx.AsyncClient loop at the same concurrency, and the upstream call is the hot path of every batch.

What an upstream answers is not trusted. Every answer becomes an `Outcome` that the chunk can write out, and a
failure of one request is that request's outcome, never an exception that ends the sender running it:

- The body is read up to the provider's `max_response_bytes` and no further: a Content-Length over the cap is
  refused before a byte of the body is read; without one (or when the body is compressed) it is streamed with a
  running total and dropped as soon as it passes the cap (`response_too_large`).
- Every form of the provider key that a careless upstream may echo (as sent, base64 at any byte alignment and in
  either alphabet, hex, percent-encoded, JSON-escaped) is replaced by `[redacted]` in the bytes that will be written:
  the body, the request id header, and anything quoted in an error message.
- A 2xx must carry a JSON object; anything else (not JSON, empty, an array, nesting orjson cannot write back) is the
  error `invalid_upstream_response`, with a short scrubbed preview. A non-2xx answer is kept as a response with its
  status code; when its body is not usable JSON it is kept as the (scrubbed) text.
- A transport failure gets one code per class (see `classify_failure` and README "Error codes").
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import errno
import logging
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable
from urllib.parse import quote, quote_plus

import aiohttp
import orjson
from aiohttp import http_exceptions
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    wait_exponential_jitter,
)

from shared.ids import new_request_id
from shared.metrics import MetricsBuffer
from shared.providers import Provider
from workers import reachability
from workers.ratelimit import ProviderLimiter, estimate_tokens

log = logging.getLogger("batchgate.upstream")

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

# The codes of outcomes without a usable HTTP response (status_code None): the error file's `error.code`.
# README "Error codes" explains each; keep the two in step.
INVALID_REQUEST_BODY = "invalid_request_body"  # orjson cannot write the request body (nesting over 254, int > 64 bits)
INVALID_UPSTREAM_RESPONSE = "invalid_upstream_response"  # a 2xx that is not a JSON object, or not HTTP at all
RESPONSE_TOO_LARGE = "response_too_large"  # the answer is larger than the provider's max_response_bytes
CONNECT_REFUSED = "upstream_connect_refused"
DNS_ERROR = "upstream_dns_error"
TLS_ERROR = "upstream_tls_error"
CONNECTION_RESET = "upstream_connection_reset"  # reset or closed by the upstream before its answer began
TRUNCATED = "upstream_truncated_response"  # the answer began (status line and headers) but its body did not complete
TIMEOUT = "request_timeout"  # the request's own deadline, the provider's timeout_s
CONNECTION_ERROR = "upstream_connection_error"  # any other transport failure

# Retrying cannot help: the request cannot be written, or the upstream did answer (and probably did the work, and
# billed it) and the same request would get the same answer.
NOT_RETRIED = frozenset({INVALID_REQUEST_BODY, INVALID_UPSTREAM_RESPONSE, RESPONSE_TOO_LARGE})
# Almost always configuration (a wrong host name, a certificate the worker does not trust): retried once, for a
# resolver or handshake blip, instead of max_retries times with backoff for every line of the batch.
RETRIED_ONCE = frozenset({DNS_ERROR, TLS_ERROR})


@dataclass(frozen=True)
class Outcome:
    """What became of one request: an HTTP response (any status), or a failure with no usable response."""

    status_code: int | None
    body: Any = None
    request_id: str | None = None
    retry_after_s: float | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def retryable(self) -> bool:
        if self.status_code is None:
            return self.error_code not in NOT_RETRIED
        return self.status_code in RETRYABLE_STATUS


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ---- the key, in every form an upstream may echo it ------------------------------------------------------------

REDACTED = b"[redacted]"
# Encoded forms are searched only for keys at least this long: a shorter key's base64 fragment could occur by chance
# in a base64 payload (embeddings, images). Placeholder keys ("EMPTY", "ollama") are matched as sent only.
MIN_ENCODED_KEY_BYTES = 8


def _base64_fragments(key: bytes, encode) -> list[bytes]:
    """The characters of `encode(... + key + ...)` that depend on the key's bytes alone, at each byte alignment.

    A key that starts at byte offset 3k+a of a longer blob is encoded as the characters [ceil(8a/6), 8(a+n)//6) of
    encode(a filler bytes + key): the ones before mix in the preceding bytes, the ones after the following bytes.
    """
    fragments = []
    for a in range(3):
        encoded = encode(b"\0" * a + key)
        fragments.append(encoded[-(-8 * a // 6):8 * (a + len(key)) // 6])
    return fragments


def key_forms(key: bytes) -> list[bytes]:
    """Every form of `key` searched for, as it reads in decoded text, longest first, without repeats."""
    if not key:
        return []
    forms = [key]
    if len(key) >= MIN_ENCODED_KEY_BYTES:
        forms += _base64_fragments(key, base64.b64encode)
        forms += _base64_fragments(key, base64.urlsafe_b64encode)
        hexed = key.hex().encode()
        forms += [hexed, hexed.upper()]
        forms += [b"".join(b"%%%02X" % c for c in key), b"".join(b"%%%02x" % c for c in key)]
        forms += [quote(key, safe="").encode(), quote(key).encode(), quote_plus(key).encode()]
        forms += [b"".join(b"\\u%04x" % c for c in key), b"".join(b"\\u%04X" % c for c in key)]
        forms.append(key.replace(b"/", b"\\/"))
    unique = dict.fromkeys(f for f in forms if f)
    return sorted(unique, key=len, reverse=True)


GRAM = 8  # bytes in a sampled word of the prefilter below


class _Forms:
    """A set of forms to search for, with a prefilter that makes the search cheap when none is there.

    Prefilter: the forms (all at least L bytes long) are searched only if one of the body's 8-byte words, taken at a
    stride s <= L - 7 (a multiple of 8), is an 8-byte piece of one of them. An occurrence of a form covers L - 7
    consecutive starts of 8-byte pieces, so it always contains a sampled word: nothing is missed, and a body without
    any form costs one strided pass in C over len/s words (a 1 KB answer, a 51-character key: 24 words) instead of
    a full scan per form. Keys shorter than 15 bytes get no prefilter.
    """

    __slots__ = ("forms", "shortest", "grams", "step")

    def __init__(self, forms: list[bytes]) -> None:
        self.forms = tuple(forms)
        self.shortest = min(map(len, forms), default=1 << 62)
        self.step = max(0, (self.shortest - GRAM + 1) // GRAM) if forms else 0  # the stride, in words
        self.grams = frozenset(
            int.from_bytes(f[i:i + GRAM], sys.byteorder) for f in forms for i in range(len(f) - GRAM + 1)
        ) if self.step else frozenset()

    def scrub(self, raw: bytes) -> bytes:
        if len(raw) < self.shortest:
            return raw
        if self.step:
            words = memoryview(raw)[:len(raw) - len(raw) % GRAM].cast("Q")
            if self.grams.isdisjoint(words[::self.step]):
                return raw
        for form in self.forms:
            if form in raw:
                raw = raw.replace(form, REDACTED)
        return raw


class Scrubber:
    """Replaces the provider key's forms by `[redacted]`, in decoded text or in JSON text.

    Each method returns its argument itself when nothing was replaced.
    """

    def __init__(self, key: str) -> None:
        forms = key_forms(key.encode())
        self._text = _Forms(forms)
        # JSON text holds a decoded string's forms with backslashes and quotes escaped, and may also spell the key
        # itself with escapes (the \uXXXX and \/ forms, which decode to the key).
        escaped = [orjson.dumps(f.decode("utf-8", "replace"))[1:-1] for f in forms]
        json_forms = dict.fromkeys(escaped + [f for f in forms if 0x5C in f])
        self._json = _Forms(sorted(json_forms, key=len, reverse=True))
        self.slash = "/" in key

    def text(self, raw: bytes) -> bytes:
        """Bytes of text that will be written as a JSON string (the writer escapes them)."""
        return self._text.scrub(raw)

    def json(self, raw: bytes) -> bytes:
        """Bytes of JSON text."""
        return self._json.scrub(raw)

    def header(self, value: str) -> str:
        if len(value) < self._text.shortest:
            return value
        raw = value.encode("utf-8", "replace")
        clean = self._text.scrub(raw)
        return value if clean is raw else clean.decode("utf-8", "replace")


@lru_cache(maxsize=64)
def scrubber_for(key: str) -> Scrubber:
    return Scrubber(key)


def scrub(raw: bytes, secret: bytes) -> bytes:
    """An upstream that echoes the credential it was sent must not carry it into the error file."""
    return scrubber_for(secret.decode("utf-8", "replace")).text(raw) if secret else raw


# ---- one attempt -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseRules:
    """What reading an answer needs from the provider, computed once per caller."""

    max_bytes: int
    scrubber: Scrubber
    timeout_s: float

    @classmethod
    def of(cls, provider: Provider) -> "ResponseRules":
        return cls(provider.max_response_bytes, scrubber_for(provider.secret()), provider.timeout_s)


PREVIEW_BYTES = 200


class _TooLarge(Exception):
    """How the answer was found too large: its Content-Length, or the bytes that arrived."""


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body, unless it is over `cap` bytes: then _TooLarge, with nothing past the cap ever held."""
    length = resp.content_length
    encoded = "Content-Encoding" in resp.headers
    if length is not None and not encoded:
        if length > cap:
            raise _TooLarge(f"its Content-Length is {length} bytes")
        return await resp.read()
    # No Content-Length, or a compressed body (its length counts compressed bytes): count the decoded bytes as they
    # arrive, and stop at the cap.
    chunks = []
    total = 0
    async for chunk in resp.content.iter_any():
        total += len(chunk)
        if total > cap:
            raise _TooLarge(f"over {cap} {'decompressed ' if encoded else ''}bytes arrived"
                            + ("" if length is not None else " without a Content-Length"))
        chunks.append(chunk)
    return b"".join(chunks)


def _preview(raw: bytes) -> str:
    text = raw[:PREVIEW_BYTES].decode("utf-8", "replace")
    return f'"{text}"' + (" (truncated)" if len(raw) > PREVIEW_BYTES else "")


def _unusable(resp: aiohttp.ClientResponse, raw: bytes, what: str, rules: ResponseRules) -> Outcome:
    ctype = rules.scrubber.header(resp.headers.get("Content-Type", "none"))[:100]
    message = (f"The upstream answered HTTP {resp.status} with {what}; content-type {ctype}, {len(raw)} bytes"
               + (f", starting {_preview(raw)}." if raw else "."))
    return Outcome(None, error_code=INVALID_UPSTREAM_RESPONSE, error_message=message)


TOO_DEEP = 255  # orjson reads 1024 levels of nesting but writes 254
CANONICAL_MAX = 16 * 1024  # answers up to this size are rendered once more by orjson; larger ones when needed


def _may_be_too_deep(raw: bytes) -> bool:
    """At least TOO_DEEP '[' and '{' (necessary for that much nesting); a few memchr calls when there are few."""
    seen = 0
    for opener in (0x5B, 0x7B):
        at = raw.find(opener)
        while at >= 0:
            seen += 1
            if seen >= TOO_DEEP:
                return True
            at = raw.find(opener, at + 1)
    return False


def _loads_clean(raw: bytes, scrubber: Scrubber) -> tuple[Any, str | None]:
    """(body, None), or (None, why not) when the answer is not JSON orjson can also write, after redaction."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, ("an empty body" if not raw else f"a body that is not JSON ({exc})")
    # What is written is orjson's rendering of `body`: the key is searched for there, where escapes that could spell
    # it are undone, and it shows that `body` can be written at all. A large answer is rendered only when its text
    # has such escapes or enough brackets to be too deep (a large float array costs as much to render as to read).
    if len(raw) > CANONICAL_MAX:
        clean = scrubber.json(raw)
        if clean is not raw:
            return _loads_clean(clean, scrubber)
        if not ((0x5C in raw and (b"\\u" in raw or (scrubber.slash and b"\\/" in raw))) or _may_be_too_deep(raw)):
            return body, None
    try:
        canonical = orjson.dumps(body)
    except TypeError:  # orjson.JSONEncodeError
        return None, f"JSON nested deeper than the {TOO_DEEP - 1} levels orjson can write"
    clean = scrubber.json(canonical)
    if clean is canonical:
        return body, None
    try:
        return orjson.loads(clean), None
    except orjson.JSONDecodeError:  # the key stood where [redacted] is not JSON (in a number)
        return None, "the provider key where it could not be redacted"


def _answer(resp: aiohttp.ClientResponse, raw: bytes, rules: ResponseRules) -> Outcome:
    status = resp.status
    scrubber = rules.scrubber
    headers = resp.headers
    request_id = headers.get("x-request-id")
    request_id = scrubber.header(request_id) if request_id else new_request_id()
    retry_after = headers.get("retry-after")
    body, problem = _loads_clean(raw, scrubber)
    if problem is None and (isinstance(body, dict) or not 200 <= status < 300):
        return Outcome(status_code=status, body=body, request_id=request_id,
                       retry_after_s=parse_retry_after(retry_after) if retry_after else None)
    text = scrubber.text(scrubber.json(raw))
    if 200 <= status < 300:
        return _unusable(resp, text, problem or f"JSON that is not an object (a {type(body).__name__})", rules)
    # A non-2xx answer keeps its status; a body that is not usable JSON is kept as text.
    return Outcome(status_code=status, body=text.decode("utf-8", "replace"), request_id=request_id,
                   retry_after_s=parse_retry_after(retry_after) if retry_after else None)


async def send_once(session: aiohttp.ClientSession, rules: ResponseRules, url: str, body: bytes,
                    headers: dict[str, str], timeout: aiohttp.ClientTimeout) -> Outcome:
    answered = False
    try:
        # No redirects: a 3xx is an answer (in the error file), so a request and its key go only to the provider.
        async with session.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False) as resp:
            answered = True
            try:
                length = resp.content_length
                if length is not None and length <= rules.max_bytes and "Content-Encoding" not in resp.headers:
                    raw = await resp.read()  # the hot path: the size is known, and it is what arrives
                else:
                    raw = await _read_capped(resp, rules.max_bytes)
            except _TooLarge as how:
                resp.close()  # drop the connection, and the rest of the body with it
                return Outcome(None, error_code=RESPONSE_TOO_LARGE, error_message=(
                    f"The upstream's answer (HTTP {resp.status}) is larger than this provider's max_response_bytes "
                    f"of {rules.max_bytes} bytes: {how}. It was not kept."))
            return _answer(resp, raw, rules)
    except Exception as exc:  # noqa: BLE001 - a request's failure is its outcome, never the end of its sender
        code, message = classify_failure(exc, answered, rules.timeout_s)
        if code == CONNECTION_ERROR and not isinstance(exc, (aiohttp.ClientError, OSError)):
            log.warning("unexpected %s calling the upstream", type(exc).__name__, exc_info=True)
        return Outcome(None, error_code=code, error_message=message)


# ---- transport failures ----------------------------------------------------------------------------------------

_EAI_NAMES = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            yield exc.certificate_error
        elif isinstance(exc, aiohttp.ClientConnectorError):
            yield exc.os_error
        exc = exc.__cause__ or exc.__context__


def _find(exc: BaseException, kind: type) -> BaseException | None:
    return next((e for e in _chain(exc) if isinstance(e, kind)), None)


def _errno(exc: BaseException) -> int | None:
    return next((e.errno for e in _chain(exc) if isinstance(e, OSError) and isinstance(e.errno, int)), None)


def _errno_name(number: int | None) -> str:
    return errno.errorcode.get(number, str(number)) if number is not None else "no errno"


def classify_failure(exc: BaseException, answered: bool, timeout_s: float) -> tuple[str, str]:
    """(error code, message) of an attempt that raised; `answered` once the status line and headers arrived.

    Messages are built from exception classes, errno names and TLS reason codes only: an exception's own text can
    quote the URL or what the upstream sent, so it is never copied.
    """
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError; so are aiohttp's ServerTimeoutErrors
        return TIMEOUT, f"The upstream did not answer within {timeout_s:g} s."
    if answered:
        if isinstance(exc, aiohttp.ClientPayloadError) and _find(exc, http_exceptions.ContentEncodingError):
            return INVALID_UPSTREAM_RESPONSE, "The upstream's body could not be decoded per its Content-Encoding."
        if _find(exc, http_exceptions.ContentLengthError):
            why = "fewer bytes than its Content-Length"
        elif _find(exc, http_exceptions.TransferEncodingError):
            why = "its chunked encoding was cut off"
        elif (number := _errno(exc)) is not None:
            why = f"the connection failed: {_errno_name(number)}"
        else:
            why = f"the connection was lost: {type(exc).__name__}"
        return TRUNCATED, f"The upstream's answer ended before its body was complete ({why})."
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        number = _errno(exc)
        name = _EAI_NAMES.get(number, _errno_name(number)) if number is not None else "no error code"
        return DNS_ERROR, f"Could not resolve the upstream's host name ({name})."
    if _find(exc, ssl.SSLError) or isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch)):
        reasons = (getattr(e, "reason", None) for e in _chain(exc) if isinstance(e, ssl.SSLError))
        reason = next((r for r in reasons if isinstance(r, str)), type(exc).__name__)
        return TLS_ERROR, f"TLS with the upstream failed ({reason})."
    number = _errno(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        if number == errno.ECONNREFUSED:
            return CONNECT_REFUSED, "The upstream refused the connection (ECONNREFUSED)."
        return CONNECTION_ERROR, f"Could not connect to the upstream ({_errno_name(number)})."
    if isinstance(exc, (aiohttp.ServerDisconnectedError, ConnectionResetError)) or number in _RESET_ERRNOS:
        how = _errno_name(number) if number is not None else "closed without an answer"
        return CONNECTION_RESET, f"The upstream dropped the connection before answering ({how})."
    if isinstance(exc, aiohttp.ClientResponseError):  # the status line or headers were not HTTP
        return INVALID_UPSTREAM_RESPONSE, "The upstream's answer was not valid HTTP."
    return CONNECTION_ERROR, f"Could not reach the upstream: {type(exc).__name__}."


# ---- the caller ------------------------------------------------------------------------------------------------


def upstream_headers(provider: Provider) -> dict[str, str]:
    """Every request's headers, built once per caller: the provider's `headers`, then its key as its `auth` says."""
    headers = {"content-type": "application/json"}
    headers.update({name.lower(): value for name, value in provider.headers.items()})
    headers.update(provider.auth_headers())
    return headers


class UpstreamCaller:
    """Sends requests with retries: exponential backoff with jitter, or the upstream's Retry-After when longer."""

    def __init__(self, session: aiohttp.ClientSession, provider: Provider, *, base_s: float, max_s: float,
                 limiter: ProviderLimiter | None = None, metrics: MetricsBuffer | None = None) -> None:
        self.session = session
        self.metrics = metrics or MetricsBuffer()
        self.provider = provider
        self.limiter = limiter
        self.base_s = base_s
        self.max_s = max_s
        self._backoff = wait_exponential_jitter(multiplier=base_s, max=max_s, jitter=base_s)
        self.headers = upstream_headers(provider)
        self.timeout = aiohttp.ClientTimeout(total=provider.timeout_s)
        self.rules = ResponseRules.of(provider)
        self.on_outcome: Callable[[Outcome], None] | None = None  # told every attempt's outcome (workers/routing.py)

    def _wait(self, state: RetryCallState) -> float:
        outcome: Outcome = state.outcome.result()  # type: ignore[union-attr]
        backoff = self._backoff(state)
        if outcome.retry_after_s is not None:
            return min(self.max_s, max(backoff, outcome.retry_after_s))
        return backoff

    def _stop(self, state: RetryCallState) -> bool:
        outcome: Outcome = state.outcome.result()  # type: ignore[union-attr]
        return state.attempt_number >= self.provider.max_retries or outcome.error_code in RETRIED_ONCE

    async def _send(self, url: str, body: bytes) -> Outcome:
        started = time.monotonic()
        outcome = await send_once(self.session, self.rules, url, body, self.headers, self.timeout)
        reachability.observe(self.provider, outcome)  # one warning when a provider cannot be reached at all
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        name = self.provider.name
        self.metrics.observe_latency(name, time.monotonic() - started)
        self.metrics.inc("upstream_sent", name)
        if outcome.status_code == 429:
            self.metrics.inc("upstream_429", name)
        return outcome

    async def attempt(self, url: str, body: bytes, tokens: int) -> Outcome:
        if self.limiter is None:
            return await self._send(url, body)
        await self.limiter.wait_turn(tokens)
        holder = await self.limiter.acquire_slot()
        outcome, started = None, time.monotonic()
        try:
            outcome = await self._send(url, body)
        finally:  # the outcome and its latency adjust an adaptive limit
            await self.limiter.release_slot(holder, outcome, time.monotonic() - started)
        if outcome.status_code == 429:
            await self.limiter.pause(outcome.retry_after_s if outcome.retry_after_s is not None else self.base_s)
        return outcome

    def _record(self, outcome: Outcome) -> Outcome:
        self.metrics.inc("upstream_succeeded" if outcome.ok else "upstream_failed", self.provider.name)
        return outcome

    async def call(self, url: str, request: dict, should_stop=None) -> Outcome:
        try:
            body = orjson.dumps(request)
        except TypeError as exc:  # orjson.JSONEncodeError: nesting over 254, an int beyond 64 bits, a non-JSON type
            return self._record(Outcome(None, error_code=INVALID_REQUEST_BODY,
                                        error_message=f"The request body cannot be written as JSON: {exc}."))
        return await self.send(url, body, should_stop, parsed=request)

    async def send(self, url: str, body: bytes, should_stop=None, parsed: dict | None = None) -> Outcome:
        """Send JSON bytes as they are (a batch line's body, never parsed on the way); `parsed` spares a parse
        when a token limit needs the body's completion budget."""
        tokens = 0
        if self.limiter is not None and self.limiter.us_per_token:
            tokens = estimate_tokens(body, parsed if parsed is not None else orjson.loads(body))
        first = await self.attempt(url, body, tokens)
        if not first.retryable or self.provider.max_retries == 0 or (should_stop and should_stop()):
            return self._record(first)
        self.metrics.inc("upstream_retried", self.provider.name)
        # Only a request that needs a retry pays for the retry machinery.
        retrying = AsyncRetrying(
            stop=self._stop,
            wait=self._wait,
            retry=retry_if_result(lambda o: o.retryable and not (should_stop and should_stop())),
            retry_error_callback=lambda state: state.outcome.result(),
            reraise=False,
        )
        await asyncio.sleep(self._first_wait(first))
        return self._record(await retrying(self.attempt, url, body, tokens))

    def _first_wait(self, outcome: Outcome) -> float:
        backoff = self.base_s
        if outcome.retry_after_s is not None:
            return min(self.max_s, max(backoff, outcome.retry_after_s))
        return backoff
