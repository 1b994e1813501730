"""Object identifiers in OpenAI's formats."""

from __future__ import annotations

import hashlib
import secrets

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _base62(n_chars: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n_chars))


def new_file_id() -> str:
    return f"file-{_base62(22)}"


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(16)}"


def new_request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


def derived_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output or error file: fixed per batch so a second finalize rewrites, never duplicates."""
    digest = hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()
    return f"file-{digest[:24]}"


def batch_request_id(batch_id: str, line_no: int) -> str:
    """The `id` of one output line: stable across re-runs of its chunk."""
    digest = hashlib.sha256(f"{batch_id}:{line_no}".encode()).hexdigest()
    return f"batch_req_{digest[:32]}"
