"""Azure OpenAI and other auth styles: the URL (deployment, api-version, query) and headers (api-key, Bearer, none,
extra headers) a provider sends, and a batch served by an upstream that accepts only Azure's form, with the key in
no log."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import ValidationError
from stack import Stack, chat_lines, read_lines, submit, wait_terminal

from cli import stack as procs
from shared.providers import Provider
from workers.upstream import upstream_headers

AZURE_KEY = "azure-key-5f3a9c0e7b2d4a61"
API_VERSION = "2024-10-21"


def azure(**extra: object) -> Provider:
    return Provider(name="az", kind="azure", base_url="https://myres.openai.azure.com/", api_version=API_VERSION,
                    api_key=AZURE_KEY, deployments={"gpt-4o-mini": "my-4o-mini"}, **extra)


def test_azure_urls_name_the_deployment_and_the_api_version():
    provider = azure(query={"trace": "on"})
    url = provider.url_for("/v1/chat/completions", "gpt-4o-mini")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == \
        "https://myres.openai.azure.com/openai/deployments/my-4o-mini/chat/completions"
    assert parse_qs(parts.query) == {"api-version": [API_VERSION], "trace": ["on"]}
    # A model without a mapping is its own deployment; the name is one path segment whatever it holds.
    assert provider.url_for("/v1/embeddings", "text-embedding-3-small").split("?")[0].endswith(
        "/openai/deployments/text-embedding-3-small/embeddings")
    assert "/openai/deployments/a%2Fb%3F/chat/completions?" in provider.url_for("/v1/chat/completions", "a/b?")
    assert provider.url_for("/v1/responses", "gpt-4o-mini").startswith(
        "https://myres.openai.azure.com/openai/responses?")


def test_openai_urls_take_only_the_configured_query():
    plain = Provider(name="p", base_url="http://h:1/v1")
    assert plain.url_for("/v1/chat/completions", "m") == "http://h:1/v1/chat/completions"
    tagged = Provider(name="p", base_url="http://h:1/v1", query={"a": "1 2", "b": "&"})
    assert tagged.url_for("/v1/embeddings") == "http://h:1/v1/embeddings?a=1+2&b=%26"


def test_auth_styles_and_extra_headers():
    assert upstream_headers(azure()) == {"content-type": "application/json", "api-key": AZURE_KEY}
    assert upstream_headers(azure(auth="bearer"))["authorization"] == f"Bearer {AZURE_KEY}"
    assert "api-key" not in upstream_headers(azure(auth="bearer"))
    plain = Provider(name="p", base_url="http://h", api_key="sk-x", headers={"X-Team": "research"})
    assert upstream_headers(plain) == {"content-type": "application/json", "x-team": "research",
                                       "authorization": "Bearer sk-x"}
    keyed = Provider(name="p", base_url="http://h", api_key="sk-x", auth="api-key")
    assert upstream_headers(keyed) == {"content-type": "application/json", "api-key": "sk-x"}
    none = Provider(name="p", base_url="http://h", api_key="sk-x", auth="none", headers={"x-a": "1"})
    assert upstream_headers(none) == {"content-type": "application/json", "x-a": "1"}
    # A configured header cannot stand in for (or override) the key the auth style sends.
    sneaky = Provider(name="p", base_url="http://h", api_key="sk-x", headers={"Authorization": "Bearer other"})
    assert upstream_headers(sneaky)["authorization"] == "Bearer sk-x"
    assert "sk-x" not in repr(plain) and AZURE_KEY not in repr(azure())


def test_azure_needs_an_api_version():
    with pytest.raises(ValidationError, match="api_version"):
        Provider(name="az", kind="azure", base_url="https://x")
    with pytest.raises(ValidationError):
        Provider(name="p", base_url="https://x", auth="basic")


AZURE_TABLE = """
[providers.{name}]
kind = "azure"
base_url = "http://127.0.0.1:{port}"
api_version = "{version}"
api_key_env = "AZURE_TEST_KEY"
deployments = {{ "gpt-4o-mini" = "my-4o-mini" }}
max_retries = 0
{extra}
"""


@pytest.mark.e2e
def test_a_batch_through_an_upstream_that_accepts_only_azure_auth(make_stack):
    port = procs.free_port()
    stack: Stack = make_stack(log_format="json", log_level="DEBUG")
    stack.group.start("azure", [sys.executable, str(Path(__file__).parent / "strict_upstream.py"),
                                "--port", str(port), "--name", "azure", "--key", AZURE_KEY, "--auth", "api-key",
                                "--api-version", API_VERSION, "--deployment", "my-4o-mini",
                                "--header", "x-team=research", "--query", "trace=on"])
    procs.wait_for_http(f"http://127.0.0.1:{port}/health")
    text = 'default = "azure"\n'
    text += AZURE_TABLE.format(name="azure", port=port, version=API_VERSION,
                               extra='models = ["gpt-4o-mini"]\nheaders = { "x-team" = "research" }\n'
                                     'query = { "trace" = "on" }')
    # The same upstream with the key as a Bearer token, and without the headers and query it requires.
    text += AZURE_TABLE.format(name="bearer", port=port, version=API_VERSION,
                               extra='auth = "bearer"\nheaders = { "x-team" = "research" }\nquery = { "trace" = "on" }')
    text += AZURE_TABLE.format(name="bare", port=port, version=API_VERSION, extra="")
    path = stack.root / "providers.toml"
    path.write_text(text)
    stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(path)
    stack.group.env["AZURE_TEST_KEY"] = AZURE_KEY
    stack.start(workers=1, concurrency=2)
    client = stack.client()

    good = wait_terminal(client, submit(client, chat_lines(30, model="gpt-4o-mini")).id, timeout=90)
    assert good.status == "completed", good
    assert (good.request_counts.completed, good.request_counts.failed) == (30, 0)
    out = read_lines(client, good.output_file_id)
    assert {line["response"]["body"]["choices"][0]["message"]["content"] for line in out} == {"served by azure"}

    wrong = {}
    for name in ("bearer", "bare"):
        batch = submit(client, chat_lines(5, model="gpt-4o-mini", prefix=name),
                       extra_headers={"x-batchgate-provider": name})
        wrong[name] = wait_terminal(client, batch.id, timeout=90)
        assert wrong[name].status == "completed"
        assert (wrong[name].request_counts.completed, wrong[name].request_counts.failed) == (0, 5)
    bearer_errors = read_lines(client, wrong["bearer"].error_file_id)
    assert {line["response"]["status_code"] for line in bearer_errors} == {401}
    bare_errors = read_lines(client, wrong["bare"].error_file_id)
    assert {line["response"]["body"]["error"]["code"] for line in bare_errors} == {"missing_header"}

    stats = httpx.get(f"http://127.0.0.1:{port}/_stats").json()
    print("azure upstream:", stats)
    assert stats["served"] == 30 and stats["by_reason"] == {"401": 5, "missing_header": 5}

    for file_id in (good.output_file_id, wrong["bearer"].error_file_id, wrong["bare"].error_file_id):
        assert AZURE_KEY not in client.files.content(file_id).text
    stack.stop()
    logs = {path.name: path.read_text(errors="replace") for path in (stack.root / "logs").glob("*.log")}
    assert any("w1" in name for name in logs) and sum(map(len, logs.values())) > 1000
    for name, text in logs.items():
        assert AZURE_KEY not in text, name
