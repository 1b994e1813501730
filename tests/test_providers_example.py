"""providers.example.toml loads with the real loader and shows every key the loader's models accept."""

from __future__ import annotations

import tomllib
from pathlib import Path

from shared.providers import Price, Provider, ProviderRegistry, TenantConfig
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "providers.example.toml"
# what ProviderRegistry.from_settings reads from the file
TOP_LEVEL = {"default", "currency", "providers", "tenants", "prices"}


def _load(monkeypatch) -> ProviderRegistry:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    settings = Settings(providers_file=EXAMPLE, webhook_allowed_hosts="hooks.team-a.example")
    return ProviderRegistry.from_settings(settings)


def test_the_example_loads_with_the_real_loader(monkeypatch):
    registry = _load(monkeypatch)
    assert registry.default == "openai"
    openai, vllm = registry.get("openai"), registry.get("local-vllm")
    assert openai.secret() == "sk-from-the-environment" and vllm.secret() == "EMPTY"
    assert registry.for_model("gpt-4o-mini") is openai
    assert registry.for_model("meta-llama/Llama-3.1-8B-Instruct") is vllm
    assert registry.for_model("unknown-model") is openai
    assert openai.url_for("/v1/chat/completions") == "https://api.openai.com/v1/chat/completions"
    assert registry.get("azure").url_for("/v1/chat/completions", "gpt-4o-mini") == (
        "https://myres.openai.azure.com/openai/deployments/my-4o-mini/chat/completions?api-version=2024-10-21")
    assert registry.get("azure").auth == "api-key" and openai.auth == "bearer"
    assert openai.fallbacks == ["azure"] and openai.weight == 3 and registry.get("azure").weight == 1
    assert not registry.allowed("team-a", "local-vllm") and registry.allowed("team-b", "local-vllm")
    assert registry.webhook("team-a") is not None and registry.webhook("team-b") is None
    assert registry.tenants["team-a"].weight == 2 and registry.tenants["team-a"].max_enqueued_requests == 100000
    assert registry.currency == "USD"
    assert registry.price_for("gpt-4o-mini") == Price(input=0.15, cached_input=0.075, output=0.6, discount=0.5)
    assert registry.price_for("meta-llama/Llama-3.1-8B-Instruct") == Price(input=0.05, output=0.1)
    assert registry.price_for("gpt-4o") is None
    # 1000 uncached and 1000 cached input tokens, 1000 output tokens, at half price: 412.5 micro-USD.
    assert registry.cost("gpt-4o-mini", [2000, 1000, 1000, 0, 3000]) == (412, "USD")  # 412.5, half to even


def test_the_example_sets_every_key_the_loader_accepts():
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data) == TOP_LEVEL
    provider_keys = {key for spec in data["providers"].values() for key in spec}
    tenant_keys = {key for spec in data["tenants"].values() for key in spec}
    price_keys = {key for spec in data["prices"].values() for key in spec}
    # `name` is the table's own name, given by the loader.
    assert provider_keys == set(Provider.model_fields) - {"name"}
    assert tenant_keys == set(TenantConfig.model_fields)
    assert price_keys == set(Price.model_fields)


def test_every_key_is_commented():
    """Each key's first use in the example carries a comment saying what it does."""
    explained: set[str] = set()
    for line in EXAMPLE.read_text().splitlines():
        code, _, comment = line.partition("#")
        if "=" in code and not code.startswith("["):
            key = code.split("=")[0].strip()
            if comment.strip():
                explained.add(key)
    assert ((set(Provider.model_fields) - {"name"}) | set(TenantConfig.model_fields) | set(Price.model_fields)
            | {"default", "currency"}) <= explained


def test_the_readme_names_the_example():
    assert "providers.example.toml" in (ROOT / "README.md").read_text()
