"""The shared scheduler with real workers, the real SDK and a real Redis: a small batch is not stuck behind a big
one (on one worker host and on two), weights set each tenant's share, a shorter window and a higher priority run
first, and a tenant's max_enqueued_requests makes batches wait in line instead of being refused."""

from __future__ import annotations

import io
import threading
import time

import openai
import pytest
from stack import API_KEY, OTHER_API_KEY, TERMINAL, UPSTREAM_SECRET, Stack, chat_lines

pytestmark = pytest.mark.e2e

# 2 processes x 8 senders at 20 ms: about 800 requests/s, chunks of 32 lines (4 waves).
FAST = {"sim_latency_ms": 20, "upstream_max_concurrency": 8, "chunk_min_requests": 16}


def providers(stack: Stack, tenants: dict[str, dict[str, object]]) -> None:
    text = (f'[providers.default]\nbase_url = "http://127.0.0.1:{stack.sim_port}/v1"\n'
            f'api_key = "{UPSTREAM_SECRET}"\nmax_concurrency = 8\n')
    for tenant, options in tenants.items():
        text += f"\n[tenants.{tenant}]\n" + "".join(f"{k} = {v}\n" for k, v in options.items())
    path = stack.root / "providers.toml"
    path.write_text(text)
    stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(path)


class Watched:
    """A batch created through the SDK and polled in the background: its progress over time and when it ended."""

    def __init__(self, client: openai.OpenAI, n: int, prefix: str, **create: object) -> None:
        self.client = client
        uploaded = client.files.create(file=(f"{prefix}.jsonl", io.BytesIO(chat_lines(n, prefix=prefix))),
                                       purpose="batch")
        self.created = time.monotonic()
        self.batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                           completion_window=create.pop("completion_window", "24h"), **create)
        self.samples: list[tuple[float, int]] = []
        self.seen: list[openai.types.Batch] = []
        self.ended: float | None = None
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while True:
            batch = self.client.batches.retrieve(self.batch.id)
            now = time.monotonic()
            self.seen.append(batch)
            self.samples.append((now, batch.request_counts.completed + batch.request_counts.failed))
            if batch.status in TERMINAL:
                self.batch, self.ended = batch, now
                return
            time.sleep(0.05)

    def wait(self, timeout: float = 120) -> openai.types.Batch:
        self.thread.join(timeout)
        assert self.ended is not None, f"{self.batch.id} did not end"
        return self.batch

    @property
    def seconds(self) -> float:
        assert self.ended is not None
        return self.ended - self.created

    def done_at(self, moment: float) -> int:
        return max([n for t, n in self.samples if t <= moment], default=0)

    def started(self) -> float:
        return next(t for t, n in self.samples if n > 0)


