"""Cost: [prices] per model in the providers file. The price arithmetic and model matching; the terminal move
recording a batch's cost with its usage, once, per tenant and per UTC day, in Redis; and end to end with real
workers, the simulator's token counts and the real SDK: cost = tokens x price, with and without a discount, the
operator's per-tenant and per-day sums, the Prometheus counter, and no cost for a model without a price."""

from __future__ import annotations

import datetime
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from stack import ADMIN_API_KEY, METRICS_TOKEN, OTHER_API_KEY, UPSTREAM_SECRET, chat_lines, read_lines, submit, \
    wait_terminal

from api.metrics import make_registry
from shared import keys
from shared.lifecycle import BatchSpec, Ending, Lifecycle
from shared.providers import Price, Provider, ProviderRegistry
from shared.settings import Settings
from shared.store import Store

# ---- the arithmetic ------------------------------------------------------------------------------------------------


def test_cost_is_tokens_times_price_in_exact_decimals():
    price = Price(input=0.1, output=0.2, per=1)  # 0.1 + 0.2 is not 0.3 in binary floats; here it is
    assert price.cost_micros([1, 0, 1, 0, 2]) == 300_000
    assert Price(input=3, output=15).cost_micros([1_000_000, 0, 1_000_000, 0, 2_000_000]) == 18_000_000
    # per 1M tokens by default; reasoning and total tokens are not charged again
    assert Price(input=2, output=8).cost_micros([1000, 0, 500, 400, 1500]) == 1000 * 2 + 500 * 8


def test_cached_tokens_take_the_cached_price_else_the_input_price():
    usage = [1000, 300, 100, 0, 1100]
    assert Price(input=2, cached_input=1, output=8).cost_micros(usage) == 700 * 2 + 300 * 1 + 100 * 8
    assert Price(input=2, output=8).cost_micros(usage) == 1000 * 2 + 100 * 8
    assert Price(input=2, cached_input=0, output=8).cost_micros(usage) == 700 * 2 + 100 * 8
    # an upstream reporting more cached than input tokens: all of the input is cached, none negative
    assert Price(input=2, cached_input=1, output=0).cost_micros([10, 50, 0, 0, 10]) == 10


def test_a_discount_multiplies_the_whole_and_rounds_half_to_even():
    assert Price(input=2, output=8, discount=0.5).cost_micros([1000, 0, 500, 0, 1500]) == (2000 + 4000) // 2
    assert Price(input=1, output=0, discount=0.5).cost_micros([5, 0, 0, 0, 5]) == 2  # 2.5 -> 2
    assert Price(input=1, output=0, discount=0.5).cost_micros([7, 0, 0, 0, 7]) == 4  # 3.5 -> 4
    assert Price(input=1, output=0, discount=1).cost_micros([7, 0, 0, 0, 7]) == 0
    assert Price(input=1, output=0, discount=0).cost_micros([7, 0, 0, 0, 7]) == 7


def test_an_absurd_usage_saturates_instead_of_overflowing():
    assert Price(input=1000, output=1000, per=1).cost_micros([2**53 - 1, 0, 2**53 - 1, 0, 2**53 - 1]) == 2**53 - 1


def test_prices_reject_misspelt_keys_and_negative_values():
    with pytest.raises(ValidationError):
        Price(input=1, ouput=2)
    with pytest.raises(ValidationError):
        Price(input=-1)
    with pytest.raises(ValidationError):
        Price(input=1, discount=1.5)
    with pytest.raises(ValidationError):
        Price(input=1, per=0)


def test_a_model_is_priced_by_exact_name_first_then_by_pattern_in_order():
    prices = {"gpt-*": Price(input=1), "gpt-4o*": Price(input=2), "gpt-4o-mini": Price(input=3)}
    registry = ProviderRegistry([Provider(name="p", base_url="http://x")], "p", prices=prices, currency="EUR")
    assert registry.price_for("gpt-4o-mini").input == 3  # exact, though both patterns match too
    assert registry.price_for("gpt-4o").input == 1  # the first pattern in file order
    assert registry.price_for("llama") is None and registry.price_for(None) is None
    assert registry.cost("gpt-4o-mini", [10, 0, 0, 0, 10]) == (30, "EUR")
    assert registry.cost("llama", [10, 0, 0, 0, 10]) is None
    with pytest.raises(ValueError, match="currency"):
        ProviderRegistry([Provider(name="p", base_url="http://x")], "p", currency="US|D")


def test_the_loader_reads_prices_and_currency(tmp_path):
    path = tmp_path / "providers.toml"
    path.write_text('currency = "EUR"\n[providers.p]\nbase_url = "http://x"\n'
                    '[prices."m-*"]\ninput = 0.15\noutput = 0.6\nper = 1_000\ndiscount = 0.5\n')
    registry = ProviderRegistry.from_settings(Settings(providers_file=path))
    assert registry.currency == "EUR"
    assert registry.cost("m-1", [1000, 0, 1000, 0, 2000]) == (375_000, "EUR")  # (0.15 + 0.6) / 2
    path.write_text('[providers.p]\nbase_url = "http://x"\n[prices.m]\ninput = 1\n')
    assert ProviderRegistry.from_settings(Settings(providers_file=path)).currency == "USD"  # the default


