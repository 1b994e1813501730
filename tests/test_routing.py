"""Routing's pure parts: which outcomes fall back, who shares by weight, the fallback chain a tenant may use, smooth
weighted round robin, and the circuit breaker's states on a clock the test moves."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from shared.providers import Provider, ProviderRegistry, TenantConfig
from workers.routing import MIN_FAILURES, Circuit, SmoothWeighted, fallback_chain, falls_back, weighted_group
from workers.upstream import Outcome


def registry(**tenants: list[str]) -> ProviderRegistry:
    providers = [
        Provider(name="a", base_url="http://a", models=["m-*"], weight=3, fallbacks=["c", "b", "d"]),
        Provider(name="b", base_url="http://b", models=["m-*"], weight=1),
        Provider(name="c", base_url="http://c", models=["other"]),
        Provider(name="d", base_url="http://d"),
    ]
    return ProviderRegistry(providers, "d", {t: TenantConfig(providers=p) for t, p in tenants.items()})


@pytest.mark.parametrize("outcome, expected", [
    (Outcome(503), True), (Outcome(500), True), (Outcome(501), True), (Outcome(429), True), (Outcome(408), True),
    (Outcome(None, error_code="upstream_connect_refused"), True), (Outcome(None, error_code="request_timeout"), True),
    (Outcome(None, error_code="upstream_connection_reset"), True),
    (Outcome(None, error_code="upstream_dns_error"), True),
    (Outcome(200), False), (Outcome(400), False), (Outcome(401), False), (Outcome(404), False), (Outcome(409), False),
    (Outcome(422), False), (Outcome(None, error_code="invalid_request_body"), False),
    (Outcome(None, error_code="response_too_large"), False),
    (Outcome(None, error_code="invalid_upstream_response"), False),
])
def test_what_falls_back(outcome, expected):
    assert falls_back(outcome) is expected


def test_weighted_group_is_every_allowed_provider_of_the_model_unless_pinned():
    reg = registry(limited=["a", "d"])
    a, b, d = reg.get("a"), reg.get("b"), reg.get("d")
    assert weighted_group(reg, "anyone", "m-1", a, pinned=False) == [a, b]
    assert weighted_group(reg, "anyone", "m-1", b, pinned=True) == [b]
    assert weighted_group(reg, "limited", "m-1", a, pinned=False) == [a]
    assert weighted_group(reg, "anyone", "unmatched", d, pinned=False) == [d]  # the default, no share
    assert weighted_group(reg, "anyone", None, a, pinned=False) == [a]


def test_fallback_chain_keeps_order_and_skips_what_the_tenant_may_not_use():
    reg = registry(limited=["a", "b"])
    names = lambda chain: [p.name for p in chain]  # noqa: E731
    assert names(fallback_chain(reg, "anyone", reg.get("a"))) == ["a", "c", "b", "d"]  # c serves another model
    assert names(fallback_chain(reg, "limited", reg.get("a"))) == ["a", "b"]
    assert names(fallback_chain(reg, "anyone", reg.get("b"))) == ["b"]


def test_fallbacks_must_name_known_providers():
    with pytest.raises(ValueError, match="nope"):
        ProviderRegistry([Provider(name="a", base_url="http://a", fallbacks=["nope"])], "a")
    with pytest.raises(ValueError, match="itself"):
        ProviderRegistry([Provider(name="a", base_url="http://a", fallbacks=["a"])], "a")


def test_smooth_weighted_round_robin_shares_exactly_and_interleaves():
    picker = SmoothWeighted({"a": 3, "b": 1})
    picks = [picker.pick() for _ in range(400)]
    assert Counter(picks) == {"a": 300, "b": 100}
    assert all(picks[i:i + 4].count("b") == 1 for i in range(0, 400, 4))  # smooth: a b every 4, never a run of b
    three = SmoothWeighted({"x": 1, "y": 1, "z": 2})
    assert Counter(three.pick() for _ in range(40)) == {"x": 10, "y": 10, "z": 20}


def test_circuit_opens_after_failing_for_its_time_probes_and_closes():
    circuit = Circuit("p", open_after_s=10, retry_after_s=5)
    assert circuit.allow(0)
    # Failures for less than open_after_s: closed. An answer in between starts the count again.
    for t in (0, 4, 8):
        assert not circuit.record(True, t)
    circuit.record(False, 9)
    for t in (9.5, 12, 18):
        assert not circuit.record(True, t)
    assert circuit.allow(18) and not circuit.is_open
    assert circuit.record(True, 19.5)  # 10 s since 9.5, every attempt failed
    assert circuit.is_open and circuit.opened == 1
    assert not circuit.allow(20) and not circuit.allow(24.4)
    circuit.record(True, 22)  # a straggler's failure does not push the reopening back
    assert circuit.open_until == 24.5
    # Half-open: one probe; the others keep going elsewhere until it answers.
    assert circuit.allow(25) and not circuit.allow(25.1)
    circuit.record(True, 26)  # the probe failed: open again for retry_after_s
    assert not circuit.allow(26.5) and not circuit.allow(30.9)
    assert circuit.allow(31) and not circuit.allow(31.5)
    circuit.record(False, 32)  # the probe answered: closed
    assert not circuit.is_open and circuit.allow(32) and circuit.allow(32)
    assert circuit.opened == 1


def test_circuit_needs_several_failures_not_just_time():
    circuit = Circuit("p", open_after_s=1, retry_after_s=5)
    for i in range(MIN_FAILURES - 1):
        assert not circuit.record(True, 100.0 * i)
    assert circuit.record(True, 1000)


def test_a_lost_probe_is_replaced_after_retry_after_s():
    circuit = Circuit("p", open_after_s=1, retry_after_s=5)
    for t in range(MIN_FAILURES + 1):
        circuit.record(True, t)
    assert circuit.is_open
    start = circuit.open_until
    assert circuit.allow(start)  # a probe whose outcome never comes (its batch was cancelled)
    assert not circuit.allow(start + 4.9)
    assert circuit.allow(start + 5)


class FakeCaller:
    """Answers each provider's requests from a script, telling the router's circuit as the real caller does."""

    def __init__(self, provider: Provider, answers: dict[str, Outcome], log: list) -> None:
        self.provider, self.answers, self.log = provider, answers, log
        self.on_outcome = None
        self.limiter = None

    async def send(self, url: str, body: bytes, should_stop=None) -> Outcome:
        self.log.append((self.provider.name, url))
        outcome = self.answers[self.provider.name]
        self.on_outcome(outcome)
        return outcome


class Slots:
    """A semaphore stand-in that records which provider's slots were held around each send."""

    def __init__(self, name: str, held: list) -> None:
        self.name, self.held = name, held

    async def __aenter__(self):
        self.held.append(self.name)

    async def __aexit__(self, *exc):
        return False


