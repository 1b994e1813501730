"""Each vendor dialect, following that vendor's own documented example requests, against one deployment."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest
from stack import (
    API_KEY,
    OTHER_API_KEY,
    Stack,
    assert_exactly_once,
    chat_lines,
    wait_terminal,
)

pytestmark = pytest.mark.e2e

TERMINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def vendors(tmp_path_factory):
    root = tmp_path_factory.mktemp("dialects")
    stack = Stack(root)
    providers = root / "providers.toml"
    providers.write_text(
        f"""
default = "default"

[providers.default]
base_url = "http://127.0.0.1:{stack.sim_port}/v1"
api_key_env = "BATCHGATE_UPSTREAM_API_KEY"

[providers.openai-virtual-key]
base_url = "http://127.0.0.1:{stack.sim_port}/v1"
api_key_env = "BATCHGATE_UPSTREAM_API_KEY"
models = ["gpt-4o*"]

[tenants.tenant-b]
providers = ["default"]
"""
    )
    stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(providers)
    stack.start(workers=1, concurrency=2)
    yield stack
    stack.stop()


def poll(http: httpx.Client, url: str, headers: dict) -> dict:
    deadline = time.monotonic() + 60
    while True:
        body = http.get(url, headers=headers).json()
        if body["status"] in TERMINAL or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def root_url(stack: Stack) -> str:
    return stack.base_url.removesuffix("/v1")


def test_portkey_managed_batching(vendors):
    """Portkey: files and batches with x-portkey-api-key, a virtual key picks the provider, results at /output."""
    base = root_url(vendors)
    headers = {"x-portkey-api-key": API_KEY, "x-portkey-virtual-key": "openai-virtual-key"}
    with httpx.Client(timeout=30) as http:
        upload = http.post(f"{base}/v1/files", headers=headers, data={"purpose": "batch"},
                           files={"file": ("batch.jsonl", chat_lines(20, model="gpt-4o-mini"))})
        assert upload.status_code == 200, upload.text
        created = http.post(f"{base}/v1/batches", headers={**headers, "Content-Type": "application/json"},
                            json={"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
                                  "completion_window": "immediate"})
        assert created.status_code == 200, created.text
        assert created.json()["completion_window"] == "24h"
        batch = poll(http, f"{base}/batches/{created.json()['id']}", headers)
        assert batch["status"] == "completed"
        assert vendors.store.batch_record(batch["id"]).state.provider == "openai-virtual-key"
        output = http.get(f"{base}/v1/batches/{batch['id']}/output", headers=headers)
        assert output.status_code == 200
        assert sorted(json.loads(line)["custom_id"] for line in output.text.splitlines()) == sorted(
            f"req-{i}" for i in range(20))


PROVIDER_KEY = "sk-provider-key-for-portkey-0123456789"  # what a Portkey user's SDK sends as Authorization


def test_openai_sdk_with_portkey_headers(vendors):
    """Portkey's example: the OpenAI SDK with Portkey's headers. The SDK also sends `Authorization: Bearer <its
    api_key>` (the provider's key in Portkey's model); x-portkey-api-key is batchgate's credential."""
    client = openai.OpenAI(base_url=vendors.base_url, api_key=PROVIDER_KEY, max_retries=0,
                           default_headers={"x-portkey-api-key": API_KEY, "x-portkey-virtual-key": "openai-virtual-key"})
    uploaded = client.files.create(file=("batch.jsonl", io.BytesIO(chat_lines(8))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    final = wait_terminal(client, batch.id)
    assert final.status == "completed"
    assert_exactly_once(client, final, {f"req-{i}" for i in range(8)})
    assert vendors.store.batch_record(batch.id).state.provider == "openai-virtual-key"
    # The tenant's own objects: the same key as a plain Bearer sees the batch.
    assert vendors.client(max_retries=0).batches.retrieve(batch.id).id == batch.id

    # A wrong Portkey key is a 401 that names the header it came in, and never shows the Authorization value.
    wrong = openai.OpenAI(base_url=vendors.base_url, api_key=PROVIDER_KEY, max_retries=0,
                          default_headers={"x-portkey-api-key": "sk-not-a-batchgate-key"})
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.batches.list()
    assert "x-portkey-api-key" in err.value.message
    assert PROVIDER_KEY not in err.value.response.text and PROVIDER_KEY[-4:] not in err.value.message
    assert PROVIDER_KEY not in vendors.logs()


def test_portkey_sdk(vendors):
    """Portkey's own Python SDK pointed at batchgate: upload, create, poll to completed, read the output."""
    from portkey_ai import Portkey  # imported here: it takes seconds, and only this test needs it

    portkey = Portkey(api_key=API_KEY, virtual_key="openai-virtual-key", base_url=vendors.base_url)
    uploaded = portkey.files.create(file=("batch.jsonl", io.BytesIO(chat_lines(6, model="gpt-4o-mini"))),
                                    purpose="batch")
    batch = portkey.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while (current := portkey.batches.retrieve(batch.id)).status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.2)
    assert current.status == "completed", current
    assert current.request_counts.completed == 6
    assert vendors.store.batch_record(batch.id).state.provider == "openai-virtual-key"
    text = portkey.files.content(current.output_file_id).text  # the OpenAI SDK's binary response, as Portkey's
    assert sorted(json.loads(line)["custom_id"] for line in text.splitlines()) == sorted(f"req-{i}" for i in range(6))


def test_portkey_provider_slug_header(vendors):
    base = root_url(vendors)
    headers = {"x-portkey-api-key": API_KEY, "x-portkey-provider": "@openai-virtual-key"}
    with httpx.Client(timeout=30) as http:
        file_id = http.post(f"{base}/files", headers=headers, data={"purpose": "batch"},
                            files={"file": ("b.jsonl", chat_lines(3))}).json()["id"]
        created = http.post(f"{base}/batches", headers=headers,
                            json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                  "completion_window": "24h"}).json()
        assert poll(http, f"{base}/batches/{created['id']}", headers)["status"] == "completed"
        assert vendors.store.batch_record(created["id"]).state.provider == "openai-virtual-key"


