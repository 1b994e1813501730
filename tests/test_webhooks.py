"""Webhooks to a local receiver: signed per Standard Webhooks, retried through an outage, one delivery per event."""

from __future__ import annotations

import time

import orjson
import pytest
from stack import Stack, chat_lines, submit, wait_terminal
from webhook_receiver import Receiver, providers_toml

from cli.stack import free_port

pytestmark = pytest.mark.e2e


def test_one_signed_delivery_per_event_after_an_outage(tmp_path):
    port = free_port()
    stack = Stack(tmp_path / "stack", webhook_allowed_hosts="127.0.0.1", webhook_retry_base_s=0.5)
    providers = tmp_path / "providers.toml"
    providers.write_text(providers_toml(stack.sim_port, port))
    stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(providers)
    receiver = Receiver(port)
    try:
        stack.start(workers=1, concurrency=2)
        client = stack.client()
        completed = wait_terminal(client, submit(client, chat_lines(20)).id)
        failed = wait_terminal(client, submit(client, b"not json\n").id)
        cancelled = submit(client, chat_lines(5))
        client.batches.cancel(cancelled.id)
        cancelled = wait_terminal(client, cancelled.id)
        assert (completed.status, failed.status, cancelled.status) == ("completed", "failed", "cancelled")
        time.sleep(2)  # the receiver is down: deliveries fail and back off
        assert receiver.deliveries == []
        receiver.start()
        deadline = time.monotonic() + 30
        while len(receiver.deliveries) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # room for any duplicate to show up
        other = stack.client(api_key="sk-test-tenant-b")
        wait_terminal(other, submit(other, chat_lines(2)).id)  # tenant-b has no webhook configured
        time.sleep(1)
    finally:
        receiver.stop()
        stack.stop()

    events = [d["event"] for d in receiver.deliveries]
    by_batch = {e["data"]["id"]: e["type"] for e in events}
    assert by_batch == {completed.id: "batch.completed", failed.id: "batch.failed", cancelled.id: "batch.cancelled"}
    assert len(events) == 3, "exactly one delivery per event"
    for delivery in receiver.deliveries:
        event, headers = delivery["event"], delivery["headers"]
        assert event["object"] == "event" and event["id"] == headers["webhook-id"]
        assert headers["webhook-signature"].startswith("v1,")
        assert isinstance(event["created_at"], int)
    assert orjson.dumps(events)  # plain JSON all through