@pytest.mark.parametrize("hosts", [1, 2], ids=["one-host", "two-hosts"])
def test_a_small_batch_is_not_stuck_behind_a_big_one(make_stack, hosts):
    stack = make_stack(**FAST).start(workers=hosts, concurrency=2 // hosts)
    small_client = stack.client(api_key=OTHER_API_KEY)
    Watched(small_client, 16, "warm").wait()
    solos = []
    for i in range(3):
        alone = Watched(small_client, 16, f"solo{i}")
        alone.wait()
        solos.append(alone.seconds)
    solo = sorted(solos)[1]

    big = Watched(stack.client(), 4000, "big")
    while big.done_at(time.monotonic()) == 0:
        time.sleep(0.02)
    small = Watched(small_client, 16, "small")
    assert small.wait().status == "completed" and small.batch.request_counts.completed == 16
    assert small.seconds <= max(3 * solo, solo + 2), (small.seconds, solo)
    progress = big.done_at(small.ended)
    assert progress < 4000 * 0.8, f"the big batch was {progress}/4000 done: the small one waited behind it"
    assert big.wait().status == "completed" and big.batch.request_counts.completed == 4000


def test_weights_set_each_tenant_share_while_both_run(make_stack):
    stack = make_stack(**FAST)
    providers(stack, {"tenant-a": {"weight": 3}, "tenant-b": {"weight": 1}})
    stack.start(workers=1, concurrency=2)
    a = Watched(stack.client(api_key=API_KEY), 2400, "a")
    b = Watched(stack.client(api_key=OTHER_API_KEY), 2400, "b")
    assert a.wait().status == "completed" and b.wait().status == "completed"
    start, end = max(a.started(), b.started()), min(a.ended, b.ended)
    start, end = start + (end - start) * 0.1, end - (end - start) * 0.1
    done_a, done_b = a.done_at(end) - a.done_at(start), b.done_at(end) - b.done_at(start)
    share_a = done_a / (done_a + done_b)
    assert abs(share_a - 0.75) <= 0.075, (share_a, done_a, done_b)


def test_a_one_hour_window_overtakes_a_seven_day_batch(make_stack):
    stack = make_stack(**FAST).start(workers=1, concurrency=2)
    client = stack.client()
    week = Watched(client, 2000, "week", completion_window="7d")
    while week.done_at(time.monotonic()) == 0:
        time.sleep(0.02)
    hour = Watched(client, 1000, "hour", completion_window="1h")
    assert hour.batch.expires_at - hour.batch.created_at == 3600
    assert week.batch.expires_at - week.batch.created_at == 7 * 86400
    assert hour.wait().status == "completed" and week.wait().status == "completed"
    assert hour.ended < week.ended


def test_a_higher_priority_batch_runs_first_and_is_echoed(make_stack):
    stack = make_stack(**FAST).start(workers=1, concurrency=2)
    client = stack.client()
    low = Watched(client, 2000, "low")
    while low.done_at(time.monotonic()) == 0:
        time.sleep(0.02)
    high = Watched(client, 1000, "high", extra_body={"priority": 10})
    assert high.batch.model_extra["priority"] == 10 and low.batch.model_extra["priority"] == 0
    assert high.wait().status == "completed" and low.wait().status == "completed"
    assert high.ended < low.ended
    assert client.batches.retrieve(high.batch.id).model_extra["priority"] == 10


def test_windows_and_priority_are_checked(make_stack):
    stack = make_stack(**FAST, completion_windows="2h,24h").start(workers=1, concurrency=1)
    client = stack.client(max_retries=0)
    uploaded = client.files.create(file=("x.jsonl", io.BytesIO(chat_lines(2))), purpose="batch")
    for window in ("1h", "7d", "forever"):
        with pytest.raises(openai.BadRequestError) as err:
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window=window)  # type: ignore[arg-type]
        assert err.value.param == "completion_window" and "'2h', '24h'" in err.value.message
    for priority in ("high", 1.5, True, 10**9):
        with pytest.raises(openai.BadRequestError) as err:
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", extra_body={"priority": priority})
        assert err.value.param == "priority"
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="2h")
    assert batch.expires_at - batch.created_at == 7200


def test_batches_over_the_tenant_cap_wait_in_line_and_a_batch_over_it_alone_fails(make_stack):
    stack = make_stack(sim_latency_ms=20, upstream_max_concurrency=4, chunk_min_requests=16)
    providers(stack, {"tenant-a": {"max_enqueued_requests": 600}})
    stack.start(workers=1, concurrency=2)
    client = stack.client()
    first = Watched(client, 500, "first")
    while first.done_at(time.monotonic()) == 0:
        time.sleep(0.02)
    second = Watched(client, 300, "second")
    third = Watched(client, 50, "third")
    deadline = time.monotonic() + 10
    while not (second.seen and second.seen[-1].model_extra.get("queue_position") == 1
               and third.seen and third.seen[-1].model_extra.get("queue_position") == 2):
        assert time.monotonic() < deadline, (second.seen[-1:], third.seen[-1:])
        time.sleep(0.05)
    waiting = client.batches.retrieve(second.batch.id)
    assert waiting.status == "validating" and "max_enqueued_requests" in waiting.model_extra["queued_reason"]
    too_big = Watched(client, 700, "too-big")
    failed = too_big.wait()
    assert failed.status == "failed" and failed.errors.data[0].code == "token_limit_exceeded"

    # Tenant b has no cap: it runs meanwhile.
    other = Watched(stack.client(api_key=OTHER_API_KEY), 100, "other")
    assert other.wait().status == "completed"

    for watched in (first, second, third):
        assert watched.wait().status == "completed"
    assert second.batch.in_progress_at >= first.batch.completed_at
    assert first.batch.request_counts.completed == 500 and second.batch.request_counts.completed == 300
    assert client.batches.retrieve(second.batch.id).model_extra.get("queue_position") is None
