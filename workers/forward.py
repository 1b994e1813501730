"""Forwarding a batch whole to a provider with a Batch API of its own (batch_api = "native" in the providers file).

Orchestrate validates the input as for any batch, then hands a native provider's batch to a chain of forward steps
instead of planning chunks. Each step is one Celery task on the control queue that does one thing and hands the
chain on to the next step (a countdown): upload the input to the provider's `/files` and create the batch there,
or poll the provider's batch once, mirror its status and `request_counts` onto the local batch through the
lifecycle's verbs, and, once it has ended, download its output and error files into batchgate's own files. The
user sees one ordinary batch whose files hold every `custom_id` exactly once.

Nothing of it lives in a process: where forwarding stands (the provider's file and batch ids, the markers of an
upload or create begun, the poll interval) is in the batch's record, so any worker takes over a step whose process
died. The chain's token in the record lets exactly one step run next (a duplicate or superseded message finds
another token and drops); the sweeper starts a new chain when the due step is long overdue (shared/recovery.py).
Upload and create are idempotent across a crash: each id is recorded as soon as it is known, a begun upload is
looked for among the provider's recent files by name, and a begun create among its batches by the metadata key
`batchgate_batch_id`.

Local cancel and local expiry are passed on as a cancel of the provider's batch; the lines it never ran end as
`batch_cancelled` / `batch_expired` error lines, as do lines of the input the provider's files leave out.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, BinaryIO

import aiohttp
import orjson

from shared import forwarding
from shared import lines as wire
from shared.blobs import BlobNotFound
from shared.lifecycle import (
    CANCELLING,
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINALIZING,
    MOVES,
    VALIDATING,
    BatchRecord,
    Ending,
    forward_ending,
)
from shared.providers import Provider
from shared.blob_keys import batch_input_key, forwarded_key
from workers.finalize import register_file
from workers.runtime import Runtime
from workers.upstream import parse_retry_after, scrubber_for, upstream_headers
from workers.usage import Usage

log = logging.getLogger("batchgate.forward")

REMOTE_TERMINAL = (COMPLETED, FAILED, EXPIRED, CANCELLED)
CANCEL_RESEND_S = 10.0  # a provider batch that has not taken up a cancel is asked again this often
EXPIRY_GRACE_S = 120.0  # past the local window, how long the provider gets to end its cancelled batch
LOOKUP_PAGES = 5  # pages of the provider's batches searched for a create whose reply was lost
BACKOFF_GROWTH = 1.5
BLOCK = 1 << 16

# The error line written for a line of the input that the provider's files leave out, by the ending verb.
FILL = {
    "complete": ("provider_result_missing", "The provider's batch ended without a result for this request."),
    "end_cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
    "expire": ("batch_expired", "This request could not be executed before the completion window expired."),
    "fail_remote": ("batch_failed", "This request was not executed because the provider's batch failed."),
}


class RemoteError(Exception):
    """The provider answered with an error, or could not be reached (status None)."""

    def __init__(self, status: int | None, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in (408, 409, 425, 429) or self.status >= 500


class Remote:
    """The provider's Files and Batches API, paced by the provider's shared rate limiter (rpm) like its lines."""

    def __init__(self, rt: Runtime, provider: Provider) -> None:
        self.provider = provider
        self.session = rt.session(provider)
        self.limiter = rt.limiter(provider)
        self.headers = {k: v for k, v in upstream_headers(provider).items() if k != "content-type"}
        self.scrubber = scrubber_for(provider.secret())
        self.timeout = aiohttp.ClientTimeout(total=provider.timeout_s)
        # Uploads and downloads take as long as their size needs; only a stall is an error.
        self.transfer_timeout = aiohttp.ClientTimeout(total=None, sock_connect=provider.timeout_s,
                                                      sock_read=provider.timeout_s)

    def url(self, path: str) -> str:
        return f"{self.provider.base_url}{path}"

    async def _turn(self) -> None:
        if self.limiter is not None:
            await self.limiter.wait_turn(0)

    async def _refused(self, resp: aiohttp.ClientResponse) -> RemoteError:
        raw = await resp.content.read(4096)
        try:
            detail = orjson.loads(raw)["error"]["message"]
        except Exception:  # noqa: BLE001 - any answer that is not OpenAI's error shape
            detail = raw[:200].decode("utf-8", "replace")
        message = self.scrubber.text(str(detail).encode()).decode("utf-8", "replace")
        retry_after = parse_retry_after(resp.headers.get("retry-after"))
        if resp.status == 429 and self.limiter is not None:
            await self.limiter.pause(retry_after if retry_after is not None else 1.0)
        return RemoteError(resp.status, f"HTTP {resp.status}: {message}", retry_after)

    async def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None,
                   form: aiohttp.FormData | None = None) -> dict:
        await self._turn()
        headers = dict(self.headers)
        data: object = form
        if body is not None:
            headers["content-type"] = "application/json"
            data = orjson.dumps(body)
        try:
            async with self.session.request(method, self.url(path), data=data, params=params, headers=headers,
                                            timeout=self.transfer_timeout if form is not None else self.timeout,
                                            allow_redirects=False) as resp:
                if resp.status != 200:
                    raise await self._refused(resp)
                raw = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise RemoteError(None, f"Could not reach the provider: {type(exc).__name__}.") from None
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise RemoteError(None, "The provider's answer was not JSON.") from None
        if not isinstance(answer, dict):
            raise RemoteError(None, "The provider's answer was not a JSON object.")
        return answer

    async def upload(self, source: BinaryIO, filename: str) -> dict:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", source, filename=filename, content_type="application/jsonl")
        return await self.call("POST", "/files", form=form)

    async def lines(self, file_id: str) -> AsyncIterator[bytes]:
        """The lines of a provider file, streamed."""
        await self._turn()
        try:
            async with self.session.get(self.url(f"/files/{file_id}/content"), headers=self.headers,
                                        timeout=self.transfer_timeout, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise await self._refused(resp)
                rest = b""
                async for block in resp.content.iter_chunked(BLOCK):
                    *whole, rest = (rest + block).split(b"\n")
                    for line in whole:
                        if line.strip():
                            yield line
                if rest.strip():
                    yield rest
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise RemoteError(None, f"Could not download the provider's file {file_id}: {type(exc).__name__}.") \
                from None


@dataclass
class Collected:
    """The local output and error files made from the provider's, with their counts."""

    completed: int = 0
    codes: Counter = field(default_factory=Counter)  # the error lines by code
    usage: Usage = field(default_factory=Usage)
    dropped: int = 0  # provider lines for no input line, or for one already written

    @property
    def failed(self) -> int:
        return sum(self.codes.values())


