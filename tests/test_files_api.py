"""The Files API and batch bookkeeping routes, driven by the official openai SDK against a real server."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
from stack import API_KEY, OTHER_API_KEY, chat_lines

pytestmark = pytest.mark.e2e


def test_upload_retrieve_content_round_trip_byte_exact(stack):
    client = stack.client()
    content = chat_lines(3) + "{\"unicode\": \"héllo ✓ 🚀\"}\r\n".encode()
    uploaded = client.files.create(file=("my input.jsonl", io.BytesIO(content)), purpose="batch")
    assert uploaded.object == "file" and uploaded.id.startswith("file-")
    assert uploaded.bytes == len(content) and uploaded.filename == "my input.jsonl"
    assert uploaded.purpose == "batch" and uploaded.status == "processed"
    assert uploaded.expires_at == uploaded.created_at + 30 * 86400
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == content


def test_expires_after_is_honoured(stack):
    client = stack.client()
    uploaded = client.files.create(
        file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert uploaded.expires_at == uploaded.created_at + 3600
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 10})
    assert err.value.param == "expires_after[seconds]"


def test_list_paginates_over_many_files_each_once(stack):
    client = stack.client(api_key=API_KEY, default_headers={"X-On-Behalf-Of": "pagination-user"})
    created = [client.files.create(file=(f"f{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id for i in range(27)]
    listed = [f.id for f in client.files.list(limit=4)]
    assert listed == list(reversed(created))
    ascending = [f.id for f in client.files.list(limit=5, order="asc")]
    assert ascending == created
    first = client.files.list(limit=10)
    assert first.has_more is True and len(first.data) == 10
    page = client.files.list(limit=10, after=created[0])
    assert page.data == [] and page.has_more is False


def test_list_filters_by_purpose(stack):
    client = stack.client(default_headers={"X-On-Behalf-Of": "purpose-user"})
    batch_file = client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    other = client.files.create(file=("notes.txt", io.BytesIO(b"hi")), purpose="user_data")
    assert [f.id for f in client.files.list(purpose="batch")] == [batch_file.id]
    assert [f.id for f in client.files.list(purpose="user_data")] == [other.id]


def test_delete_then_everything_is_404(stack):
    client = stack.client()
    uploaded = client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted is True and deleted.id == uploaded.id and deleted.object == "file"
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as err:
            call(uploaded.id)
        assert err.value.code == "file_not_found"


def test_upload_errors(stack):
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("data.csv", io.BytesIO(b"a,b\n")), purpose="batch")
    assert "Must be .jsonl" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="nonsense")  # type: ignore[arg-type]
    assert err.value.param == "purpose"
    resp = httpx.post(f"{stack.base_url}/files", headers={"Authorization": f"Bearer {API_KEY}"},
                      data={"purpose": "batch"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "missing_required_parameter" and resp.json()["error"]["param"] == "file"
    resp = httpx.post(f"{stack.base_url}/files", headers={"Authorization": f"Bearer {API_KEY}"},
                      files={"file": ("../../etc/passwd.jsonl", b"{}\n")}, data={"purpose": "batch"})
    assert resp.status_code == 200 and resp.json()["filename"] == "passwd.jsonl"


def test_authentication_errors(stack):
    with pytest.raises(openai.AuthenticationError) as err:
        stack.client(api_key="sk-wrong-key-123456").files.list()
    assert err.value.code == "invalid_api_key" and err.value.request_id
    resp = httpx.get(f"{stack.base_url}/files")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "missing_api_key"


def test_other_tenant_sees_404_never_the_object(stack):
    mine = stack.client().files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    theirs = stack.client(api_key=OTHER_API_KEY)
    with pytest.raises(openai.NotFoundError):
        theirs.files.retrieve(mine.id)
    assert mine.id not in [f.id for f in theirs.files.list()]


def test_unknown_route_and_bad_query_are_envelopes_not_500(stack):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    resp = httpx.get(f"{stack.base_url}/nothing-here", headers=headers)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_url"
    assert resp.headers["x-request-id"].startswith("req_")
    resp = httpx.get(f"{stack.base_url}/files", params={"limit": "many"}, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "limit"
    resp = httpx.get(f"{stack.base_url}/batches", params={"limit": 1000}, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "limit"
