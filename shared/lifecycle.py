"""A batch's life: its typed record, the table of moves between statuses, and one verb per move.

Nothing else writes a status. A verb is one compare-and-set in Redis that writes, in the same transaction, the new
status, its timestamp (set once), the fields that go with it and the side effects of a terminal move: the tenant's
usage, the webhook event (an outbox entry its deliverer retries) and the clean-up of the batch's working state (an
outbox entry the sweeper carries out). A crash between a status and its side effects cannot happen, because there
is no "between".

What the sweeper does for a batch that stopped making progress lives in `shared/recovery.py`, one rule per status.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import orjson

from shared import events
from shared.schemas import Batch

if TYPE_CHECKING:  # the store imports this module for the record type
    from shared.store import Store

VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING = "validating", "in_progress", "finalizing", "cancelling"
COMPLETED, FAILED, EXPIRED, CANCELLED = "completed", "failed", "expired", "cancelled"
# Planned, and waiting for room under its tenant's max_enqueued_requests; the API shows it as `validating`.
QUEUED = "queued"
STATUSES = (VALIDATING, QUEUED, IN_PROGRESS, FINALIZING, CANCELLING, COMPLETED, FAILED, EXPIRED, CANCELLED)
WIRE_STATUS = {QUEUED: VALIDATING}
TERMINAL = frozenset({COMPLETED, FAILED, EXPIRED, CANCELLED})
ACTIVE = frozenset(STATUSES) - TERMINAL


@dataclass(frozen=True)
class Move:
    verb: str
    froms: tuple[str, ...]
    to: str
    timestamp: str
    why: str

    @property
    def terminal(self) -> bool:
        return self.to in TERMINAL


MOVES: dict[str, Move] = {m.verb: m for m in (
    Move("queue", (VALIDATING,), QUEUED, "queued_at", "planned; over the tenant's enqueued requests"),
    Move("start", (VALIDATING, QUEUED), IN_PROGRESS, "in_progress_at", "input valid, chunks planned, admitted"),
    Move("fail", (VALIDATING, QUEUED), FAILED, "failed_at", "input invalid, or larger than the tenant's cap"),
    Move("cancel", (VALIDATING, QUEUED, IN_PROGRESS), CANCELLING, "cancelling_at", "cancel requested"),
    Move("finalize", (IN_PROGRESS,), FINALIZING, "finalizing_at", "every chunk committed"),
    Move("complete", (FINALIZING,), COMPLETED, "completed_at", "files written"),
    Move("end_cancelled", (CANCELLING,), CANCELLED, "cancelled_at", "cancelled lines written"),
    Move("expire", (VALIDATING, QUEUED, IN_PROGRESS, CANCELLING), EXPIRED, "expired_at", "past expires_at"),
    Move("lose", (IN_PROGRESS, FINALIZING, CANCELLING), FAILED, "failed_at", "input lost from storage"),
    Move("fail_remote", (IN_PROGRESS, FINALIZING, CANCELLING), FAILED, "failed_at",
         "the provider's batch failed (batch_api = native)"),
)}

# A verb asked of a batch already in one of these statuses succeeds without a move: cancelling a batch that is
# cancelling or cancelled changes nothing, and one that is finalizing has no request left to cancel (it completes).
NO_OP: dict[str, frozenset[str]] = {"cancel": frozenset({CANCELLING, CANCELLED, FINALIZING})}

# A forwarded batch (batch_api = native) follows its provider's batch: the moves that bring it level with each status
# the provider reports, in order (each a compare-and-set, so one already made, or not allowed from where the batch
# is, changes nothing). The ending itself is `forward_ending`'s.
FORWARD_MIRROR: dict[str, tuple[str, ...]] = {
    VALIDATING: (),
    IN_PROGRESS: ("start",),
    FINALIZING: ("start", "finalize"),
    CANCELLING: ("cancel",),
    COMPLETED: ("start", "finalize"),
    FAILED: (),
    EXPIRED: (),
    CANCELLED: ("cancel",),
}


def forward_ending(local: str, remote: str, stop: str | None) -> str:
    """The verb that ends a forwarded batch now in status `local` whose provider's batch ended `remote`; `stop` is
    "expired" when batchgate cancelled it for its own window."""
    if remote == FAILED:
        return "fail" if local == VALIDATING else "fail_remote"
    if remote == COMPLETED:
        return "end_cancelled" if local == CANCELLING else "complete"
    if remote == EXPIRED or stop == "expired":
        return "expire"
    return "end_cancelled"


# Why a running batch's chunks stop sending, by the status it will end in.
STOP_ENDINGS = {"cancelled": "end_cancelled", "expired": "expire"}

WEBHOOK_EVENTS = {COMPLETED: "batch.completed", FAILED: "batch.failed", EXPIRED: "batch.expired",
                  CANCELLED: "batch.cancelled"}

TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
              "cancelled_at")
KEPT_TIMESTAMPS = (*TIMESTAMPS, "queued_at")  # the batch object shows TIMESTAMPS; queued_at is batchgate's own

# Token counts are summed from what upstreams report; an absurd figure saturates here instead of overflowing the
# int64 of a Redis counter, or the 2^53 a JavaScript client can hold exactly.
USAGE_CEILING = 2**53 - 1
MICROS = 1_000_000  # a cost is kept in millionths of its currency (shared/providers.py Price)


def diagram() -> str:
    """The table as a Mermaid state diagram (docs/architecture.md holds its output; a test keeps them equal)."""
    lines = ["stateDiagram-v2", f"    [*] --> {VALIDATING}: create"]
    for move in MOVES.values():
        for source in move.froms:
            lines.append(f"    {source} --> {move.to}: {move.verb}")
    lines += [f"    {status} --> [*]" for status in STATUSES if status in TERMINAL]
    return "\n".join(lines) + "\n"


# ---- the record ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSpec:
    """What a batch is: fixed at create and never written again."""

    id: str
    tenant: str
    scope: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    output_ttl_s: int | None = None
    priority: int = 0  # higher runs first among the tenant's batches
    retry_of: str | None = None  # the batch whose failed lines this one retries (POST /v1/batches/{id}/retry)

    def hash_fields(self) -> dict[str, str]:
        fields = {"tenant": self.tenant, "scope": self.scope, "endpoint": self.endpoint,
                  "input_file_id": self.input_file_id, "completion_window": self.completion_window,
                  "created_at": str(self.created_at), "expires_at": str(self.expires_at),
                  "metadata": orjson.dumps(self.metadata).decode()}
        if self.output_ttl_s is not None:
            fields["output_ttl"] = str(self.output_ttl_s)
        if self.priority:
            fields["priority"] = str(self.priority)
        if self.retry_of:
            fields["retry_of"] = self.retry_of
        return fields


@dataclass(frozen=True)
class BatchState:
    """Where a batch is: written only by the verbs of this module and by the plan of its chunks."""

    status: str
    updated_at: int
    timestamps: dict[str, int] = field(default_factory=dict)
    provider: str | None = None  # named at create, or settled when the chunks are planned
    pinned: bool = False  # the provider was named at create (header or virtual key): it takes no share by weight
    model: str | None = None
    total: int = 0
    n_chunks: int | None = None  # None until planned
    stop: str | None = None  # "cancelled" or "expired": the chunks must stop sending
    completed: int | None = None  # final counts, once terminal
    failed: int | None = None
    errors_by_code: dict[str, int] | None = None  # final, once terminal
    usage: dict | None = None
    errors: dict | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    dispatched_at: float = 0.0
    orchestrate_sent_at: float = 0.0
    finalize_sent_at: float = 0.0
    admitted: int = 0  # requests counted against the tenant's max_enqueued_requests until the batch ends
    queued_reason: str | None = None
    # Forwarded whole to the provider's own Batch API (batch_api = native; workers/forward.py): where that stands.
    forwarded: bool = False
    provider_file_id: str | None = None  # the input, uploaded to the provider
    provider_batch_id: str | None = None
    upload_started_at: float = 0.0  # an upload / a create was begun: a re-run looks for it before doing it again
    create_started_at: float = 0.0
    forward_chain: str | None = None  # the token of the one forward step that may run next (older ones are dropped)
    forward_due_at: float = 0.0  # when that step is due; the sweeper sends a new one when it is long overdue
    forward_interval: float = 0.0  # the poll interval now (backs off while the provider's counts stand still)
    cancel_sent_at: float = 0.0  # when the provider's batch was last asked to cancel
    forward_seen: str | None = None  # the provider's "status:completed:failed" at the last poll
    retried_by: tuple[str, ...] = ()  # the batches made by retrying this one's failed lines, oldest first

    @property
    def planned(self) -> bool:
        return self.n_chunks is not None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _float(value: str | None) -> float:
    return float(value) if value else 0.0


def _json(value: str | None) -> Any:
    return orjson.loads(value) if value else None


RETRIED_BY_PREFIX = "retried_by:"  # a field per retry, "retried_by:<new id>" = its sequence (shared/store.py)


def retried_by(f: dict[str, str]) -> tuple[str, ...]:
    """The ids of the batches retrying this one, in the order they were made."""
    found = [(int(v), k[len(RETRIED_BY_PREFIX):]) for k, v in f.items() if k.startswith(RETRIED_BY_PREFIX)]
    return tuple(batch_id for _, batch_id in sorted(found))


@dataclass(frozen=True)
class BatchRecord:
    spec: BatchSpec
    state: BatchState

    @property
    def id(self) -> str:
        return self.spec.id

    @classmethod
    def from_hash(cls, batch_id: str, f: dict[str, str]) -> "BatchRecord":
        """Decode the batch hash; records written before this module (no `tenant`, say) decode too."""
        spec = BatchSpec(
            id=batch_id, tenant=f.get("tenant", ""), scope=f.get("scope", ""), endpoint=f["endpoint"],
            input_file_id=f["input_file_id"], completion_window=f.get("completion_window") or "24h",
            created_at=int(f["created_at"]), expires_at=int(f.get("expires_at") or 0),
            metadata=_json(f.get("metadata")), output_ttl_s=_int(f.get("output_ttl")),
            priority=int(f.get("priority") or 0), retry_of=f.get("retry_of") or None,
        )
        state = BatchState(
            status=f["status"], updated_at=int(f.get("updated_at") or f["created_at"]),
            timestamps={name: int(f[name]) for name in KEPT_TIMESTAMPS if f.get(name)},
            provider=f.get("provider") or None, pinned=f.get("provider_pinned") == "1", model=f.get("model") or None, total=int(f.get("total") or 0),
            n_chunks=_int(f.get("n_chunks")), stop=f.get("stop") or None,
            completed=_int(f.get("completed")), failed=_int(f.get("failed")), usage=_json(f.get("usage")),
            errors_by_code=_json(f.get("errors_by_code")),
            errors=_json(f.get("errors")), output_file_id=f.get("output_file_id") or None,
            error_file_id=f.get("error_file_id") or None, dispatched_at=_float(f.get("dispatched_at")),
            orchestrate_sent_at=_float(f.get("orchestrate_sent_at")), finalize_sent_at=_float(f.get("finalize_sent_at")),
            admitted=int(f.get("admitted") or 0), queued_reason=f.get("queued_reason") or None,
            forwarded=f.get("forward") == "1", provider_file_id=f.get("provider_file_id") or None,
            provider_batch_id=f.get("provider_batch_id") or None,
            upload_started_at=_float(f.get("upload_started_at")), create_started_at=_float(f.get("create_started_at")),
            forward_chain=f.get("forward_chain") or None, forward_due_at=_float(f.get("forward_due_at")),
            forward_interval=_float(f.get("forward_interval")), cancel_sent_at=_float(f.get("cancel_sent_at")),
            forward_seen=f.get("forward_seen") or None, retried_by=retried_by(f),
        )
        return cls(spec, state)

    def to_batch(self, live_completed: int, live_failed: int, queue_position: int | None = None,
                 live_codes: dict[str, int] | None = None) -> Batch:
        """The API's object. Live counts (committed chunks plus durable progress) show until final ones exist;
        `live_codes` are the error codes of the committed chunks."""
        s, st = self.spec, self.state
        completed = st.completed if st.completed is not None else live_completed
        failed = st.failed if st.failed is not None else live_failed
        codes = st.errors_by_code if st.errors_by_code is not None else (live_codes or {})
        # Of the failed, the lines never sent: the batch was cancelled, or its window ran out.
        cancelled, expired = codes.get("batch_cancelled", 0), codes.get("batch_expired", 0)
        data: dict[str, Any] = {
            "id": s.id, "endpoint": s.endpoint, "model": st.model, "errors": st.errors,
            "input_file_id": s.input_file_id, "completion_window": s.completion_window,
            "status": WIRE_STATUS.get(st.status, st.status),
            "output_file_id": st.output_file_id, "error_file_id": st.error_file_id, "created_at": s.created_at,
            "expires_at": s.expires_at or None,
            "request_counts": {"total": st.total, "completed": completed, "failed": failed,
                               "cancelled": cancelled, "expired": expired, "succeeded": completed,
                               "errored": failed - cancelled - expired,
                               "processing": 0 if st.terminal else max(0, st.total - completed - failed),
                               "errors_by_code": dict(sorted(codes.items()))},
            "usage": st.usage, "metadata": s.metadata, "priority": s.priority,
            "provider_batch_id": st.provider_batch_id,
            "retry_of": s.retry_of, "retried_by": list(st.retried_by),
        }
        if st.status == QUEUED:
            data["queued_reason"] = st.queued_reason
            data["queue_position"] = queue_position
        for name in TIMESTAMPS:
            data[name] = st.timestamps.get(name)
        return Batch.model_validate(data)


# ---- moves and their side effects -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ending:
    """What a terminal move records with the status: the final counts, usage and files, or why the batch failed."""

    completed: int = 0
    failed: int = 0
    usage: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict] | None = None
    codes: dict[str, int] | None = None  # the error file's lines by code
    # The usage's cost in millionths of `currency` (the model's [prices] entry; Lifecycle.end fills it), or None
    # when the model has no price.
    cost_micros: int | None = None
    currency: str | None = None

    def fields(self) -> dict[str, str]:
        out = {"completed": str(self.completed), "failed": str(self.failed)}
        if self.codes is not None:
            out["errors_by_code"] = orjson.dumps(self.codes).decode()
        if any(self.usage):
            out["usage"] = orjson.dumps(batch_usage(self.usage, self.cost_micros, self.currency)).decode()
        if self.output_file_id:
            out["output_file_id"] = self.output_file_id
        if self.error_file_id:
            out["error_file_id"] = self.error_file_id
        if self.errors is not None:
            out["errors"] = orjson.dumps({"object": "list", "data": self.errors}).decode()
        return out


def saturate(values: list[int]) -> list[int]:
    return [min(max(0, v), USAGE_CEILING) for v in values]


def batch_usage(values: list[int], cost_micros: int | None = None, currency: str | None = None) -> dict:
    input_tokens, cached, output_tokens, reasoning, total = saturate(values)
    usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
             "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning},
             "total_tokens": total}
    if cost_micros is not None:  # batchgate's extension: the usage at the model's price
        usage |= {"cost": cost_micros / MICROS, "currency": currency}
    return usage


def webhook_event_id(batch_id: str, event_type: str) -> str:
    return "evt_" + hashlib.sha256(f"{batch_id}:{event_type}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Effects:
    """The side effects a terminal move writes in its own transaction."""

    tenant: str
    usage: list[int]
    completed: int
    failed: int
    webhook_event: str | None  # the event id, when the tenant wants webhooks
    webhook_type: str | None
    cleanup_at: float
    cost_micros: int = 0  # added to the tenant's cost in `currency`, in total and on `day` (UTC, of the move)
    currency: str = ""
    day: str = ""


@dataclass(frozen=True)
class Outcome:
    moved: bool
    status: str  # the status before the call (the current one, when not moved)


class Lifecycle:
    """The verbs. `wants_webhooks(tenant)` says whether a tenant has a webhook; `cleanup_delay_s` how long a
    finished batch's working state is kept (so a Redis restored a little older can still finish it);
    `cost(model, usage)` prices an ending's usage: (micro-units, currency), or None for a model without a price
    (ProviderRegistry.cost)."""

    def __init__(self, store: "Store", *, cleanup_delay_s: float, wants_webhooks=lambda tenant: False,
                 cost=lambda model, usage: None) -> None:
        self.store = store
        self.cleanup_delay_s = cleanup_delay_s
        self.wants_webhooks = wants_webhooks
        self.cost = cost

    def _move(self, batch_id: str, verb: str, now: float, fields: dict[str, str] | None = None,
              ending: Ending | None = None, tenant: str = "", created_at: int = 0) -> Outcome:
        move = MOVES[verb]
        effects = None
        if move.terminal:
            ending = ending or Ending()
            fields = {**(fields or {}), **ending.fields()}
            event_type = WEBHOOK_EVENTS[move.to]
            wants = self.wants_webhooks(tenant)
            effects = Effects(tenant=tenant, usage=saturate(ending.usage), completed=ending.completed,
                              failed=ending.failed,
                              webhook_event=webhook_event_id(batch_id, event_type) if wants else None,
                              webhook_type=event_type if wants else None, cleanup_at=now + self.cleanup_delay_s,
                              cost_micros=ending.cost_micros or 0, currency=ending.currency or "",
                              day=time.strftime("%Y-%m-%d", time.gmtime(now)))
        moved, status = self.store.apply_move(batch_id, move, int(now), fields or {}, effects)
        if moved and move.terminal:
            events.ended(batch_id, move.to, ending, now - created_at if created_at else None, move.why)
        return Outcome(moved, status)

    # One verb per move.

    def queue(self, record: BatchRecord, now: float, reason: str) -> Outcome:
        return self._move(record.id, "queue", now, {"queued_reason": reason})

    def start(self, record: BatchRecord, now: float) -> Outcome:
        return self._move(record.id, "start", now)

    def fail(self, record: BatchRecord, now: float, errors: list[dict]) -> Outcome:
        return self._move(record.id, "fail", now, ending=Ending(errors=errors), tenant=record.spec.tenant,
                          created_at=record.spec.created_at)

    def cancel(self, batch_id: str, now: float) -> Outcome:
        """Not moved from a status in NO_OP["cancel"] is a success too: there is nothing (left) to cancel."""
        return self._move(batch_id, "cancel", now)

    def begin_finalize(self, record: BatchRecord, now: float) -> Outcome:
        return self._move(record.id, "finalize", now)

    def mirror(self, record: BatchRecord, remote_status: str, now: float) -> str:
        """Bring a forwarded batch level with its provider's batch (FORWARD_MIRROR); returns its status after."""
        status = record.state.status
        for verb in FORWARD_MIRROR.get(remote_status, ()):
            outcome = self._move(record.id, verb, now)
            status = MOVES[verb].to if outcome.moved else outcome.status
        return status

    def end(self, record: BatchRecord, verb: str, now: float, ending: Ending) -> Outcome:
        """A terminal move with its results: `complete`, `end_cancelled`, `expire`, `lose` or `fail_remote` (and
        `fail`, for a forwarded batch whose provider refused it while it was validating)."""
        assert MOVES[verb].terminal, verb
        if ending.cost_micros is None and any(ending.usage):
            priced = self.cost(record.state.model, saturate(ending.usage))
            if priced is not None:
                ending = replace(ending, cost_micros=priced[0], currency=priced[1])
        return self._move(record.id, verb, now, ending=ending, tenant=record.spec.tenant,
                          created_at=record.spec.created_at)
