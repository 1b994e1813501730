"""Token usage summed over responses, whatever the endpoint calls its fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0

    def add(self, body: Any) -> None:
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return
        # Chat and completions say prompt/completion; responses and images say input/output.
        input_tokens = _int(usage.get("input_tokens")) or _int(usage.get("prompt_tokens"))
        output_tokens = _int(usage.get("output_tokens")) or _int(usage.get("completion_tokens"))
        in_details = usage.get("input_tokens_details") or usage.get("prompt_tokens_details") or {}
        out_details = usage.get("output_tokens_details") or usage.get("completion_tokens_details") or {}
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cached_tokens += _int(in_details.get("cached_tokens")) if isinstance(in_details, dict) else 0
        self.reasoning_tokens += _int(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else 0
        self.total_tokens += _int(usage.get("total_tokens")) or input_tokens + output_tokens

    def as_list(self) -> list[int]:
        return [self.input_tokens, self.cached_tokens, self.output_tokens, self.reasoning_tokens, self.total_tokens]

    def merge(self, values: list[int]) -> None:
        self.input_tokens += values[0]
        self.cached_tokens += values[1]
        self.output_tokens += values[2]
        self.reasoning_tokens += values[3]
        self.total_tokens += values[4]

    def as_batch_usage(self) -> dict:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.total_tokens,
        }