# ---- the terminal move in Redis ------------------------------------------------------------------------------------


@pytest.fixture
def store(redis_client):
    return Store(redis_client)


def _batch(store: Store, redis_client, batch_id: str, tenant: str, model: str) -> None:
    store.put_batch(BatchSpec(id=batch_id, tenant=tenant, scope=tenant, endpoint="/v1/chat/completions",
                              input_file_id="file-1", completion_window="24h", created_at=1000, expires_at=10**10))
    redis_client.hset(keys.batch(batch_id), "model", model)  # as the plan records it


def _end(lifecycle: Lifecycle, store: Store, batch_id: str, now: float, usage: list[int]) -> bool:
    record = store.batch_record(batch_id)
    lifecycle.start(record, now)
    lifecycle.begin_finalize(record, now)
    return lifecycle.end(store.batch_record(batch_id), "complete", now, Ending(completed=1, usage=usage)).moved


def test_the_terminal_move_records_the_cost_once_per_tenant_and_day(store, redis_client):
    registry = ProviderRegistry([Provider(name="p", base_url="http://x")], "p",
                                prices={"m": Price(input=2, cached_input=1, output=8, discount=0.5)})
    lifecycle = Lifecycle(store, cleanup_delay_s=60, cost=registry.cost)
    day1 = datetime.datetime(2025, 3, 1, 23, 59, 59, tzinfo=datetime.UTC).timestamp()
    day2 = day1 + 2  # past midnight, UTC
    for batch_id, tenant in (("b1", "t"), ("b2", "t"), ("b3", "u"), ("free", "t")):
        _batch(store, redis_client, batch_id, tenant, "free-model" if batch_id == "free" else "m")
    assert _end(lifecycle, store, "b1", day1, [100, 40, 10, 0, 110])  # (60x2 + 40x1 + 10x8) / 2 = 120 micros
    assert _end(lifecycle, store, "b2", day2, [1000, 0, 1, 0, 1001])  # (2000 + 8) / 2 = 1004
    assert _end(lifecycle, store, "b3", day2, [3, 0, 0, 0, 3])  # 3
    assert _end(lifecycle, store, "free", day2, [5, 0, 5, 0, 10])
    # A second ending of an ended batch (a finalize run twice) moves nothing and counts nothing.
    again = Ending(completed=1, usage=[100, 40, 10, 0, 110])
    assert not lifecycle.end(store.batch_record("b1"), "complete", day2, again).moved

    b1 = store.get_batch("b1").model_dump(mode="json")
    assert b1["usage"]["cost"] == 0.00012 and b1["usage"]["currency"] == "USD"
    free = store.get_batch("free").model_dump(mode="json")
    assert free["usage"]["total_tokens"] == 10 and "cost" not in free["usage"] and "currency" not in free["usage"]

    usage = store.tenant_usage()
    assert usage["t"]["cost"] == {"USD": 0.001124}
    assert usage["t"]["cost_by_day"] == {"2025-03-01": {"USD": 0.00012}, "2025-03-02": {"USD": 0.001004}}
    assert usage["t"]["batches"] == 3 and usage["t"]["total_tokens"] == 110 + 1001 + 10
    assert usage["u"]["cost"] == {"USD": 0.000003} and usage["u"]["cost_by_day"] == {"2025-03-02": {"USD": 0.000003}}

    families = {f.name: f for f in make_registry(store).collect()}
    samples = {(s.labels["tenant"], s.labels["currency"]): s.value for s in families["batchgate_cost"].samples}
    assert samples == {("t", "USD"): 0.001124, ("u", "USD"): 0.000003}


def test_a_tenant_without_priced_batches_shows_no_cost(store, redis_client):
    lifecycle = Lifecycle(store, cleanup_delay_s=60)  # no prices at all (the API's lifecycle, say)
    _batch(store, redis_client, "b1", "t", "m")
    assert _end(lifecycle, store, "b1", 2000, [1, 0, 1, 0, 2])
    assert set(store.tenant_usage()["t"]) == {"input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens",
                                              "total_tokens", "requests_completed", "requests_failed", "batches"}
    assert "cost" not in store.get_batch("b1").model_dump(mode="json")["usage"]


# ---- end to end ----------------------------------------------------------------------------------------------------

PRICED = {"input": 2, "cached_input": 1, "output": 8}  # micro-USD per token: per = 1_000_000 (the default)
DISCOUNTED = {"input": 6, "output": 4, "discount": 0.5}
NATIVE = {"input": 4, "output": 6}


def _providers(stack) -> str:
    def table(name: str, spec: dict) -> str:
        return f'[prices."{name}"]\n' + "".join(f"{k} = {v}\n" for k, v in spec.items())
    sim = f'base_url = "http://127.0.0.1:{stack.sim_port}/v1"\napi_key = "{UPSTREAM_SECRET}"\n'
    return (f'default = "sim"\ncurrency = "USD"\n[providers.sim]\n{sim}'
            f'[providers.native]\n{sim}models = ["native-*"]\nbatch_api = "native"\n'  # the simulator's Batch API
            + table("priced-model", PRICED) + table("disc-*", DISCOUNTED) + table("native-*", NATIVE))