def _step_token() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class StepResult:
    delay: float | None  # when to run the next step; None: forwarding is over
    ended: str | None = None  # the terminal status this step set


class Forwarder:
    def __init__(self, rt: Runtime, record: BatchRecord, provider: Provider, lease: str) -> None:
        self.rt = rt
        self.store = rt.store
        self.record = record
        self.id = record.id
        self.provider = provider
        self.lease = lease
        self.remote = Remote(rt, provider)
        self.settings = rt.settings

    def renew(self) -> None:
        self.store.renew_forward_lease(self.id, self.lease, self.settings.chunk_lease_s)

    def stop_reason(self, now: float) -> str | None:
        """Why the provider's batch must be cancelled: the local batch was cancelled, or its window is over."""
        st = self.record.state
        if st.stop:
            return st.stop
        if now >= self.record.spec.expires_at:
            self.store.set_stop(self.id, "expired")
            return self.store.stop_reason(self.id)
        if st.status == CANCELLING:
            return "cancelled"
        return None

    async def step(self) -> StepResult:
        now = time.time()
        stop = self.stop_reason(now)
        try:
            if self.record.state.provider_batch_id is None:
                if stop is not None:  # nothing was sent to the provider: every line ends here
                    return StepResult(None, await self.finish(None, stop))
                await self.submit(now)
                return StepResult(self.settings.forward_poll_min_s)
            remote = await self.remote.call("GET", f"/batches/{self.record.state.provider_batch_id}")
            return await self.follow(remote, stop, now)
        except RemoteError as exc:
            return await self.trouble(exc, stop, now)
        except BlobNotFound:
            return StepResult(None, self.end_failed("results_lost", "The batch's input was lost from storage."))

    async def trouble(self, exc: RemoteError, stop: str | None, now: float) -> StepResult:
        if exc.retryable:
            if stop == "expired" and now > self.record.spec.expires_at + EXPIRY_GRACE_S:
                log.warning("%s: provider unreachable past the window (%s); ending expired", self.id, exc.message)
                return StepResult(None, await self.finish(None, "expired"))
            interval = max(self.settings.forward_poll_min_s, self.record.state.forward_interval * BACKOFF_GROWTH)
            delay = min(self.settings.forward_poll_max_s, max(interval, exc.retry_after or 0.0))
            self.store.save_forward(self.id, forward_interval=delay)
            log.warning("%s: provider %s: %s; trying again in %.1f s", self.id, self.provider.name, exc.message,
                        delay)
            return StepResult(delay)
        log.error("%s: provider %s refused: %s", self.id, self.provider.name, exc.message)
        return StepResult(None, self.end_failed(
            "provider_error", f"The provider '{self.provider.name}' refused the batch: {exc.message}"))

    # ---- upload and create, idempotent ----------------------------------------------------------------------

    async def submit(self, now: float) -> None:
        st = self.record.state
        file_id = st.provider_file_id
        if file_id is None and st.upload_started_at:
            file_id = await self.find_upload()
        if file_id is None:
            self.store.save_forward(self.id, upload_started_at=now)
            with self.rt.blobs.open(batch_input_key(self.id)) as source:
                file_id = str((await self.remote.upload(source, self.filename))["id"])
            log.info("%s: input uploaded to provider %s as %s", self.id, self.provider.name, file_id)
        self.store.save_forward(self.id, provider_file_id=file_id)
        self.renew()
        batch_id = await self.find_batch() if st.create_started_at else None
        if batch_id is None:
            self.store.save_forward(self.id, create_started_at=time.time())
            created = await self.remote.call("POST", "/batches", {
                "input_file_id": file_id, "endpoint": self.record.spec.endpoint,
                "completion_window": forwarding.REMOTE_WINDOW, "metadata": {forwarding.METADATA_KEY: self.id}})
            batch_id = str(created["id"])
            log.info("%s: created batch %s at provider %s", self.id, batch_id, self.provider.name)
        self.store.save_forward(self.id, provider_batch_id=batch_id, forward_interval=self.settings.forward_poll_min_s)

    @property
    def filename(self) -> str:
        return f"{self.id}.jsonl"

    async def find_upload(self) -> str | None:
        """An upload begun by a step that died: the provider's newest batch file of this batch's name and size."""
        size = self.rt.blobs.size(batch_input_key(self.id))
        page = await self.remote.call("GET", "/files", params={"purpose": "batch", "limit": "100", "order": "desc"})
        for file in page.get("data") or []:
            if isinstance(file, dict) and file.get("filename") == self.filename and file.get("bytes") == size:
                return str(file["id"])
        return None

    async def find_batch(self) -> str | None:
        """A create begun by a step that died (its reply lost): the provider batch whose metadata names this one."""
        after = None
        for _ in range(LOOKUP_PAGES):
            params = {"limit": "100"} | ({"after": after} if after else {})
            page = await self.remote.call("GET", "/batches", params=params)
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for batch in data:
                if (batch.get("metadata") or {}).get(forwarding.METADATA_KEY) == self.id:
                    log.info("%s: found its provider batch %s by metadata", self.id, batch.get("id"))
                    return str(batch["id"])
            if not page.get("has_more") or not data:
                return None
            after = data[-1].get("id")
        return None

    # ---- following the provider's batch ---------------------------------------------------------------------

    async def follow(self, remote: dict, stop: str | None, now: float) -> StepResult:
        status = str(remote.get("status") or "")
        counts = remote.get("request_counts") if isinstance(remote.get("request_counts"), dict) else {}
        completed, failed = int(counts.get("completed") or 0), int(counts.get("failed") or 0)
        self.store.mirror_counts(self.id, completed, failed)
        local = self.rt.lifecycle.mirror(self.record, status, now)
        if status in REMOTE_TERMINAL:
            self.renew()
            return StepResult(None, await self.finish(remote, stop, local))
        if stop is not None and status not in (CANCELLING, FINALIZING) and \
                now - self.record.state.cancel_sent_at >= CANCEL_RESEND_S:
            await self.cancel_remote(stop)
        if stop == "expired" and now > self.record.spec.expires_at + EXPIRY_GRACE_S:
            log.warning("%s: the provider has not ended its batch %s past the window; ending expired", self.id,
                        self.record.state.provider_batch_id)
            return StepResult(None, await self.finish(None, "expired"))
        seen = f"{status}:{completed}:{failed}"
        if stop is not None or seen != self.record.state.forward_seen:
            interval = self.settings.forward_poll_min_s
        else:
            interval = min(self.settings.forward_poll_max_s,
                           max(self.settings.forward_poll_min_s, self.record.state.forward_interval * BACKOFF_GROWTH))
        self.store.save_forward(self.id, forward_interval=interval, forward_seen=seen)
        return StepResult(interval)

    async def cancel_remote(self, stop: str) -> None:
        try:
            await self.remote.call("POST", f"/batches/{self.record.state.provider_batch_id}/cancel")
            log.info("%s: asked provider %s to cancel %s (%s)", self.id, self.provider.name,
                     self.record.state.provider_batch_id, stop)
        except RemoteError as exc:  # a batch ending anyway refuses; the next poll sees how it ended
            log.warning("%s: cancel of %s: %s", self.id, self.record.state.provider_batch_id, exc.message)
            if exc.retryable:
                return
        self.store.save_forward(self.id, cancel_sent_at=time.time())

    # ---- the end ----------------------------------------------------------------------------------------------

    def end_failed(self, code: str, message: str) -> str | None:
        return end_failed(self.rt, self.id, code, message)

    async def finish(self, remote: dict | None, stop: str | None, local: str | None = None) -> str | None:
        """End the local batch as its provider's batch ended (None: it never started there, or is given up on)."""
        record = self.store.batch_record(self.id)
        if record is None or record.state.terminal:
            return None
        remote_status = str(remote.get("status")) if remote is not None else (
            CANCELLED if stop == "cancelled" else EXPIRED)
        verb = forward_ending(local or record.state.status, remote_status, stop)
        now = time.time()
        remote_errors = _errors(remote) if remote is not None and remote_status == FAILED else None
        if verb == "fail":  # refused while validating: no request ran
            errors = remote_errors or [{"code": "provider_batch_failed", "param": None, "line": None,
                                        "message": f"The provider '{self.provider.name}' failed the batch."}]
            moved = self.rt.lifecycle.end(record, "fail", now, Ending(errors=errors)).moved
            return FAILED if moved else None
        if verb == "end_cancelled" and record.state.status != CANCELLING:
            self.rt.lifecycle.cancel(self.id, now)
            record = self.store.batch_record(self.id) or record
        files = [remote.get("output_file_id"), remote.get("error_file_id")] if remote is not None else []
        got, output_key, error_key = await self.collect([f for f in files if f], *FILL[verb])
        stamp = int(now)
        output_file_id = register_file(self.rt, record, "output", [output_key] if got.completed else [], stamp,
                                       self.renew)
        error_file_id = register_file(self.rt, record, "error", [error_key] if got.failed else [], stamp, self.renew)
        ending = Ending(completed=got.completed, failed=got.failed, usage=got.usage.as_list(),
                        output_file_id=output_file_id, error_file_id=error_file_id, codes=dict(got.codes),
                        errors=remote_errors if verb == "fail_remote" else None)
        if verb == "fail_remote" and not ending.errors:
            ending = replace(ending, errors=[{"code": "provider_batch_failed", "param": None, "line": None,
                                              "message": f"The provider '{self.provider.name}' failed the batch."}])
        outcome = self.rt.lifecycle.end(record, verb, time.time(), ending)
        if got.dropped:
            log.warning("%s: %d lines of the provider's files were for no input line, or repeated one; dropped",
                        self.id, got.dropped)
        log.info("%s: provider batch %s ended %s; %s (%d completed, %d failed)", self.id,
                 record.state.provider_batch_id, remote_status, verb, got.completed, got.failed)
        return MOVES[verb].to if outcome.moved else None

    def wanted(self) -> dict[str, int]:
        """custom_id -> line number, of every request of the input."""
        out: dict[str, int] = {}
        with self.rt.blobs.open(batch_input_key(self.id)) as source:
            for line_no, raw in enumerate(source, start=1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if raw.strip():
                    out.setdefault(wire.decode_input(raw).custom_id, line_no)
        return out

    async def collect(self, file_ids: list[str], fill_code: str, fill_message: str) -> tuple[Collected, str, str]:
        """Write the provider's result lines into the batch's output and error parts, each custom_id of the input
        once, and an error line `fill_code` for every one the provider's files leave out."""
        wanted = self.wanted()
        got = Collected()
        seen: set[str] = set()
        output_key = forwarded_key(self.id, "output")
        error_key = forwarded_key(self.id, "error")
        with self.rt.blobs.writer(output_key) as out, self.rt.blobs.writer(error_key) as err:
            for file_id in file_ids:
                n = 0
                async for raw in self.remote.lines(file_id):
                    n += 1
                    if n % 2000 == 0:
                        self.renew()
                    try:
                        line = wire.decode_result(raw)
                    except Exception:  # noqa: BLE001 - not a result line: its request is filled in below
                        got.dropped += 1
                        continue
                    if line.custom_id not in wanted or line.custom_id in seen:
                        got.dropped += 1
                        continue
                    seen.add(line.custom_id)
                    if line.ok:
                        out.write(raw + b"\n")
                        got.completed += 1
                        got.usage.add(line.response.body if line.response is not None else None)
                    else:
                        code = line.code
                        if code == "batch_cancelled" and fill_code == "batch_expired":
                            # cancelled by batchgate because its own window ran out: expired, as the user sees it
                            raw = wire.encode(wire.ResultLine(line.id, line.custom_id, None,
                                                              wire.LineError(fill_code, fill_message)))
                            code = fill_code
                        err.write(raw + b"\n")
                        self._count_failed(got, code)
            for custom_id, line_no in wanted.items():
                if custom_id not in seen:
                    err.write(wire.encode(wire.error_line(self.id, line_no, custom_id, fill_code, fill_message))
                              + b"\n")
                    self._count_failed(got, fill_code)
        return got, output_key, error_key

    @staticmethod
    def _count_failed(got: Collected, code: str | None) -> None:
        got.codes[code or "unknown"] += 1


def _errors(remote: dict) -> list[dict] | None:
    errors = remote.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    if not isinstance(data, list) or not data:
        return None
    out = []
    for e in data[:100]:
        if isinstance(e, dict):
            out.append({"code": str(e.get("code") or "provider_error"), "message": str(e.get("message") or "")[:2000],
                        "param": e.get("param") if isinstance(e.get("param"), str) else None,
                        "line": e.get("line") if isinstance(e.get("line"), int) else None})
    return out or None


# ---- the step a Celery task runs --------------------------------------------------------------------------------


def step(rt: Runtime, batch_id: str, token: str | None) -> StepResult:
    """One forward step of a batch. `token` is the chain's (None: a one-off step, after a cancel); a step whose token
    is no longer the record's was superseded and does nothing."""
    record = rt.store.batch_record(batch_id)
    if record is None or record.state.terminal or not record.state.forwarded:
        return StepResult(None)
    if token is not None and record.state.forward_chain != token:
        return StepResult(None)
    lease = _step_token()
    if not rt.store.acquire_forward_lease(batch_id, lease, rt.settings.chunk_lease_s):
        return StepResult(rt.settings.forward_poll_min_s)  # another step is running: come back after it
    try:
        provider = rt.providers.get(record.state.provider or "")
        if provider is None:
            return StepResult(None, end_failed(rt, batch_id, "provider_not_configured",
                                               f"The provider '{record.state.provider}' is no longer configured."))

        async def run() -> StepResult:  # the session and limiter belong to the process's event loop
            return await Forwarder(rt, record, provider, lease).step()

        return rt.run(run())
    finally:
        rt.store.release_forward_lease(batch_id, lease)


def end_failed(rt: Runtime, batch_id: str, code: str, message: str) -> str | None:
    """End a forwarded batch `failed` with one error: `fail` while validating, else `fail_remote`."""
    record = rt.store.batch_record(batch_id)
    if record is None or record.state.terminal:
        return None
    verb = "fail" if record.state.status == VALIDATING else "fail_remote"
    errors = [{"code": code, "message": message, "param": None, "line": None}]
    return FAILED if rt.lifecycle.end(record, verb, time.time(), Ending(errors=errors)).moved else None


def hand_on(rt: Runtime, batch_id: str, token: str | None, delay: float) -> str | None:
    """Make the next step of the chain (the step `token` ran, or a new chain if None); returns its token, or None when
    another chain has taken over."""
    nxt = _step_token()
    return nxt if rt.store.hand_on_forward(batch_id, token, nxt, time.time() + delay) else None
