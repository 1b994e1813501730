"""docs/configuration.md is what the settings classes say, and names every setting the project mentions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared import settings_doc
from shared.settings import Settings
from simulator.config import SimulatorConfig

ROOT = Path(__file__).resolve().parents[1]
# Where a setting may be named: the README, the deployment files and the shipped source.
MENTIONS = ["README.md", "docker-compose.yml", "Dockerfile", "Makefile", "docs/architecture.md"]
SHIPPED = ("api", "workers", "shared", "cli", "simulator")


def test_configuration_doc_is_generated_from_the_settings():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == settings_doc.render(), f"docs/configuration.md is out of date: run {settings_doc.COMMAND}"


def test_every_setting_has_a_description_and_a_row():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for model, prefix in ((Settings, "BATCHGATE_"), (SimulatorConfig, "BATCHGATE_SIM_")):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} needs a description="
            assert f"| `{prefix}{name.upper()}` |" in doc
    assert len(Settings.model_fields) >= 50


def test_a_field_without_a_description_is_refused():
    from pydantic import BaseModel, Field

    class Sample(BaseModel):
        # Things.
        documented: int = Field(default=1, description="says what it does")
        bare: int = 2

    with pytest.raises(ValueError, match=r"Sample\.bare has no description="):
        settings_doc.table(Sample, "X_")


def test_every_setting_the_project_names_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"\| `(BATCHGATE_[A-Z0-9_]+)` \|", doc))
    texts = {name: (ROOT / name).read_text() for name in MENTIONS}
    for package in SHIPPED:
        texts |= {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / package).rglob("*.py")}
    named = {}
    for where, text in texts.items():
        for m in re.finditer(r"BATCHGATE_[A-Z0-9_]+", text):
            if not m.group(0).endswith("_"):  # a prefix (`BATCHGATE_`, `BATCHGATE_UPSTREAM_*`)
                named.setdefault(m.group(0), where)
    assert "BATCHGATE_UPSTREAM_API_KEY" in named and "BATCHGATE_REDIS_URL" in named
    assert {name: where for name, where in named.items() if name not in documented} == {}


def test_readme_points_at_the_configuration_doc_and_the_providers_example():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/configuration.md)" in readme
    assert "providers.example.toml" in readme