def _expected_micros(client, batch, spec: dict) -> int:
    """tokens x price from the output file's own lines (each answer's usage as the simulator reported it)."""
    lines = read_lines(client, batch.output_file_id)
    assert len(lines) == batch.request_counts.total and lines
    usage = [line["response"]["body"]["usage"] for line in lines]
    prompt = sum(u["prompt_tokens"] for u in usage)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    completion = sum(u["completion_tokens"] for u in usage)
    assert (prompt, cached, completion) == (batch.usage.input_tokens, batch.usage.input_tokens_details.cached_tokens,
                                            batch.usage.output_tokens)
    micros = (prompt - cached) * spec["input"] + cached * spec.get("cached_input", spec["input"]) \
        + completion * spec["output"]
    if "discount" in spec:
        assert micros % 2 == 0  # the prices are even: half of it is whole micro-units, no rounding to argue about
        micros = int(micros * (1 - spec["discount"]))
    return micros


def _metric(stack, tenant: str) -> float | None:
    resp = httpx.get(stack.base_url.removesuffix("/v1") + "/metrics",
                     headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5)
    for family in text_string_to_metric_families(resp.text):
        if family.name == "batchgate_cost":
            for sample in family.samples:
                if sample.name == "batchgate_cost_total" and sample.labels == {"tenant": tenant, "currency": "USD"}:
                    return sample.value
    return None


@pytest.mark.e2e
def test_cost_of_batches_end_to_end(make_stack):
    stack = make_stack(forward_poll_min_s=0.5, forward_poll_max_s=1)
    path = stack.root / "providers.toml"
    path.write_text(_providers(stack))
    stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(path)
    stack.start(workers=1, concurrency=2, beat=False)
    stack.sim_config(usage_cached_tokens=3)  # of each answer's prompt tokens, 3 are reported cached
    client, other = stack.client(), stack.client(api_key=OTHER_API_KEY)

    priced = wait_terminal(client, submit(client, chat_lines(6, model="priced-model")).id)
    discounted = wait_terminal(client, submit(client, chat_lines(4, model="disc-model", prefix="d")).id)
    free = wait_terminal(client, submit(client, chat_lines(3, model="free-model")).id)
    theirs = wait_terminal(other, submit(other, chat_lines(2, model="priced-model")).id)
    forwarded = wait_terminal(client, submit(client, chat_lines(3, model="native-model", prefix="n")).id)
    assert {b.status for b in (priced, discounted, free, theirs, forwarded)} == {"completed"}
    assert forwarded.provider_batch_id  # ended by workers/forward.py, not by finalize

    # cost = tokens x price, exactly, on the SDK's object (an extra field of its Usage type)
    micros = _expected_micros(client, priced, PRICED)
    assert priced.usage.input_tokens_details.cached_tokens == 6 * 3  # the cached price was exercised
    assert priced.usage.model_extra["cost"] == micros / 1_000_000 and priced.usage.model_extra["currency"] == "USD"
    disc_micros = _expected_micros(client, discounted, DISCOUNTED)
    assert discounted.usage.to_dict()["cost"] == disc_micros / 1_000_000
    theirs_micros = _expected_micros(other, theirs, PRICED)
    native_micros = _expected_micros(client, forwarded, NATIVE)
    assert forwarded.usage.model_extra["cost"] == native_micros / 1_000_000
    assert theirs.usage.model_extra["cost"] == theirs_micros / 1_000_000
    # a model without a price: usage, and no cost
    assert free.usage.total_tokens > 0 and "cost" not in free.usage.to_dict() and "currency" not in free.usage.to_dict()
    raw = httpx.get(f"{stack.base_url}/batches/{free.id}", headers={"Authorization": f"Bearer {stack.api_key}"}).json()
    assert "cost" not in raw["usage"]

    # the operator's sums: per tenant, and per UTC day of the batches' end
    admin = httpx.get(stack.base_url.removesuffix("/v1") + "/admin/usage",
                      headers={"Authorization": f"Bearer {ADMIN_API_KEY}"}, timeout=5).json()["tenants"]
    total = micros + disc_micros + native_micros
    by_day: Counter[str] = Counter()
    for batch, cost in ((priced, micros), (discounted, disc_micros), (forwarded, native_micros)):
        by_day[datetime.datetime.fromtimestamp(batch.completed_at, datetime.UTC).date().isoformat()] += cost
    assert round(admin["tenant-a"]["cost"]["USD"] * 1_000_000) == total
    assert {day: round(c["USD"] * 1_000_000) for day, c in admin["tenant-a"]["cost_by_day"].items()} == by_day
    assert round(admin["tenant-b"]["cost"]["USD"] * 1_000_000) == theirs_micros

    # Prometheus: batchgate_cost_total{tenant, currency}
    assert round(_metric(stack, "tenant-a") * 1_000_000) == total
    assert round(_metric(stack, "tenant-b") * 1_000_000) == theirs_micros
