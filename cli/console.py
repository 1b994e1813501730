"""What `batchgate dev` shows on its console from its children's logs: batch events, warnings and errors.

Each child writes everything to `<data-dir>/logs/<name>.log`; `LogTail` follows those files and picks the lines a
person needs — the `batchgate.events` lines (a batch created, completed, failed...) and anything at WARNING or
above — one console line each, with the time and, for a warning, which process said it. Lines are read in the
text format (`BATCHGATE_LOG_FORMAT=text`, dev's default) or as JSON objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson

EVENTS_LOGGER = "batchgate.events"
SHOWN_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})
# shared/logs.py's text format: "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(batch_id)s] %(message)s"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d (?P<time>\d\d:\d\d:\d\d),\d+ (?P<level>[A-Z]+) (?P<logger>\S+) "
                       r"\[\S+ \S+\] (?P<message>.*)$")


@dataclass(frozen=True)
class Entry:
    time: str
    level: str
    logger: str
    message: str


def parse(line: str) -> Entry | None:
    """A log record's first line, or None for anything else (a traceback's lines, a banner, redis' own log)."""
    if line.startswith("{"):
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or "message" not in data:
            return None
        stamp = str(data.get("time", ""))
        found = re.search(r"\d\d:\d\d:\d\d", stamp)
        return Entry(found.group(0) if found else "", str(data.get("level", "")), str(data.get("logger", "")),
                     str(data["message"]))
    matched = TEXT_LINE.match(line)
    if matched is None:
        return None
    return Entry(matched["time"], matched["level"], matched["logger"], matched["message"])


def console_line(entry: Entry, source: str, log_file: Path) -> str | None:
    """How the console shows a record, or None when it does not."""
    if entry.logger == EVENTS_LOGGER:
        return f"{entry.time} {entry.message}"
    if entry.level in SHOWN_LEVELS:
        more = f" (more in {log_file})" if entry.level != "WARNING" else ""
        return f"{entry.time} {entry.level} {source}: {entry.message}{more}"
    return None


@dataclass
class LogTail:
    """Follows every `*.log` in `log_dir` from where it ended when the tail was made (the files are appended to
    across runs); `poll()` returns the console lines written since the last poll."""

    log_dir: Path
    offsets: dict[Path, int] = field(default_factory=dict)
    partial: dict[Path, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for path in self.log_dir.glob("*.log"):
            self.offsets[path] = path.stat().st_size

    def poll(self) -> list[str]:
        shown: list[str] = []
        for path in sorted(self.log_dir.glob("*.log")):
            try:
                with path.open("rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
                    self.offsets[path] = f.tell()
            except FileNotFoundError:
                continue
            data = self.partial.pop(path, b"") + data
            *lines, rest = data.split(b"\n")
            if rest:
                self.partial[path] = rest
            for raw in lines:
                entry = parse(raw.decode(errors="replace").rstrip("\r"))
                if entry is not None and (line := console_line(entry, path.stem, path)) is not None:
                    shown.append(line)
        return shown
