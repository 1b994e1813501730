"""Saying once, loudly, that a provider cannot be reached at all.

When every request to an upstream fails to connect (nothing listens on the port, the host name does not resolve,
TLS cannot be set up) each line of the batch ends in the error file, and nobody hears about it until the batch
ends. This counts, per provider and per worker process, the attempts that could not connect since the provider
last answered; at `THRESHOLD` of them with no answer in between it logs one WARNING naming the provider and its
host:port. It warns again only after the provider answered in between (and then failed again).

`observe` is called with every attempt's outcome (workers/upstream.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger("batchgate.upstream")

# workers/upstream.py's codes of an attempt that never reached the upstream's HTTP server.
UNREACHABLE = frozenset({"upstream_connect_refused", "upstream_dns_error", "upstream_tls_error",
                         "upstream_connection_error"})
THRESHOLD = 3


@dataclass
class Reach:
    failures: int = 0  # attempts that could not connect since the last answer
    answers: int = 0  # answers (any HTTP status) ever
    warned: bool = False


_providers: dict[str, Reach] = {}


def host_port(base_url: str) -> str:
    """`host:port` of a URL, never its user info or path."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def observe(provider, outcome) -> None:
    """Count one attempt of `provider` (a shared.providers.Provider) that ended in `outcome` (an upstream Outcome)."""
    reach = _providers.setdefault(provider.name, Reach())
    if outcome.status_code is not None:
        reach.failures, reach.warned = 0, False
        reach.answers += 1
        return
    if outcome.error_code not in UNREACHABLE:
        return  # a timeout or a dropped connection: something is there
    reach.failures += 1
    if reach.failures >= THRESHOLD and not reach.warned:
        reach.warned = True
        again = "no longer answers" if reach.answers else "cannot be reached"
        log.warning("upstream %r at %s %s: the last %d attempts could not connect (%s: %s) - check its base_url "
                    "(BATCHGATE_UPSTREAM_BASE_URL, or the providers file) and that it is running",
                    provider.name, host_port(provider.base_url), again, reach.failures, outcome.error_code,
                    outcome.error_message)


def reset() -> None:
    _providers.clear()
