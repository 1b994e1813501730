"""Settings of the simulator: latency and the faults it injects."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

ENV_PREFIX = "BATCHGATE_SIM_"


class SimulatorConfig(BaseModel):
    latency_ms: float = Field(default=0.0, ge=0, description="added to every answer, in milliseconds")
    jitter_ms: float = Field(default=0.0, ge=0, description="a random extra latency up to this")
    error_rate: float = Field(default=0.0, ge=0, le=1, description="share of requests answered 500")
    rate_429: float = Field(default=0.0, ge=0, le=1, description="share of requests answered 429")
    retry_after_s: float = Field(default=1.0, ge=0, description="the Retry-After sent with a 429")
    fail_when_contains: dict[str, int] = Field(default_factory=dict, description="answer a request whose body "
                                               "contains a key with that key's status (deterministic faults: "
                                               "{\"FAIL-ME\": 500} fails exactly the lines holding FAIL-ME)")
    max_rpm: int = Field(default=0, ge=0, description="answer 429 above this many requests a minute; 0 = unlimited")
    api_key: str = Field(default="", description="require 'Authorization: Bearer <this>'; empty = accept any")
    usage_total_tokens: int | None = Field(default=None, ge=0, description="report this total in every usage block "
                                           "(an upstream that gets its figures absurdly wrong)")
    usage_cached_tokens: int | None = Field(default=None, ge=0, description="report this many of each answer's input "
                                            "tokens as cached (at most all of them)")
    batch_validating_s: float = Field(default=0.2, ge=0, description="how long a created batch stays `validating`")
    batch_lines_per_s: float = Field(default=500.0, ge=0, description="how fast a batch answers its lines; 0 = at once")
    batch_fail_after: int | None = Field(default=None, ge=0, description="a batch fails (status `failed`, code "
                                         "simulated_failure) once it has answered this many lines")
    batch_expire_after: int | None = Field(default=None, ge=0, description="a batch expires once it has answered "
                                           "this many lines (the rest become batch_expired error lines)")
    seed: int | None = Field(default=None, description="seed of the random faults and jitter, for repeatable runs")

    @classmethod
    def from_env(cls, **overrides: object) -> "SimulatorConfig":
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
