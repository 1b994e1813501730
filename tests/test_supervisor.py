"""The restart policy of `batchgate dev`, on a fake clock: back-off, forgetting old deaths, giving up."""

from __future__ import annotations

import signal

from cli.supervisor import GiveUp, Restart, RestartPolicy, describe_exit, tail


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**kwargs) -> tuple[RestartPolicy, Clock]:
    clock = Clock()
    return RestartPolicy(clock=clock, **kwargs), clock


def test_a_dead_child_restarts_after_one_second():
    policy, clock = make()
    assert policy.died("worker") == Restart("worker", 1.0, 1)
    clock.advance(0.9)
    assert policy.due() == []
    clock.advance(0.1)
    assert policy.due() == ["worker"]
    assert policy.due() == [], "a restart is handed out once"


def test_back_off_doubles_then_the_third_death_in_a_minute_gives_up():
    policy, clock = make()
    assert policy.died("simulator").delay_s == 1.0
    clock.advance(5)
    assert policy.died("simulator").delay_s == 2.0
    clock.advance(50)
    assert policy.died("simulator") == GiveUp("simulator", 3, 60.0)
    clock.advance(10)
    assert policy.due() == [] and policy.waiting == {}, "no restart is pending once it gave up"


def test_deaths_older_than_the_window_are_forgotten():
    policy, clock = make()
    policy.died("api")
    clock.advance(30)
    policy.died("api")
    clock.advance(31)  # the first death is now 61 s old
    decision = policy.died("api")
    assert decision == Restart("api", 2.0, 2)
    clock.advance(61)
    assert policy.died("api") == Restart("api", 1.0, 1), "a child that ran a minute starts over at 1 s"


def test_children_are_counted_apart():
    policy, clock = make()
    policy.died("worker")
    policy.died("worker")
    assert isinstance(policy.died("beat"), Restart)
    assert isinstance(policy.died("worker"), GiveUp)


def test_longer_policies_keep_doubling_up_to_the_cap():
    policy, clock = make(max_deaths=10, window_s=3600, max_delay_s=5)
    delays = []
    for _ in range(5):
        delays.append(policy.died("redis").delay_s)
        clock.advance(1)
    assert delays == [1, 2, 4, 5, 5]


def test_several_children_waiting_come_due_in_order():
    policy, clock = make()
    policy.died("worker")
    clock.advance(0.5)
    policy.died("beat")
    assert set(policy.waiting) == {"worker", "beat"}
    clock.advance(0.5)
    assert policy.due() == ["worker"]
    clock.advance(0.5)
    assert policy.due() == ["beat"]


def test_exit_descriptions_and_log_tail(tmp_path):
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(1) == "exit code 1"
    log = tmp_path / "simulator.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "\n\n")
    assert tail(log, 3) == ["line 97", "line 98", "line 99"]
    assert tail(tmp_path / "missing.log") == []
