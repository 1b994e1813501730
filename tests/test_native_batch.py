"""Native batch forwarding (providers with batch_api = "native"), end to end in real processes: against the
simulator's Batches API, and against a second batchgate deployment as the provider."""

from __future__ import annotations

import io
from pathlib import Path

import openai
import pytest
from stack import Stack, chat_lines

pytestmark = pytest.mark.e2e


def native_toml(base_url: str, key_env: str = "BATCHGATE_UPSTREAM_API_KEY", rpm: int = 0) -> str:
    """`local` executes lines against the simulator; `native` forwards whole batches to `base_url`, and is chosen
    by header or by a model named native-*."""
    return f"""
default = "local"

[providers.local]
base_url = "{base_url}"
api_key_env = "{key_env}"

[providers.native]
base_url = "{base_url}"
api_key_env = "{key_env}"
models = ["native-*"]
batch_api = "native"
rpm = {rpm}
"""


def native_stack(root: Path, base_url: str | None = None, **settings) -> Stack:
    stack = Stack(root, **settings)
    providers = root / "providers.toml"
    providers.write_text(native_toml(base_url or f"http://127.0.0.1:{stack.sim_port}/v1"))
    stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(providers)
    return stack


def test_a_window_under_24h_on_a_provider_named_by_header_is_a_400(tmp_path):
    stack = native_stack(tmp_path / "s")
    try:
        stack.start_redis()
        stack.start_simulator()
        stack.start_api()
        client = stack.client()
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(3))), purpose="batch")
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h",
                                  extra_headers={"x-batchgate-provider": "native"})
        error = refused.value.body
        assert error["code"] == "completion_window_too_short" and error["param"] == "completion_window"
        assert "24h" in error["message"] and "native" in error["message"]
        # The same window on an executing provider, and 24h or longer on the native one, are accepted.
        assert client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="1h", extra_headers={"x-batchgate-provider": "local"})
        for window in ("24h", "48h"):
            assert client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window=window, extra_headers={"x-batchgate-provider": "native"})
    finally:
        stack.stop()
