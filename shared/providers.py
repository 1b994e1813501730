"""Upstream providers: OpenAI-compatible base URLs with their credentials and limits.

Configured in a TOML file named by BATCHGATE_PROVIDERS_FILE (every key, commented: providers.example.toml):

    default = "openai"
    currency = "USD"                     # the currency of every [prices] entry; default "USD"

    [providers.openai]
    base_url = "https://api.openai.example/v1"
    api_key_env = "OPENAI_API_KEY"       # or api_key = "sk-..."
    models = ["gpt-*", "o*"]             # fnmatch patterns; a batch's model picks its provider
    max_concurrency = 64                 # in-flight requests per worker process
    timeout_s = 120
    max_retries = 5
    rpm = 3500                           # shared by every worker process, through Redis
    tpm = 2000000
    max_inflight = 256
    adaptive = true                      # requests in flight across all workers found by AIMD (workers/ratelimit.py),
    adaptive_min = 4                     # between adaptive_min and max_inflight (else max_concurrency x processes)
    max_response_bytes = 8388608         # decoded answer bodies over this are dropped as response_too_large;
                                         # default 8 MiB (or BATCHGATE_UPSTREAM_MAX_RESPONSE_BYTES); raise it for
                                         # embeddings of over 256 inputs per request or several images (README
                                         # "Upstream answer sizes"), and keep max_concurrency x it within memory

    kind = "openai"                      # or "azure": {base_url}/openai/deployments/{deployment}/...?api-version=
    api_version = "2024-10-21"           # azure only (required there)
    deployments = { "gpt-4o-mini" = "my-4o-mini" }   # azure: model -> deployment; default: the model name
    auth = "bearer"                      # or "api-key" (azure's default) or "none": how the key is sent
    headers = { "x-team" = "research" }  # added to every request
    query = { "source" = "batchgate" }   # added to every request's URL
    fallbacks = ["local-vllm"]           # tried in order for a request that failed here after its retries
    weight = 3                           # among providers serving the same model, share requests by weight
    circuit_open_after_s = 30            # failing every request this long: requests go to fallbacks at once
    circuit_retry_after_s = 30           # ... until a probe request after this long succeeds

    [tenants.team-a]
    providers = ["openai"]               # a tenant listed here may use only these; others may use any
    webhook_url = "https://hooks.team-a.example/batchgate"   # its host must be in BATCHGATE_WEBHOOK_ALLOWED_HOSTS
    webhook_secret = "whsec_..."         # Standard Webhooks signing secret
    weight = 1                           # its share of the workers against other tenants with work
    max_enqueued_requests = 100000       # requests of started, unfinished batches; a batch over it waits

    [prices."gpt-4o-mini"]               # a model's name, or an fnmatch pattern ("gpt-4o*"); the exact name wins
    input = 0.15                         # per `per` input tokens (cached ones at cached_input, if set)
    cached_input = 0.075
    output = 0.60                        # per `per` output tokens (reasoning tokens are among them)
    per = 1_000_000
    discount = 0.5                       # the batch discount: the sum is multiplied by (1 - discount)

Every key but base_url is optional; the defaults are those of the Provider model below, except that a provider
without max_response_bytes takes BATCHGATE_UPSTREAM_MAX_RESPONSE_BYTES. Without a file there is one provider,
"default", from BATCHGATE_UPSTREAM_* settings.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from decimal import ROUND_HALF_EVEN, Context, Decimal
from functools import lru_cache
from typing import Literal
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from shared.lifecycle import MICROS, USAGE_CEILING
from shared.settings import DEFAULT_MAX_RESPONSE_BYTES, Settings, get_settings


# Azure OpenAI's paths under /openai/deployments/{deployment}; /v1/responses is not per deployment there.
AZURE_UNDEPLOYED = {"/responses": "/openai/responses"}


class Provider(BaseModel):
    name: str
    base_url: str
    kind: Literal["openai", "azure"] = "openai"
    api_key: SecretStr = SecretStr("")
    api_key_env: str | None = None
    auth: Literal["bearer", "api-key", "none"] | None = Field(
        default=None, description="how the key is sent; default api-key for azure, bearer otherwise")
    api_version: str | None = Field(default=None, description="azure: the api-version query parameter (required)")
    deployments: dict[str, str] = Field(default_factory=dict, description="azure: model -> deployment name")
    headers: dict[str, str] = Field(default_factory=dict, description="added to every request")
    query: dict[str, str] = Field(default_factory=dict, description="query parameters added to every request")
    models: list[str] = Field(default_factory=list)
    max_concurrency: int = Field(default=64, ge=1, le=4096)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=20)
    rpm: int = Field(default=0, ge=0, description="requests per minute across all workers; 0 = unlimited")
    tpm: int = Field(default=0, ge=0, description="estimated tokens per minute across all workers; 0 = unlimited")
    max_inflight: int = Field(default=0, ge=0, description="requests in flight across all workers; 0 = unlimited")
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, ge=1,
                                    description="largest answer body kept (decoded bytes); larger is response_too_large")
    fallbacks: list[str] = Field(default_factory=list,
                                 description="providers tried in order for a request that failed here after retries")
    weight: float = Field(default=1.0, gt=0, le=1000,
                          description="share of the requests among providers serving the same model")
    circuit_open_after_s: float = Field(default=30.0, gt=0,
                                        description="every request failing this long opens the circuit breaker")
    circuit_retry_after_s: float = Field(default=30.0, gt=0, description="an open circuit is probed again after this")
    adaptive: bool = Field(default=False, description="AIMD limit on requests in flight across all workers")
    adaptive_min: int = Field(default=4, ge=1, le=4096, description="the adaptive limit never goes below this")
    batch_api: str = Field(default="execute", pattern="^(execute|native)$",
                           description="execute: batchgate sends each line; native: a batch is forwarded whole to the "
                           "provider's own Files and Batches API (workers/forward.py)")

    @model_validator(mode="after")
    def _normalise(self) -> "Provider":
        self.base_url = self.base_url.rstrip("/")
        if self.auth is None:
            self.auth = "api-key" if self.kind == "azure" else "bearer"
        if self.kind == "azure" and not self.api_version:
            raise ValueError(f"provider {self.name!r}: kind = \"azure\" needs api_version")
        return self

    def secret(self) -> str:
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "")
        return self.api_key.get_secret_value()

    def auth_headers(self) -> dict[str, str]:
        """The headers that carry the key (none without a key, or with auth = "none")."""
        secret = self.secret()
        if not secret or self.auth == "none":
            return {}
        return {"api-key": secret} if self.auth == "api-key" else {"authorization": f"Bearer {secret}"}

    def deployment(self, model: str | None) -> str:
        """azure: the deployment serving `model` (the model's own name unless `deployments` maps it)."""
        return self.deployments.get(model or "", model or "")

    def url_for(self, endpoint: str, model: str | None = None) -> str:
        """The upstream URL of a batch endpoint such as '/v1/chat/completions', for a batch of `model`."""
        path = endpoint.removeprefix("/v1")
        query = dict(self.query)
        if self.kind == "azure":
            if path in AZURE_UNDEPLOYED:
                path = AZURE_UNDEPLOYED[path]
            else:
                path = f"/openai/deployments/{quote(self.deployment(model), safe='')}{path}"
            query["api-version"] = self.api_version or ""
        return f"{self.base_url}{path}" + (f"?{urlencode(query)}" if query else "")

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


class TenantConfig(BaseModel):
    providers: list[str] | None = None
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    weight: float = Field(default=1.0, gt=0, le=1000, description="share of the workers against other tenants")
    max_enqueued_requests: int | None = Field(
        default=None, ge=1, description="requests of started, unfinished batches; a batch over it waits")


# Costs are kept in millionths of the currency unit (MICROS: integers, summed in Redis without float drift), and
# saturate at 2^53 - 1 micro-units like the token counts.
COST_CEILING = USAGE_CEILING
CURRENCY_PATTERN = r"^[A-Za-z0-9_.-]{1,16}$"


class Price(BaseModel):
    """A model's price, per `per` tokens, in the file's `currency`."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a price of 0

    input: float = Field(ge=0, description="per `per` input tokens (the uncached ones, when cached_input is set)")
    output: float = Field(default=0.0, ge=0, description="per `per` output tokens (reasoning tokens among them)")
    cached_input: float | None = Field(default=None, ge=0,
                                       description="per `per` cached input tokens; default: the input price")
    per: int = Field(default=1_000_000, ge=1, description="the number of tokens the prices are for")
    discount: float | None = Field(default=None, ge=0, le=1,
                                   description="a share taken off the whole cost (0.5 = half price); default none")

    def cost_micros(self, usage: list[int]) -> int:
        """The cost of a batch's usage [input, cached, output, reasoning, total] in millionths of the currency:
        ((input - cached) x input + cached x (cached_input or input) + output x output) / per, times
        (1 - discount) when a discount is set, rounded half to even to a whole micro-unit. Exact decimal
        arithmetic on the prices as written (0.15 is 0.15, not the nearest binary float)."""
        ctx = Context(prec=60)
        input_tokens, output_tokens = max(0, usage[0]), max(0, usage[2])
        cached = min(max(0, usage[1]), input_tokens)
        price = lambda value: Decimal(repr(float(value)))  # noqa: E731 - the shortest decimal that reads back as it
        cached_price = self.cached_input if self.cached_input is not None else self.input
        amount = ctx.add(ctx.add(ctx.multiply(Decimal(input_tokens - cached), price(self.input)),
                                 ctx.multiply(Decimal(cached), price(cached_price))),
                         ctx.multiply(Decimal(output_tokens), price(self.output)))
        amount = ctx.divide(ctx.multiply(amount, Decimal(MICROS)), Decimal(self.per))
        if self.discount is not None:
            amount = ctx.multiply(amount, ctx.subtract(Decimal(1), price(self.discount)))
        return min(int(amount.quantize(Decimal(1), rounding=ROUND_HALF_EVEN, context=ctx)), COST_CEILING)


class ProviderRegistry:
    def __init__(self, providers: list[Provider], default: str, tenants: dict[str, TenantConfig] | None = None,
                 webhook_allowed_hosts: tuple[str, ...] = (), prices: dict[str, Price] | None = None,
                 currency: str = "USD") -> None:
        self.prices = prices or {}
        if not re.match(CURRENCY_PATTERN, currency):
            raise ValueError(f"currency {currency!r}: 1-16 letters, digits, '_', '.' or '-'")
        self.currency = currency
        self.providers = {p.name: p for p in providers}
        if default not in self.providers:
            raise ValueError(f"default provider {default!r} is not configured")
        self.default = default
        self.tenants = tenants or {}
        for provider in providers:
            unknown = [name for name in provider.fallbacks if name not in self.providers or name == provider.name]
            if unknown:
                raise ValueError(f"provider {provider.name!r}: fallbacks name unknown providers or itself: {unknown}")
        for tenant, config in self.tenants.items():
            unknown = set(config.providers or ()) - set(self.providers)
            if unknown:
                raise ValueError(f"tenant {tenant!r} is allowed unknown providers: {sorted(unknown)}")
            if config.webhook_url:
                host = urlsplit(config.webhook_url).hostname or ""
                if host not in webhook_allowed_hosts:
                    raise ValueError(f"tenant {tenant!r}: webhook host {host!r} is not in BATCHGATE_WEBHOOK_ALLOWED_HOSTS")
                if config.webhook_secret is None:
                    raise ValueError(f"tenant {tenant!r}: a webhook_url needs a webhook_secret")

    def allowed(self, tenant: str, name: str) -> bool:
        config = self.tenants.get(tenant)
        return config is None or config.providers is None or name in config.providers

    def weight(self, tenant: str) -> float:
        config = self.tenants.get(tenant)
        return config.weight if config is not None else 1.0

    def max_enqueued_requests(self, tenant: str) -> int | None:
        config = self.tenants.get(tenant)
        return config.max_enqueued_requests if config is not None else None

    def webhook(self, tenant: str) -> TenantConfig | None:
        config = self.tenants.get(tenant)
        return config if config is not None and config.webhook_url else None

    def for_tenant_model(self, tenant: str, model: str | None) -> Provider | None:
        """The provider a tenant's batch of `model` goes to: by model pattern, else the default, if allowed."""
        candidates = [p for p in self.providers.values() if model and p.serves(model)]
        candidates.append(self.providers[self.default])
        for provider in candidates:
            if self.allowed(tenant, provider.name):
                return provider
        return None

    def get(self, name: str) -> Provider | None:
        return self.providers.get(name)

    def price_for(self, model: str | None) -> Price | None:
        """The price of `model`: its exact name in [prices], else the first pattern matching it, else none."""
        if not model:
            return None
        if model in self.prices:
            return self.prices[model]
        for pattern, price in self.prices.items():
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return None

    def cost(self, model: str | None, usage: list[int]) -> tuple[int, str] | None:
        """(micro-units, currency) of a batch of `model` that used `usage`, or None when the model has no price."""
        price = self.price_for(model)
        return None if price is None else (price.cost_micros(usage), self.currency)

    def for_model(self, model: str | None) -> Provider:
        if model:
            for provider in self.providers.values():
                if provider.serves(model):
                    return provider
        return self.providers[self.default]

    @classmethod
    def from_settings(cls, settings: Settings) -> "ProviderRegistry":
        if settings.providers_file is None:
            return cls(
                [
                    Provider(
                        name="default",
                        base_url=settings.upstream_base_url,
                        api_key=SecretStr(settings.upstream_api_key),
                        max_concurrency=settings.upstream_max_concurrency,
                        timeout_s=settings.upstream_timeout_s,
                        max_retries=settings.upstream_max_retries,
                        rpm=settings.upstream_rpm,
                        tpm=settings.upstream_tpm,
                        max_inflight=settings.upstream_max_inflight,
                        max_response_bytes=settings.upstream_max_response_bytes,
                    )
                ],
                "default",
            )
        with open(settings.providers_file, "rb") as fh:
            data = tomllib.load(fh)
        default_cap = {"max_response_bytes": settings.upstream_max_response_bytes}
        providers = [Provider(name=name, **{**default_cap, **spec}) for name, spec in data.get("providers", {}).items()]
        if not providers:
            raise ValueError(f"{settings.providers_file} defines no [providers.*] table")
        tenants = {name: TenantConfig(**spec) for name, spec in data.get("tenants", {}).items()}
        allowed_hosts = tuple(h.strip() for h in settings.webhook_allowed_hosts.split(",") if h.strip())
        prices = {model: Price(**spec) for model, spec in data.get("prices", {}).items()}
        return cls(providers, data.get("default", providers[0].name), tenants, allowed_hosts, prices,
                   data.get("currency", "USD"))


@lru_cache
def get_registry() -> ProviderRegistry:
    return ProviderRegistry.from_settings(get_settings())
