"""Which provider a request goes to: weights among providers of the same model, fallbacks, circuit breakers.

- **Weights.** A batch not pinned to a provider (by `x-batchgate-provider` or a Portkey virtual key) shares its
  requests among every provider whose `models` serve its model and that its tenant may use, by `weight`: smooth
  weighted round robin, per worker process (so over any few requests the shares are as close to the weights as
  whole requests allow, and every process keeps them, so their sum does too). A pinned batch goes to its provider.
- **Fallbacks.** A request that ends at a provider, after that provider's retries, with a 408, a 429, a 5xx or a
  transport failure (connect error, timeout, reset: `falls_back`) is sent to the next provider of that provider's
  `fallbacks` the tenant may use, whatever that provider's `models` say, and only after the last becomes an error
  line. A 4xx answer (a request the upstream refused as invalid) and a cancelled or expired batch never fall back.
- **Circuit breakers.** A provider whose every attempt failed for `circuit_open_after_s` (and at least
  `MIN_FAILURES` attempts) is opened: its requests go at once to the next provider in the chain, and its requests
  still retrying stop retrying and go there too. After `circuit_retry_after_s` one request is let through as a
  probe; an answer closes the circuit, a failure opens it again. The state is per worker process: each process finds
  out for itself (within the same time), and nothing is shared through Redis. The last provider of a chain is
  always tried, open or not: a request never ends as an error line without being sent somewhere.

The functions and `Circuit` are pure (a clock is passed in); `Router` puts them on the chunk's send path: each
provider keeps its own process-wide slots (`rt.slots`), rate limiter, session and caller.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

from shared.metrics import MetricsBuffer
from shared.providers import Provider, ProviderRegistry
from workers.upstream import NOT_RETRIED, Outcome, UpstreamCaller

log = logging.getLogger("batchgate.routing")

MIN_FAILURES = 3  # attempts that must fail, besides the time, before a circuit opens


def falls_back(outcome: Outcome) -> bool:
    """Whether another provider may do better: the upstream was unreachable, overloaded or broken, not the request."""
    if outcome.status_code is None:
        return outcome.error_code not in NOT_RETRIED
    return outcome.status_code in (408, 429) or outcome.status_code >= 500


def weighted_group(registry: ProviderRegistry, tenant: str, model: str | None, chosen: Provider,
                   pinned: bool) -> list[Provider]:
    """The providers that share a batch's requests by weight: every allowed provider serving its model."""
    if pinned or not model or not chosen.serves(model):
        return [chosen]
    group = [p for p in registry.providers.values() if p.serves(model) and registry.allowed(tenant, p.name)]
    return group if chosen in group else [chosen, *group]


def fallback_chain(registry: ProviderRegistry, tenant: str, first: Provider) -> list[Provider]:
    """`first`, then its `fallbacks` in order, skipping those the tenant may not use (and repeats)."""
    chain = [first]
    for name in first.fallbacks:
        provider = registry.get(name)
        if provider is not None and provider not in chain and registry.allowed(tenant, name):
            chain.append(provider)
    return chain


class SmoothWeighted:
    """Smooth weighted round robin (nginx's): each pick goes to the largest running credit, which pays the total."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = dict(weights)
        self.total = sum(self.weights.values())
        self.credit = dict.fromkeys(self.weights, 0.0)

    def pick(self) -> str:
        best = None
        for name, weight in self.weights.items():
            self.credit[name] += weight
            if best is None or self.credit[name] > self.credit[best]:
                best = name
        self.credit[best] -= self.total
        return best


class Circuit:
    """One provider's breaker in one process: closed, open (requests go elsewhere), half-open (one probe)."""

    def __init__(self, name: str, open_after_s: float, retry_after_s: float) -> None:
        self.name = name
        self.open_after_s = open_after_s
        self.retry_after_s = retry_after_s
        self.failing_since: float | None = None  # the first failure since the last answer
        self.failures = 0
        self.open_until = 0.0  # 0: closed; else open until then, half-open after
        self.probe_at: float | None = None
        self.opened = 0  # times it opened (for tests and logs)

    @property
    def is_open(self) -> bool:
        return self.open_until > 0

    def allow(self, now: float) -> bool:
        """May a request be sent now? Closed: yes; open: no; half-open: one probe at a time."""
        if not self.open_until:
            return True
        if now < self.open_until:
            return False
        if self.probe_at is not None and now - self.probe_at < self.retry_after_s:
            return False
        self.probe_at = now
        return True

    def record(self, failed: bool, now: float) -> bool:
        """Count one attempt's outcome; True when this one opened the circuit."""
        if not failed:
            if self.open_until:
                log.warning("provider %r answers again: its circuit is closed", self.name)
            self.failing_since, self.failures, self.open_until, self.probe_at = None, 0, 0.0, None
            return False
        if self.failing_since is None:
            self.failing_since = now
        self.failures += 1
        if not self.open_until:
            if now - self.failing_since >= self.open_after_s and self.failures >= MIN_FAILURES:
                self.open_until = now + self.retry_after_s
                self.opened += 1
                log.warning("provider %r failed every request for %.1f s (%d attempts): circuit open, its requests "
                            "go to its fallbacks; probing again in %g s", self.name, now - self.failing_since,
                            self.failures, self.retry_after_s)
                return True
        elif now >= self.open_until:  # a failure while half-open: open again
            self.open_until, self.probe_at = now + self.retry_after_s, None
        return False


