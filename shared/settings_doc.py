"""docs/configuration.md, generated from the settings classes: `python -m shared.settings_doc --write`.

Every field must have a `description=`; the section of a field is the `# Heading.` comment above it in the class.
tests/test_settings_doc.py fails when the file differs from what this module writes.
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from pathlib import Path

from pydantic import BaseModel, SecretStr

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
COMMAND = "python -m shared.settings_doc --write"
_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _default(name: str, value: object) -> str:
    if value is None or value == "" or isinstance(value, SecretStr):
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        return f"`{value if value.is_absolute() else './' + value.as_posix()}`"
    text = f"`{value}`"
    if isinstance(value, int) and name.endswith("_bytes") and value >= 1024 * 1024:
        text += f" ({value / 1024 / 1024:g} MiB)"
    elif isinstance(value, (int, float)) and name.endswith("_s") and value >= 3600:
        text += f" ({value / 86400:g} days)" if value >= 2 * 86400 else f" ({value / 3600:g} h)"
    return text


def _bounds(field) -> str:
    found = [f"{sign} {getattr(m, attr)}" for m in field.metadata for attr, sign in _BOUNDS.items()
             if getattr(m, attr, None) is not None]
    return f" ({', '.join(found)})" if found else ""


def _sections(model: type[BaseModel], heading: str) -> dict[str, list[str]]:
    """Field names grouped by the `# Heading.` comment above them in the class body, in source order."""
    sections: dict[str, list[str]] = {}
    for line in textwrap.dedent(inspect.getsource(model)).splitlines():
        if m := re.match(r"^    # ([^:.]+)", line):
            heading = m.group(1).strip()
        elif (m := re.match(r"^    (\w+)\s*:", line)) and m.group(1) in model.model_fields:
            sections.setdefault(heading, []).append(m.group(1))
    missing = set(model.model_fields) - {n for names in sections.values() for n in names}
    assert not missing, f"fields not found in {model.__name__}'s source: {sorted(missing)}"
    return sections


def table(model: type[BaseModel], prefix: str, level: str = "##", first_heading: str = "General") -> str:
    out = []
    for heading, names in _sections(model, first_heading).items():
        out += [f"{level} {heading}", "", "| variable | default | what it does |", "|---|---|---|"]
        for name in names:
            field = model.model_fields[name]
            if not field.description:
                raise ValueError(f"{model.__name__}.{name} has no description=; give it one, then run {COMMAND}")
            text = field.description.replace("|", "\\|")
            out.append(f"| `{prefix}{name.upper()}` | {_default(name, field.get_default(call_default_factory=True))} | {text}{_bounds(field)} |")
        out.append("")
    return "\n".join(out)


def render() -> str:
    from shared.settings import Settings
    from simulator.config import ENV_PREFIX, SimulatorConfig

    return "\n".join([
        "# Configuration",
        "",
        f"<!-- Generated from shared/settings.py and simulator/config.py by `{COMMAND}`; edit the descriptions "
        "there. -->",
        "",
        "batchgate reads its settings from environment variables prefixed `BATCHGATE_` (case-insensitive; unknown "
        "names are ignored, so check the spelling). The API, the workers and beat must all see the same values. "
        "Upstream providers with their own keys and limits, and per-tenant options, live in a TOML file named by "
        "`BATCHGATE_PROVIDERS_FILE`: see [providers.example.toml](../providers.example.toml). How a batch's life, "
        "recovery and clean-up use these: [architecture.md](architecture.md).",
        "",
        table(Settings, "BATCHGATE_"),
        "## The simulator",
        "",
        "The built-in upstream (`batchgate-simulator`, started by `make run`) reads these, prefixed "
        f"`{ENV_PREFIX}`.",
        "",
        table(SimulatorConfig, ENV_PREFIX, "###", "Latency and faults"),
    ]).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--write"]:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    elif argv[1:] == ["--check"]:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is out of date; run {COMMAND}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
