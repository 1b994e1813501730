"""Keeping `batchgate dev`'s children running: restart one that died, with back-off; give up on one that keeps dying.

Two parts, so the policy can be tested without processes or waiting:
- `RestartPolicy` decides, from the times a child died (its clock is injected), whether and when to restart it.
- `SupervisedGroup` applies it to the processes of a `ProcessGroup`: it notices exits, restarts children when due,
  and raises `ChildKeepsDying` with the child's log file when the policy gives up.

What the user sees goes through one `report` callable, and children are started from `ChildSpec`s (name, command,
environment, how to tell it is up), so how ports are chosen and what the console shows can change on their own.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cli.stack import ProcessGroup


@dataclass(frozen=True)
class Restart:
    """Start the child again after `delay_s`; it has died `deaths` times within the window."""

    name: str
    delay_s: float
    deaths: int


@dataclass(frozen=True)
class GiveUp:
    """The child died `deaths` times within `window_s`: stop everything."""

    name: str
    deaths: int
    window_s: float


class RestartPolicy:
    """Back-off doubling from `first_delay_s` per recent death (1 s, 2 s, 4 s...); `max_deaths` within `window_s`
    gives up. Deaths older than the window are forgotten, so a child that ran a while starts again at 1 s."""

    def __init__(self, *, max_deaths: int = 3, window_s: float = 60.0, first_delay_s: float = 1.0,
                 max_delay_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_deaths = max_deaths
        self.window_s = window_s
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.clock = clock
        self._deaths: dict[str, deque[float]] = {}
        self._restart_at: dict[str, float] = {}

    def died(self, name: str) -> Restart | GiveUp:
        now = self.clock()
        deaths = self._deaths.setdefault(name, deque())
        deaths.append(now)
        while deaths and deaths[0] <= now - self.window_s:
            deaths.popleft()
        if len(deaths) >= self.max_deaths:
            self._restart_at.pop(name, None)
            return GiveUp(name, len(deaths), self.window_s)
        delay = min(self.first_delay_s * 2 ** (len(deaths) - 1), self.max_delay_s)
        self._restart_at[name] = now + delay
        return Restart(name, delay, len(deaths))

    def due(self) -> list[str]:
        """Children whose back-off is over, in the order they died; each is returned once."""
        now = self.clock()
        ready = [name for name, at in self._restart_at.items() if at <= now]
        for name in ready:
            del self._restart_at[name]
        return ready

    @property
    def waiting(self) -> dict[str, float]:
        """Children waiting to be restarted, with the clock time of their restart."""
        return dict(self._restart_at)


@dataclass(frozen=True)
class ChildSpec:
    name: str
    command: list[str]
    env: dict[str, str] | None = None


class ChildKeepsDying(Exception):
    """A child died too often; `log_file` holds its output, `last_lines` the end of it."""

    def __init__(self, decision: GiveUp, exit_status: str, log_file: Path | None, last_lines: list[str]) -> None:
        super().__init__(f"{decision.name} died {decision.deaths} times within {decision.window_s:g}s")
        self.decision = decision
        self.name = decision.name
        self.exit_status = exit_status
        self.log_file = log_file
        self.last_lines = last_lines


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def tail(path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last non-empty lines of a file, reading at most its last `max_bytes`."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


@dataclass
class SupervisedGroup:
    """Children of a `ProcessGroup` that are restarted by a `RestartPolicy` when they die."""

    group: ProcessGroup
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    report: Callable[[str], None] = print
    tail_lines: int = 20
    specs: dict[str, ChildSpec] = field(default_factory=dict)
    tick: Callable[[], None] = lambda: None  # called at every check, e.g. to show new log lines

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.specs[name] = ChildSpec(name, command, env)
        return self.group.start(name, command, env)

    def log_file(self, name: str) -> Path | None:
        return None if self.group.log_dir is None else self.group.log_dir / f"{name}.log"

    def check(self) -> None:
        """Notice children that exited and restart those whose back-off is over; raise `ChildKeepsDying`."""
        self.tick()
        for name, proc in list(self.group.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            self.group.reap(name)  # whatever the dead child left in its process group goes too
            status = describe_exit(code)
            decision = self.policy.died(name)
            if isinstance(decision, GiveUp):
                log_file = self.log_file(name)
                lines = tail(log_file, self.tail_lines) if log_file is not None else []
                raise ChildKeepsDying(decision, status, log_file, lines)
            self.report(f"{name} exited ({status}); restarting it in {decision.delay_s:g}s")
        for name in self.policy.due():
            spec = self.specs[name]
            self.group.start(spec.name, spec.command, spec.env)
            self.report(f"{name} restarted")

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
        """Supervise until `ready()` holds; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not come up within {timeout:g}s")
            time.sleep(interval)

    def run(self, interval: float = 0.5) -> None:
        """Supervise until a child keeps dying (`ChildKeepsDying`) or the caller is interrupted."""
        while True:
            self.check()
            time.sleep(interval)

    def stop_all(self) -> None:
        self.group.stop_all()
