"""The architecture's rules, checked on the shipped source: one owner per concept stays one owner."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("api", "workers", "shared", "cli", "simulator")
STORE_MODULES = re.compile(r"^shared/store[\w]*\.py$")


def shipped_files() -> list[tuple[str, str]]:
    out = []
    for package in SHIPPED:
        for path in sorted((ROOT / package).rglob("*.py")):
            out.append((path.relative_to(ROOT).as_posix(), path.read_text()))
    assert len(out) > 40, "the walk found the project's modules"
    return out


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_store_modules_talk_to_redis():
    offenders = []
    for name, source in shipped_files():
        if STORE_MODULES.match(name):
            continue
        tree = ast.parse(source)
        if "redis" in _imports(tree):
            offenders.append(f"{name}: imports redis")
        for node in ast.walk(tree):
            # `<something>.r.<command>(...)`: the store's raw client used from outside.
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "r":
                offenders.append(f"{name}:{node.lineno}: .r.{node.attr}")
    assert offenders == []


def test_key_names_live_in_the_keys_module():
    offenders = [name for name, source in shipped_files()
                 if name != "shared/keys.py" and re.search(r"""["']bg:""", source)]
    assert offenders == []


def test_workers_read_batches_through_the_typed_record():
    pattern = re.compile(r"""fields\[|fields\.get\(|\.batch_fields\(|\.hget|\.hgetall\(""")
    offenders = [f"{name}: {m.group(0)}" for name, source in shipped_files() if name.startswith("workers/")
                 for m in pattern.finditer(source)]
    assert offenders == []


def test_only_the_lifecycle_writes_a_status():
    offenders = []
    for name, source in shipped_files():
        if name in ("shared/lifecycle.py", "shared/lua.py", "shared/store.py") or name.startswith("simulator/"):
            continue  # (the simulator's "status" fields are the upstream's own objects)
        for m in re.finditer(r"""["']status["']\s*[:,]\s*["'](validating|in_progress|finalizing|completed|failed|"""
                             r"""expired|cancelling|cancelled)""", source):
            offenders.append(f"{name}: {m.group(0)}")
        if "apply_move(" in source:
            offenders.append(f"{name}: apply_move")
    assert offenders == []


def test_no_test_harness_in_shipped_code():
    offenders = [name for name, source in shipped_files() if "psutil" in _imports(ast.parse(source))]
    assert offenders == []


def test_the_store_mixins_do_not_overwrite_each_others_scripts():
    """Store is one object made of several mixins; a script attribute named twice silently runs the wrong Lua."""
    import re

    seen: dict[str, str] = {}
    for path in sorted((ROOT / "shared").glob("store*.py")):
        for name in re.findall(r"self\.(\w+) = client\.register_script", path.read_text()):
            assert name not in seen, f"{name} is registered in {seen.get(name)} and in {path.name}"
            seen[name] = path.name
    assert len(seen) > 10
