"""Two tenants, and two end users of one tenant: across every boundary, every route answers 404 and lists never mix."""

from __future__ import annotations

import io

import httpx
import pytest
from stack import API_KEY, OTHER_API_KEY, chat_lines, submit, wait_terminal

pytestmark = pytest.mark.e2e

OWNER = {"Authorization": f"Bearer {API_KEY}", "X-On-Behalf-Of": "user-1"}
STRANGERS = {
    "other tenant": {"Authorization": f"Bearer {OTHER_API_KEY}"},
    "other tenant, same end user": {"Authorization": f"Bearer {OTHER_API_KEY}", "X-On-Behalf-Of": "user-1"},
    "same tenant, no end user": {"Authorization": f"Bearer {API_KEY}"},
    "same tenant, other end user": {"Authorization": f"Bearer {API_KEY}", "X-On-Behalf-Of": "user-2"},
}
PREFIXES = ("/v1", "", "/api/v1/llm")


@pytest.fixture(scope="module")
def owned(stack):
    client = stack.client(default_headers={"X-On-Behalf-Of": "user-1"})
    batch = wait_terminal(client, submit(client, chat_lines(5)).id)
    assert batch.status == "completed"
    spare = client.files.create(file=("spare.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
    return {"batch": batch.id, "input": batch.input_file_id, "output": batch.output_file_id, "spare": spare.id}


def routes(owned: dict) -> list[tuple[str, str, dict | None]]:
    out = []
    for prefix in PREFIXES:
        for key in ("input", "output", "spare"):
            out += [("GET", f"{prefix}/files/{owned[key]}", None),
                    ("GET", f"{prefix}/files/{owned[key]}/content", None),
                    ("DELETE", f"{prefix}/files/{owned[key]}", None)]
        out += [("GET", f"{prefix}/batches/{owned['batch']}", None),
                ("POST", f"{prefix}/batches/{owned['batch']}/cancel", None),
                ("POST", f"{prefix}/batches", {"input_file_id": owned["spare"], "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"})]
    out += [("GET", f"/v1/batches/{owned['batch']}/output", None), ("GET", f"/batches/{owned['batch']}/output", None),
            ("GET", f"/v1/batch/{owned['batch']}", None), ("POST", f"/v1/batch/{owned['batch']}/cancel", None)]
    return out


@pytest.mark.parametrize("who", sorted(STRANGERS))
def test_every_route_answers_404_across_the_boundary(stack, owned, who):
    root = stack.base_url.removesuffix("/v1")
    headers = STRANGERS[who]
    with httpx.Client(base_url=root, timeout=10) as http:
        for method, path, body in routes(owned):
            resp = http.request(method, path, headers=headers, json=body)
            assert resp.status_code == 404, (who, method, path, resp.status_code, resp.text)
            error = resp.json()["error"]
            assert error["type"] == "invalid_request_error" and error["code"] in ("file_not_found", "batch_not_found")
            for value in owned.values():
                if value not in path and value not in str(body):
                    assert value not in resp.text  # no hint of anything else the owner has
        for prefix in PREFIXES:
            listed_files = http.get(f"{prefix}/files", headers=headers).json()["data"]
            listed_batches = http.get(f"{prefix}/batches", headers=headers).json()["data"]
            ids = {f["id"] for f in listed_files} | {b["id"] for b in listed_batches}
            assert not ids & set(owned.values()), (who, prefix)


def test_unknown_and_foreign_ids_look_the_same(stack, owned):
    root = stack.base_url.removesuffix("/v1")
    stranger = STRANGERS["other tenant"]
    foreign = httpx.get(f"{root}/v1/batches/{owned['batch']}", headers=stranger).json()["error"]
    unknown = httpx.get(f"{root}/v1/batches/batch_{'0' * 32}", headers=stranger).json()["error"]
    assert {k: v for k, v in foreign.items() if k != "message"} == {k: v for k, v in unknown.items() if k != "message"}
    assert foreign["message"].replace(owned["batch"], "X") == unknown["message"].replace(f"batch_{'0' * 32}", "X")


def test_owner_still_sees_everything(stack, owned):
    root = stack.base_url.removesuffix("/v1")
    with httpx.Client(base_url=root, timeout=10) as http:
        for prefix in PREFIXES:
            assert http.get(f"{prefix}/batches/{owned['batch']}", headers=OWNER).status_code == 200
            assert http.get(f"{prefix}/files/{owned['output']}/content", headers=OWNER).status_code == 200
        ids = [b["id"] for b in http.get("/v1/batches", headers=OWNER).json()["data"]]
        assert owned["batch"] in ids
