"""Deterministic response bodies, shaped like OpenAI's, derived from a hash of the request body."""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

TINY_PNG = base64.b64encode(
    bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                  "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
).decode()


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        return _text_of(value.get("content") or value.get("text") or "")
    return ""


def _created(digest: bytes) -> int:
    return 1_700_000_000 + int.from_bytes(digest[:3], "big")


def chat(body: dict, digest: bytes) -> dict:
    messages = body.get("messages") or []
    prompt = _text_of(messages)
    last = _text_of(messages[-1]) if messages else ""
    content = f"Simulated reply to: {last[:80]}"
    prompt_tokens, completion_tokens = _tokens(prompt), _tokens(content)
    return {
        "id": f"chatcmpl-{digest.hex()[:24]}",
        "object": "chat.completion",
        "created": _created(digest),
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
    }


def completion(body: dict, digest: bytes) -> dict:
    prompt = _text_of(body.get("prompt") or "")
    text = f" simulated completion of: {prompt[:80]}"
    prompt_tokens, completion_tokens = _tokens(prompt), _tokens(text)
    return {
        "id": f"cmpl-{digest.hex()[:24]}",
        "object": "text_completion",
        "created": _created(digest),
        "model": body["model"],
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _vector(seed: bytes, dims: int) -> list[float]:
    out: list[float] = []
    block = seed
    while len(out) < dims:
        block = hashlib.sha256(block).digest()
        out.extend(round(v / 2**31, 6) for v in struct.unpack(">8i", block))
    return out[:dims]


def embeddings(body: dict, digest: bytes) -> dict:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else 8
    tokens = sum(_tokens(_text_of(i) if not isinstance(i, int) else "x") for i in items)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _vector(digest + bytes([i % 256]), dims)}
                 for i in range(len(items))],
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def responses(body: dict, digest: bytes) -> dict:
    prompt = _text_of(body.get("input") or "")
    text = f"Simulated response to: {prompt[:80]}"
    input_tokens, output_tokens = _tokens(prompt), _tokens(text)
    return {
        "id": f"resp_{digest.hex()[:32]}",
        "object": "response",
        "created_at": _created(digest),
        "status": "completed",
        "model": body["model"],
        "output": [{"type": "message", "id": f"msg_{digest.hex()[:24]}", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                  "total_tokens": input_tokens + output_tokens,
                  "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
    }


MODERATION_CATEGORIES = ("harassment", "hate", "self-harm", "sexual", "violence")


def moderations(body: dict, digest: bytes) -> dict:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    return {
        "id": f"modr-{digest.hex()[:24]}",
        "model": body["model"],
        "results": [{"flagged": False, "categories": {c: False for c in MODERATION_CATEGORIES},
                     "category_scores": {c: 0.0001 for c in MODERATION_CATEGORIES}} for _ in items],
    }


def images(body: dict, digest: bytes) -> dict:
    prompt_tokens = _tokens(_text_of(body.get("prompt") or ""))
    n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
    return {
        "created": _created(digest),
        "data": [{"b64_json": TINY_PNG} for _ in range(min(n, 10))],
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 16 * n, "total_tokens": prompt_tokens + 16 * n,
                  "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0}},
    }


HANDLERS = {
    "/v1/chat/completions": chat,
    "/v1/completions": completion,
    "/v1/embeddings": embeddings,
    "/v1/responses": responses,
    "/v1/moderations": moderations,
    "/v1/images/generations": images,
}