def test_alphaedge_singular_batch_without_window(vendors):
    """AlphaEdge: POST /v1/batch with no completion_window (default 24h); X-API-Key as the credential."""
    base = root_url(vendors)
    with httpx.Client(timeout=30) as http:
        bearer = {"Authorization": f"Bearer {API_KEY}"}
        file_id = http.post(f"{base}/v1/files", headers=bearer, data={"purpose": "batch"},
                            files={"file": ("requests.jsonl", chat_lines(5))}).json()["id"]
        created = http.post(f"{base}/v1/batch", headers={**bearer, "Content-Type": "application/json"},
                            json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"})
        assert created.status_code == 200, created.text
        assert created.json()["completion_window"] == "24h"
        api_key = {"X-API-Key": API_KEY}
        listed = http.get(f"{base}/v1/batch", headers=api_key, params={"limit": 20}).json()
        assert listed["object"] == "list" and created.json()["id"] in [b["id"] for b in listed["data"]]
        assert poll(http, f"{base}/v1/batch/{created.json()['id']}", api_key)["status"] == "completed"
    # The canonical route still insists on the window, as OpenAI does.
    with pytest.raises(openai.BadRequestError):
        vendors.client(max_retries=0).post("/batches", body={"input_file_id": file_id,
                                                            "endpoint": "/v1/chat/completions"},
                                           cast_to=openai.types.Batch)


def test_mka1_llm_paths_with_end_user(vendors):
    """mka1: /api/v1/llm/files and /api/v1/llm/batches, scoped to the end user named in X-On-Behalf-Of."""
    client = openai.OpenAI(base_url=root_url(vendors) + "/api/v1/llm", api_key=API_KEY,
                           default_headers={"X-On-Behalf-Of": "external-user-42"})
    uploaded = client.files.create(file=("batch.jsonl", io.BytesIO(chat_lines(10))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    final = wait_terminal(client, batch.id)
    assert final.status == "completed"
    assert_exactly_once(client, final, {f"req-{i}" for i in range(10)})
    assert [b.id for b in client.batches.list(limit=5)] == [batch.id]
    anonymous = openai.OpenAI(base_url=root_url(vendors) + "/api/v1/llm", api_key=API_KEY)
    with pytest.raises(openai.NotFoundError):
        anonymous.batches.retrieve(batch.id)


def test_provider_not_allowed_for_tenant_is_403(vendors):
    client = vendors.client(api_key=OTHER_API_KEY, max_retries=0)
    uploaded = client.files.create(file=("b.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_headers={"x-batchgate-provider": "openai-virtual-key"})
    assert err.value.code == "provider_not_allowed"
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_headers={"x-batchgate-provider": "nope"})
    assert err.value.code == "unknown_provider"
    # Chosen by model: tenant-b's gpt-4o batch goes to the default, the one provider it may use.
    gpt = client.files.create(file=("g.jsonl", io.BytesIO(chat_lines(2, model="gpt-4o-mini"))), purpose="batch")
    batch = client.batches.create(input_file_id=gpt.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_terminal(client, batch.id).status == "completed"
    assert vendors.store.batch_record(batch.id).state.provider == "default"
