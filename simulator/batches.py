"""The simulator's Files and Batches API: a provider with a batch API of its own, for batchgate's native forwarding.

Files are kept in memory. A created batch "runs" in the background: after `batch_validating_s` it is `in_progress`
and answers its lines itself (the same deterministic answers as the synchronous endpoints, and the same injected
`error_rate`), `batch_lines_per_s` a second; it honours cancel (the lines not yet answered end as `batch_cancelled`
error lines), and can be made to fail (`batch_fail_after`) or expire (`batch_expire_after`) part-way, as a real
provider's batch can. Its output and error files are written when it ends, as OpenAI's are.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import secrets
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator.responses import HANDLERS

if TYPE_CHECKING:
    from simulator.app import Simulator

BATCH_TERMINAL = ("completed", "failed", "expired", "cancelled")
WINDOW_S = 86400


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers={"x-request-id": f"req_{secrets.token_hex(16)}"})


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> Response:
    return _json({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}},
                 status)


def _id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def _page(items: list[dict], limit: int, after: str | None) -> dict:
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}


class BatchAPI:
    def __init__(self, sim: "Simulator") -> None:
        self.sim = sim
        self.files: dict[str, dict] = {}  # id -> File object
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}  # id -> Batch object
        self.cancel_requested: set[str] = set()
        self.tasks: set[asyncio.Task] = set()
        self.calls: collections.deque[float] = collections.deque(maxlen=2000)  # when each call came (unix time)

    # ---- files ------------------------------------------------------------------------------------------------

    def _file(self, content: bytes, filename: str, purpose: str) -> dict:
        now = int(time.time())
        file = {"id": _id("file-"), "object": "file", "bytes": len(content), "created_at": now,
                "expires_at": now + 30 * 86400, "filename": filename, "purpose": purpose, "status": "processed",
                "status_details": None}
        self.files[file["id"]] = file
        self.contents[file["id"]] = content
        return file

    async def create_file(self, request: Request) -> Response:
        async with request.form() as form:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                return _error(400, "Missing required parameter: 'file'.", "missing_required_parameter", "file")
            if not isinstance(purpose, str) or not purpose:
                return _error(400, "Missing required parameter: 'purpose'.", "missing_required_parameter", "purpose")
            content = await upload.read()
            filename = upload.filename or "upload"
        if purpose == "batch" and not filename.endswith(".jsonl"):
            return _error(400, "Invalid file format for Batch API. Must be .jsonl")
        self.sim.stats["files_uploaded"] += 1
        return _json(self._file(content, filename, purpose))

    async def list_files(self, request: Request) -> Response:
        q = request.query_params
        files = sorted(self.files.values(), key=lambda f: f["created_at"], reverse=q.get("order", "desc") == "desc")
        if q.get("purpose"):
            files = [f for f in files if f["purpose"] == q["purpose"]]
        return _json(_page(files, int(q.get("limit") or 10000), q.get("after")))

    async def retrieve_file(self, request: Request) -> Response:
        file = self.files.get(request.path_params["file_id"])
        if file is None:
            return _error(404, f"No such File object: {request.path_params['file_id']}", "file_not_found")
        return _json(file)

    async def file_content(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if file_id not in self.contents:
            return _error(404, f"No such File object: {file_id}", "file_not_found")
        self.sim.stats["file_downloads"] += 1
        return Response(self.contents[file_id], media_type="application/octet-stream")

    async def delete_file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if self.files.pop(file_id, None) is None:
            return _error(404, f"No such File object: {file_id}", "file_not_found")
        self.contents.pop(file_id, None)
        return _json({"id": file_id, "object": "file", "deleted": True})

    # ---- batches ----------------------------------------------------------------------------------------------

    async def create_batch(self, request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not body.get(name):
                return _error(400, f"Missing required parameter: '{name}'.", "missing_required_parameter", name)
        if body["completion_window"] != "24h":
            return _error(400, f"Invalid 'completion_window': {body['completion_window']!r}. Supported: '24h'.",
                          "invalid_value", "completion_window")
        if body["endpoint"] not in HANDLERS:
            return _error(400, f"Invalid 'endpoint': {body['endpoint']!r}.", "invalid_value", "endpoint")
        file = self.files.get(body["input_file_id"])
        if file is None:
            return _error(404, f"No such File object: {body['input_file_id']}", "file_not_found", "input_file_id")
        now = int(time.time())
        batch = {
            "id": _id("batch_"), "object": "batch", "endpoint": body["endpoint"], "model": None, "errors": None,
            "input_file_id": file["id"], "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + WINDOW_S, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "usage": None,
            "metadata": body.get("metadata"),
        }
        self.batches[batch["id"]] = batch
        self.sim.stats["batches_created"] += 1
        task = asyncio.create_task(self._run(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return _json(batch)

    async def list_batches(self, request: Request) -> Response:
        q = request.query_params
        batches = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
        return _json(_page(batches, min(int(q.get("limit") or 20), 100), q.get("after")))

    async def retrieve_batch(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, f"No such Batch object: {request.path_params['batch_id']}", "batch_not_found")
        self.sim.stats["batch_polls"] += 1
        return _json(batch)

    async def cancel_batch(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, f"No such Batch object: {request.path_params['batch_id']}", "batch_not_found")
        self.sim.stats["batch_cancels"] += 1
        if batch["status"] in ("completed", "failed", "expired"):
            return _error(409, f"Cannot cancel a batch with status '{batch['status']}'.")
        if batch["status"] not in ("cancelling", "cancelled", "finalizing"):
            batch["status"] = "cancelling"
            batch["cancelling_at"] = int(time.time())
            self.cancel_requested.add(batch["id"])
        return _json(batch)

    # ---- running a batch --------------------------------------------------------------------------------------

    def _answer(self, line: dict) -> tuple[dict | None, dict | None, Any]:
        """(response, error, usage body) of one input line, as the synchronous endpoint would answer it."""
        cfg, rng = self.sim.config, self.sim.rng
        request_id = f"req_{secrets.token_hex(16)}"
        body = line.get("body")
        handler = HANDLERS.get(line.get("url", ""))
        if handler is None or not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return ({"status_code": 400, "request_id": request_id, "body": {"error": {
                "message": "you must provide a model parameter", "type": "invalid_request_error",
                "param": None, "code": None}}}, None, None)
        if cfg.error_rate and rng.random() < cfg.error_rate:
            return ({"status_code": 500, "request_id": request_id, "body": {"error": {
                "message": "The server had an error while processing your request.", "type": "server_error",
                "param": None, "code": None}}}, None, None)
        answer = handler(body, hashlib.sha256(orjson.dumps(body)).digest())
        return {"status_code": 200, "request_id": request_id, "body": answer}, None, answer

    async def _run(self, batch: dict) -> None:
        cfg = self.sim.config
        raw_lines = [raw for raw in self.contents[batch["input_file_id"]].splitlines() if raw.strip()]
        try:
            lines = [orjson.loads(raw) for raw in raw_lines]
        except orjson.JSONDecodeError:
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                {"code": "invalid_json_line", "message": "This line is not parseable as valid JSON.", "param": None,
                 "line": None}]})
            return
        batch["request_counts"]["total"] = len(lines)
        models = {line.get("body", {}).get("model") for line in lines if isinstance(line.get("body"), dict)}
        batch["model"] = next(iter(models)) if len(models) == 1 else None
        await asyncio.sleep(cfg.batch_validating_s)
        if batch["id"] in self.cancel_requested:
            self._end(batch, lines, [], [], "cancelled")
            return
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        out: list[bytes] = []
        err: list[bytes] = []
        usage = [0, 0, 0, 0, 0]
        pace = 1.0 / cfg.batch_lines_per_s if cfg.batch_lines_per_s else 0.0
        started = time.monotonic()
        for n, line in enumerate(lines):
            if batch["id"] in self.cancel_requested:
                self._end(batch, lines[n:], out, err, "cancelled", usage)
                return
            if cfg.batch_fail_after is not None and n >= cfg.batch_fail_after:
                batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                    {"code": "simulated_failure", "message": f"The simulated provider failed the batch after {n} "
                     "requests.", "param": None, "line": None}]})
                return
            if cfg.batch_expire_after is not None and n >= cfg.batch_expire_after:
                self._end(batch, lines[n:], out, err, "expired", usage)
                return
            response, error, answer = self._answer(line)
            result = {"id": f"batch_req_{secrets.token_hex(16)}", "custom_id": line.get("custom_id"),
                      "response": response, "error": error}
            ok = response is not None and response["status_code"] == 200
            (out if ok else err).append(orjson.dumps(result))
            batch["request_counts"]["completed" if ok else "failed"] += 1
            _add_usage(usage, answer)
            if pace:
                ahead = started + (n + 1) * pace - time.monotonic()
                if ahead > 0.005:
                    await asyncio.sleep(ahead)
        batch.update(status="finalizing", finalizing_at=int(time.time()))
        await asyncio.sleep(0.05)
        self._end(batch, [], out, err, "completed", usage)

    def _end(self, batch: dict, unsent: list[dict], out: list[bytes], err: list[bytes], status: str,
             usage: list[int] | None = None) -> None:
        code, message = {"cancelled": ("batch_cancelled", "This request was not executed because the batch was "
                                       "cancelled."),
                         "expired": ("batch_expired", "This request could not be executed before the completion "
                                     "window expired.")}.get(status, ("", ""))
        for line in unsent:
            err.append(orjson.dumps({"id": f"batch_req_{secrets.token_hex(16)}", "custom_id": line.get("custom_id"),
                                     "response": None, "error": {"code": code, "message": message}}))
            batch["request_counts"]["failed"] += 1
        tag = batch["id"]
        if out:
            batch["output_file_id"] = self._file(b"\n".join(out) + b"\n", f"{tag}_output.jsonl", "batch_output")["id"]
        if err:
            batch["error_file_id"] = self._file(b"\n".join(err) + b"\n", f"{tag}_error.jsonl", "batch_output")["id"]
        if usage is not None and any(usage):
            batch["usage"] = {"input_tokens": usage[0], "input_tokens_details": {"cached_tokens": usage[1]},
                              "output_tokens": usage[2], "output_tokens_details": {"reasoning_tokens": usage[3]},
                              "total_tokens": usage[4]}
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())

    def _guarded(self, path: str, handler):
        """The handler behind the simulator's API key check, counted under its route's path."""

        async def endpoint(request: Request) -> Response:
            key = self.sim.config.api_key
            if key and request.headers.get("authorization", "") != f"Bearer {key}":
                self.sim.stats["unauthorized"] += 1
                response = _error(401, "Incorrect API key provided.", "invalid_api_key")
            else:
                response = await handler(request)
            self.sim.stats["batch_api_requests"] += 1
            self.calls.append(time.time())
            self.sim.by_path[f"{request.method} {path}"] += 1
            return response

        return endpoint

    async def call_times(self, request: Request) -> Response:
        return _json({"calls": list(self.calls)})

    def routes(self) -> list[Route]:
        table = [
            ("/v1/files", self.create_file, "POST"),
            ("/v1/files", self.list_files, "GET"),
            ("/v1/files/{file_id}", self.retrieve_file, "GET"),
            ("/v1/files/{file_id}", self.delete_file, "DELETE"),
            ("/v1/files/{file_id}/content", self.file_content, "GET"),
            ("/v1/batches", self.create_batch, "POST"),
            ("/v1/batches", self.list_batches, "GET"),
            ("/v1/batches/{batch_id}", self.retrieve_batch, "GET"),
            ("/v1/batches/{batch_id}/cancel", self.cancel_batch, "POST"),
        ]
        return [Route(path, self._guarded(path, handler), methods=[method]) for path, handler, method in table] + [
            Route("/_sim/batch_api_calls", self.call_times, methods=["GET"])]


def _add_usage(usage: list[int], answer: Any) -> None:
    u = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(u, dict):
        return
    input_tokens = u.get("input_tokens") or u.get("prompt_tokens") or 0
    output_tokens = u.get("output_tokens") or u.get("completion_tokens") or 0
    details_in = u.get("input_tokens_details") or u.get("prompt_tokens_details") or {}
    details_out = u.get("output_tokens_details") or u.get("completion_tokens_details") or {}
    usage[0] += input_tokens
    usage[1] += details_in.get("cached_tokens") or 0
    usage[2] += output_tokens
    usage[3] += details_out.get("reasoning_tokens") or 0
    usage[4] += u.get("total_tokens") or input_tokens + output_tokens
