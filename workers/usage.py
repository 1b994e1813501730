"""Token usage summed over responses, whatever the endpoint calls its fields."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from shared.lifecycle import USAGE_CEILING

log = logging.getLogger("batchgate.usage")


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return 0
    if value > USAGE_CEILING:
        log.warning("an upstream reported a token count of %d; counted as %d", value, USAGE_CEILING)
        return USAGE_CEILING
    return value


def _add(a: int, b: int) -> int:
    return min(a + b, USAGE_CEILING)


@dataclass
class Usage:
    """Five token counts, each saturating at USAGE_CEILING: a figure an upstream got absurdly wrong is capped, never
    allowed to overflow what stores and clients can hold."""

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
        self.input_tokens = _add(self.input_tokens, input_tokens)
        self.output_tokens = _add(self.output_tokens, output_tokens)
        if isinstance(in_details, dict):
            self.cached_tokens = _add(self.cached_tokens, _int(in_details.get("cached_tokens")))
        if isinstance(out_details, dict):
            self.reasoning_tokens = _add(self.reasoning_tokens, _int(out_details.get("reasoning_tokens")))
        total = _int(usage.get("total_tokens")) or _add(input_tokens, output_tokens)
        self.total_tokens = _add(self.total_tokens, total)

    def as_list(self) -> list[int]:
        return [self.input_tokens, self.cached_tokens, self.output_tokens, self.reasoning_tokens, self.total_tokens]

    def merge(self, values: list[int]) -> None:
        self.input_tokens = _add(self.input_tokens, _int(values[0]))
        self.cached_tokens = _add(self.cached_tokens, _int(values[1]))
        self.output_tokens = _add(self.output_tokens, _int(values[2]))
        self.reasoning_tokens = _add(self.reasoning_tokens, _int(values[3]))
        self.total_tokens = _add(self.total_tokens, _int(values[4]))
