"""uvicorn's HTTP protocol with a deadline for a request's headers: `uvicorn --http api.protocol:HTTPProtocol`.

uvicorn has no setting for this: `--timeout-keep-alive` is armed only after a response and cancelled by the first
byte of the next request, and `--h11-max-incomplete-event-size` bounds the bytes of the headers, not the time they
take. So a connection that sends nothing, or stops inside its headers, would be held forever. Here a connection
must complete each request's headers within BATCHGATE_HEADER_TIMEOUT_S of opening or of its previous response, or
it is closed. Once the headers are in, the request body has its own limits (api/limits.py).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from shared.settings import get_settings


class HeaderDeadline:
    """Mixin for uvicorn's protocol classes. It relies on `cycle`, the request being served, which both set when a
    request's headers are complete (and which uvicorn's own shutdown reads)."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: object | None
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = None
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(get_settings().header_timeout_s, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        serving = self.cycle is not None and not self.cycle.response_complete  # type: ignore[attr-defined]
        if not serving and not self.transport.is_closing():
            self.transport.close()  # nothing, or only part of the next request's headers, arrived in time


class H11WithHeaderDeadline(HeaderDeadline, H11Protocol):
    pass


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn without httptools: h11, as uvicorn's own "auto" would pick
    HTTPProtocol: type[asyncio.Protocol] = H11WithHeaderDeadline
else:

    class HttpToolsWithHeaderDeadline(HeaderDeadline, HttpToolsProtocol):
        pass

    HTTPProtocol = HttpToolsWithHeaderDeadline