def router(answers: dict[str, Outcome], *, tenant: str = "anyone", pinned: str | None = None):
    from workers import routing

    routing.reset()
    reg = ProviderRegistry([
        Provider(name="primary", base_url="http://p/v1", models=["gpt-4o-mini"], fallbacks=["azure", "last"],
                 circuit_open_after_s=1),
        Provider(name="azure", kind="azure", base_url="https://res.openai.azure.com", api_version="2024-10-21",
                 deployments={"gpt-4o-mini": "dep"}),
        Provider(name="last", base_url="http://l/v1"),
    ], "primary", {"no-azure": TenantConfig(providers=["primary", "last"])})
    sent, held = [], []
    clock = [0.0]
    chosen = reg.get(pinned or "primary")
    r = routing.Router(reg, tenant, "/v1/chat/completions", "gpt-4o-mini", chosen, pinned is not None,
                       lambda p, metrics: FakeCaller(p, answers, sent), lambda p: Slots(p.name, held),
                       clock=lambda: clock[0])
    return r, sent, held, clock


def run(coro):
    return asyncio.run(coro)


def test_router_falls_back_along_the_chain_with_each_providers_url_and_slots():
    r, sent, held, _ = router({"primary": Outcome(503), "azure": Outcome(None, error_code="request_timeout"),
                               "last": Outcome(200, body={})})
    outcome, via = run(r.send(b"{}", lambda: False))
    assert (outcome.status_code, via) == (200, "last")
    assert [name for name, _ in sent] == ["primary", "azure", "last"] == held
    assert sent[1][1] == "https://res.openai.azure.com/openai/deployments/dep/chat/completions?api-version=2024-10-21"
    assert r.metrics.counts == {"upstream_fallback|primary": 1, "upstream_fallback|azure": 1}


def test_router_stops_at_an_answer_a_4xx_or_a_stopped_batch():
    r, sent, _, _ = router({"primary": Outcome(400), "azure": Outcome(200), "last": Outcome(200)})
    assert run(r.send(b"{}", lambda: False))[1] == "primary" and len(sent) == 1
    r, sent, _, _ = router({"primary": Outcome(503), "azure": Outcome(200), "last": Outcome(200)})
    outcome, via = run(r.send(b"{}", lambda: True))  # cancelled while it was being sent: no fallback
    assert (outcome.status_code, via) == (503, "primary") and len(sent) == 1


def test_router_skips_what_the_tenant_may_not_use_and_the_last_is_always_tried():
    r, sent, _, _ = router({"primary": Outcome(503), "azure": Outcome(200), "last": Outcome(502)},
                           tenant="no-azure")
    outcome, via = run(r.send(b"{}", lambda: False))
    assert (outcome.status_code, via) == (502, "last") and [n for n, _ in sent] == ["primary", "last"]


def test_router_goes_around_an_open_circuit():
    r, sent, _, clock = router({"primary": Outcome(None, error_code="upstream_connect_refused"),
                                "azure": Outcome(200), "last": Outcome(200)})
    for t in (0, 0.5, 1.0):
        clock[0] = t
        assert run(r.send(b"{}", lambda: False))[1] == "azure"
    assert r.legs["primary"].circuit.is_open and r.metrics.counts["upstream_circuit_opened|primary"] == 1
    sent.clear()
    clock[0] = 2.0
    assert run(r.send(b"{}", lambda: False))[1] == "azure" and [n for n, _ in sent] == ["azure"]
    clock[0] = 31.0  # circuit_retry_after_s (30) later: one probe, which fails and is passed on
    assert run(r.send(b"{}", lambda: False))[1] == "azure" and [n for n, _ in sent[1:]] == ["primary", "azure"]


def test_a_pinned_batch_takes_no_share():
    r, sent, _, _ = router({"primary": Outcome(200), "azure": Outcome(200), "last": Outcome(200)}, pinned="last")
    assert {run(r.send(b"{}", lambda: False))[1] for _ in range(8)} == {"last"}
    assert r.group == [r.registry.get("last")] and r.picker is None
