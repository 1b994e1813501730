"""What the sweeper does for a batch that stopped making progress: one rule per non-terminal status.

The rules only decide, from the batch's record and the facts of its execution state, so they are tested without
Redis or workers; `workers/sweeper.py` carries the actions out. Every action is safe to repeat: moves are
compare-and-sets, chunk runs are fenced by leases, finalize is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.lifecycle import CANCELLING, FINALIZING, IN_PROGRESS, QUEUED, VALIDATING, BatchRecord
from shared.store_exec import ExecutionFacts


@dataclass(frozen=True)
class Timing:
    redrive_after_s: float  # how long a sent message may go unanswered before it is sent again


@dataclass(frozen=True)
class Action:
    kind: str  # see ACTIONS
    chunks: tuple[int, ...] = ()
    reason: str | None = None


ACTIONS = {
    "orchestrate": "send the batch's orchestrate message again",
    "start": "move a planned `validating` batch on to `in_progress` and send its chunks",
    "expire": "end an unplanned (or still waiting) batch `expired`",
    "admit": "let in the batches waiting in the tenant's line that now fit under its cap, and start them",
    "end_cancelled": "end an unplanned `cancelling` batch `cancelled`",
    "stop": "tell the batch's chunks to stop sending (reason: expired)",
    "close_chunks": "write the stop reason's error lines for chunks no run holds, and commit them",
    "redrive_chunks": "release to the scheduler again the chunks whose run was lost",
    "finalize": "send the batch's finalize message again",
    "forward": "start a new chain of forward steps for a batch forwarded to its provider's Batch API",
}


def _since(now: float, *moments: float) -> float:
    return now - max(moments) if any(moments) else float("inf")


def recover_validating(record: BatchRecord, facts: ExecutionFacts | None, now: float, t: Timing) -> list[Action]:
    st = record.state
    if not st.planned:
        if now >= record.spec.expires_at:
            return [Action("expire")]
        if _since(now, st.updated_at, st.orchestrate_sent_at) > t.redrive_after_s:
            return [Action("orchestrate")]
        return []
    # Planned, but the move to in_progress never happened: the orchestrate run died between the two.
    if _since(now, st.dispatched_at) > t.redrive_after_s:
        return [Action("start")]
    return []


def recover_queued(record: BatchRecord, facts: ExecutionFacts | None, now: float, t: Timing) -> list[Action]:
    """Waiting for room under its tenant's cap: never started early, only when the line lets it in. Past its window
    its planned requests end as `batch_expired` lines, as a running batch's unsent ones do."""
    st = record.state
    if now >= record.spec.expires_at:
        return _running(record, facts, now, t, st.stop) if facts is not None else [Action("expire")]
    if st.admitted:
        # Let in, but the run that did so died before starting it.
        if _since(now, st.updated_at, st.orchestrate_sent_at) > t.redrive_after_s:
            return [Action("start")]
        return []
    return [Action("admit")]


def _running(record: BatchRecord, facts: ExecutionFacts, now: float, t: Timing, stop: str | None) -> list[Action]:
    st = record.state
    actions: list[Action] = []
    if stop is None and now >= record.spec.expires_at:
        actions.append(Action("stop", reason="expired"))
        stop = "expired"
    n_chunks = st.n_chunks or 0
    missing = [i for i in range(n_chunks) if i not in facts.done]
    if not missing:
        if not facts.finalize_leased and _since(now, st.finalize_sent_at) > t.redrive_after_s \
                and _since(now, st.updated_at) > t.redrive_after_s / 2:
            actions.append(Action("finalize"))
        return actions
    unheld = [i for i in missing if i not in facts.leased]
    if stop is not None:
        # Stopped chunks need no upstream: their lines are written here, not after a backlog of other batches.
        if unheld:
            actions.append(Action("close_chunks", tuple(unheld), stop))
        return actions
    lost = []
    for index in unheld:
        if index in facts.ready or _since(now, facts.redriven.get(index, 0.0), st.dispatched_at) <= t.redrive_after_s:
            continue
        # Neither waiting in the scheduler, nor held by a live run, nor committed: its run (or its release) was lost.
        lost.append(index)
    if lost:
        actions.append(Action("redrive_chunks", tuple(lost)))
    return actions


def recover_in_progress(record: BatchRecord, facts: ExecutionFacts, now: float, t: Timing) -> list[Action]:
    return _running(record, facts, now, t, record.state.stop)


def recover_cancelling(record: BatchRecord, facts: ExecutionFacts | None, now: float, t: Timing) -> list[Action]:
    if not record.state.planned or facts is None:
        return [Action("end_cancelled")]
    return _running(record, facts, now, t, record.state.stop or "cancelled")


def recover_finalizing(record: BatchRecord, facts: ExecutionFacts, now: float, t: Timing) -> list[Action]:
    if not facts.finalize_leased and _since(now, record.state.finalize_sent_at) > t.redrive_after_s:
        return [Action("finalize")]
    return []


def recover_forwarded(record: BatchRecord, now: float, t: Timing, leased: bool) -> list[Action]:
    """A batch forwarded whole to its provider (batch_api = native), in any status: its chain of forward steps
    polls, mirrors, passes cancel and expiry on and ends it. A chain whose due step is overdue by the re-drive time
    and that no step is running (the message or its worker was lost) is started again."""
    st = record.state
    if not leased and _since(now, st.forward_due_at, st.updated_at) > t.redrive_after_s:
        return [Action("forward")]
    return []


def recover(record: BatchRecord, facts: ExecutionFacts | None, now: float, t: Timing,
            forward_leased: bool = False) -> list[Action]:
    """The actions for one active batch. `facts` is None for a batch that has no plan yet; `forward_leased` says
    whether a forward step holds a forwarded batch's lease."""
    status = record.state.status
    if record.state.forwarded:
        return recover_forwarded(record, now, t, forward_leased)
    if status == VALIDATING:
        return recover_validating(record, facts, now, t)
    if status == QUEUED:
        return recover_queued(record, facts, now, t)
    if status == CANCELLING:
        return recover_cancelling(record, facts, now, t)
    if facts is None:
        return []
    if status == IN_PROGRESS:
        return recover_in_progress(record, facts, now, t)
    if status == FINALIZING:
        return recover_finalizing(record, facts, now, t)
    return []