_pid = os.getpid()
_circuits: dict[str, Circuit] = {}
_pickers: dict[tuple[tuple[str, float], ...], SmoothWeighted] = {}


def _process_state() -> None:
    global _pid
    if _pid != os.getpid():  # a forked child starts afresh
        _pid = os.getpid()
        _circuits.clear()
        _pickers.clear()


def circuit_for(provider: Provider) -> Circuit:
    _process_state()
    circuit = _circuits.get(provider.name)
    if circuit is None:
        circuit = _circuits[provider.name] = Circuit(provider.name, provider.circuit_open_after_s,
                                                     provider.circuit_retry_after_s)
    return circuit


def picker_for(group: list[Provider]) -> SmoothWeighted:
    _process_state()
    key = tuple((p.name, p.weight) for p in group)
    picker = _pickers.get(key)
    if picker is None:
        picker = _pickers[key] = SmoothWeighted(dict(key))
    return picker


def reset() -> None:
    _circuits.clear()
    _pickers.clear()


@dataclass
class Leg:
    """One provider as a chunk run sends to it."""

    provider: Provider
    caller: UpstreamCaller
    url: str
    slots: object  # asyncio.Semaphore: the process's slots for the provider
    circuit: Circuit


class Router:
    """Sends a chunk's requests: picks a provider by weight, falls back along its chain, keeps the circuits."""

    def __init__(self, registry: ProviderRegistry, tenant: str, endpoint: str, model: str | None,
                 chosen: Provider, pinned: bool, make_caller: Callable[[Provider, MetricsBuffer], UpstreamCaller],
                 slots_for: Callable[[Provider], object], clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.tenant = tenant
        self.endpoint = endpoint
        self.model = model
        self.metrics = MetricsBuffer()
        self._make_caller = make_caller
        self._slots_for = slots_for
        self.clock = clock
        self.group = weighted_group(registry, tenant, model, chosen, pinned)
        self.picker = picker_for(self.group) if len(self.group) > 1 else None
        self.legs: dict[str, Leg] = {}
        self.chains: dict[str, list[Leg]] = {}
        self.concurrency = sum(p.max_concurrency for p in self.group)

    def leg(self, provider: Provider) -> Leg:
        leg = self.legs.get(provider.name)
        if leg is None:
            circuit = circuit_for(provider)
            caller = self._make_caller(provider, self.metrics)

            def observe(outcome: Outcome, circuit: Circuit = circuit, name: str = provider.name) -> None:
                if circuit.record(falls_back(outcome), self.clock()):
                    self.metrics.inc("upstream_circuit_opened", name)

            caller.on_outcome = observe
            leg = self.legs[provider.name] = Leg(provider, caller, provider.url_for(self.endpoint, self.model),
                                                 self._slots_for(provider), circuit)
        return leg

    def chain(self, first: Provider) -> list[Leg]:
        chain = self.chains.get(first.name)
        if chain is None:
            chain = self.chains[first.name] = [self.leg(p) for p in fallback_chain(self.registry, self.tenant, first)]
        return chain

    def callers(self) -> list[UpstreamCaller]:
        return [leg.caller for leg in self.legs.values()]

    def first(self) -> Provider:
        if self.picker is None:
            return self.group[0]
        return self.registry.providers[self.picker.pick()]

    async def send(self, body: bytes, should_stop: Callable[[], bool]) -> tuple[Outcome, str]:
        """The request's outcome and the name of the provider that gave it."""
        chain = self.chain(self.first())
        last = len(chain) - 1
        for i, leg in enumerate(chain):
            if i < last and not leg.circuit.allow(self.clock()):
                self.metrics.inc("upstream_fallback", leg.provider.name)
                continue
            if i < last:
                circuit = leg.circuit

                def stop(circuit=circuit) -> bool:  # the circuit opened while this request was retrying
                    return should_stop() or (circuit.is_open and circuit.probe_at is None)
            else:
                stop = should_stop
            async with leg.slots:
                outcome = await leg.caller.send(leg.url, body, should_stop=stop)
            if i == last or should_stop() or not falls_back(outcome):
                return outcome, leg.provider.name
            self.metrics.inc("upstream_fallback", leg.provider.name)
        raise AssertionError("the last leg always answers")
