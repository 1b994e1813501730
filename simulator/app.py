"""The simulator's HTTP app: OpenAI-compatible endpoints with injectable latency and faults."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
import secrets
import time
from collections import Counter

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator.batches import BatchAPI
from simulator.config import SimulatorConfig
from simulator.responses import HANDLERS


def _json(body: object, status: int = 200, headers: dict | None = None) -> Response:
    base = {"x-request-id": f"req_{secrets.token_hex(16)}"}
    base.update(headers or {})
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=base)


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
           headers: dict | None = None) -> Response:
    return _json({"error": {"message": message, "type": type_, "param": None, "code": code}}, status, headers)


class Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats: Counter = Counter()
        self.by_status: Counter = Counter()
        self.by_path: Counter = Counter()
        self.window: collections.deque[float] = collections.deque()

    def _count(self, path: str, status: int) -> None:
        self.stats["requests"] += 1
        self.by_status[str(status)] += 1
        self.by_path[path] += 1

    def _over_rate(self) -> bool:
        if not self.config.max_rpm:
            return False
        now = time.monotonic()
        while self.window and now - self.window[0] > 60:
            self.window.popleft()
        self.window.append(now)
        return len(self.window) > self.config.max_rpm

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        response = await self._respond(request, path)
        self._count(path, response.status_code)
        return response

    async def _respond(self, request: Request, path: str) -> Response:
        cfg = self.config
        presented = request.headers.get("authorization", "")
        if cfg.api_key and presented != f"Bearer {cfg.api_key}":
            self.stats["unauthorized"] += 1
            # Echoes what it was sent, as careless upstreams do, so tests can prove batchgate scrubs it.
            return _error(401, f"Incorrect API key provided: {presented.removeprefix('Bearer ')}.",
                          code="invalid_api_key")
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "you must provide a model parameter")
        delay = cfg.latency_ms + (self.rng.uniform(0, cfg.jitter_ms) if cfg.jitter_ms else 0)
        if delay:
            await asyncio.sleep(delay / 1000)
        if self._over_rate() or (cfg.rate_429 and self.rng.random() < cfg.rate_429):
            return _error(429, "Rate limit reached for requests.", type_="requests", code="rate_limit_exceeded",
                          headers={"retry-after": f"{cfg.retry_after_s:g}"})
        for marker, status in cfg.fail_when_contains.items():
            if marker.encode() in raw:
                return _error(status, f"Simulated failure for a request containing {marker!r}.", type_="server_error")
        if cfg.error_rate and self.rng.random() < cfg.error_rate:
            return _error(500, "The server had an error while processing your request.", type_="server_error")
        digest = hashlib.sha256(raw).digest()
        answer = HANDLERS[path](body, digest)
        if cfg.usage_total_tokens is not None and isinstance(answer.get("usage"), dict):
            answer["usage"] = {**answer["usage"], "total_tokens": cfg.usage_total_tokens,
                               "prompt_tokens": cfg.usage_total_tokens}
        if cfg.usage_cached_tokens is not None and isinstance(answer.get("usage"), dict):
            usage = answer["usage"]
            chat_style = "prompt_tokens" in usage
            prompt = usage.get("prompt_tokens" if chat_style else "input_tokens") or 0
            details = "prompt_tokens_details" if chat_style else "input_tokens_details"
            answer["usage"] = {**usage, details: {**(usage.get(details) or {}),
                                                  "cached_tokens": min(cfg.usage_cached_tokens, prompt)}}
        return _json(answer)

    async def get_config(self, request: Request) -> Response:
        return _json(self.config.model_dump())

    async def set_config(self, request: Request) -> Response:
        try:
            changes = orjson.loads(await request.body())
            updated = SimulatorConfig.model_validate({**self.config.model_dump(), **changes})
        except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
            return _error(400, f"Invalid simulator config: {exc}")
        if updated.seed != self.config.seed:
            self.rng = random.Random(updated.seed)
        self.config = updated
        return _json(updated.model_dump())

    async def get_stats(self, request: Request) -> Response:
        batch_api = {name: self.stats[name] for name in
                     ("batch_api_requests", "files_uploaded", "file_downloads", "batches_created", "batch_polls",
                      "batch_cancels")}
        return _json({"requests": self.stats["requests"], "by_status": dict(self.by_status),
                      "by_path": dict(self.by_path), "unauthorized": self.stats["unauthorized"], **batch_api})

    async def reset(self, request: Request) -> Response:
        self.stats.clear()
        self.by_status.clear()
        self.by_path.clear()
        self.window.clear()
        return _json({"status": "reset"})


async def _health(request: Request) -> Response:
    return _json({"status": "ok"})


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")


def create_app(config: SimulatorConfig | None = None) -> Starlette:
    sim = Simulator(config or SimulatorConfig())
    sim.batch_api = BatchAPI(sim)
    routes = [Route(path, sim.handle, methods=["POST"]) for path in HANDLERS]
    routes += sim.batch_api.routes()
    routes += [
        Route("/_sim/config", sim.get_config, methods=["GET"]),
        Route("/_sim/config", sim.set_config, methods=["POST"]),
        Route("/_sim/stats", sim.get_stats, methods=["GET"]),
        Route("/_sim/reset", sim.reset, methods=["POST"]),
        Route("/health", _health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})
    app.state.simulator = sim
    return app
