"""A batch's execution state in Redis: its plan of chunks, chunk leases, durable result segments and commits.

A chunk run holds a lease (a token with an expiry it keeps renewing). Its finished lines become durable in small
segments: the lines go to a blob first, then one Lua call, fenced by the lease, records the segment, marks its
positions in the chunk's bitmap and adds to the live progress. A later run of the chunk skips every marked position,
so a crash re-sends at most what was in flight or not yet made durable. The first commit of a chunk wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
import redis

from shared import keys, lua

# A batch's progress history (shared/progress.py): at most one sample every SAMPLE_GAP_MS (more once the run is long),
# at most SAMPLES_MAX kept.
SAMPLE_GAP_MS = 2000
SAMPLES_MAX = 500


@dataclass(frozen=True)
class ChunkSpec:
    """A contiguous byte range of the input file holding `n_lines` requests, the first at line `first_line`."""

    index: int
    start: int
    end: int
    first_line: int
    n_lines: int

    def encode(self) -> str:
        return f"{self.start},{self.end},{self.first_line},{self.n_lines}"

    @classmethod
    def decode(cls, index: int, raw: str | bytes) -> "ChunkSpec":
        text = raw.decode() if isinstance(raw, bytes) else raw
        start, end, first_line, n_lines = (int(x) for x in text.split(","))
        return cls(index, start, end, first_line, n_lines)


@dataclass(frozen=True)
class Segment:
    """Result lines made durable together: `out` output lines and `err` error lines, at chunk positions `pos`, with
    the error lines counted by code (`ResultLine.code`)."""

    run: str
    seq: int
    out: int
    err: int
    usage: list[int]
    pos: list[int]
    codes: dict[str, int] = field(default_factory=dict)  # the error lines' codes, counted

    def as_dict(self) -> dict:
        d = {"run": self.run, "seq": self.seq, "out": self.out, "err": self.err, "usage": self.usage, "pos": self.pos}
        return d | ({"codes": self.codes} if self.codes else {})

    def encode(self) -> str:
        return orjson.dumps(self.as_dict()).decode()

    @classmethod
    def from_dict(cls, d: dict) -> "Segment":
        return cls(d["run"], d["seq"], d["out"], d["err"], d["usage"], d["pos"], d.get("codes") or {})

    @classmethod
    def decode(cls, raw: str) -> "Segment":
        return cls.from_dict(orjson.loads(raw))


@dataclass(frozen=True)
class ChunkCommit:
    """A committed chunk: its counts and where its lines are. Versions before segments wrote one part per run."""

    completed: int
    failed: int
    usage: list[int]
    segments: list[Segment] | None = None
    run: str | None = None  # the single-part layout of earlier versions
    extra: dict = field(default_factory=dict)

    def encode(self) -> str:
        return orjson.dumps({"completed": self.completed, "failed": self.failed, "usage": self.usage,
                             "segments": [s.as_dict() for s in self.segments or []], **self.extra}).decode()

    @classmethod
    def decode(cls, raw: str) -> "ChunkCommit":
        d = orjson.loads(raw)
        segments = [Segment.from_dict(s) for s in d["segments"]] if "segments" in d else None
        extra = {k: v for k, v in d.items() if k not in ("completed", "failed", "usage", "segments")}
        return cls(d["completed"], d["failed"], d.get("usage") or [0, 0, 0, 0, 0], segments, d.get("run"), extra)


class SegmentRejected(Exception):
    """The run no longer holds its chunk's lease (or the chunk committed): it must stop without writing more."""


@dataclass(frozen=True)
class ExecutionFacts:
    """What the sweeper needs to know of a planned batch's chunks, read in one round trip."""

    done: set[int]
    leased: set[int]
    started: set[int]
    redriven: dict[int, float]
    finalize_leased: bool
    ready: frozenset[int] = frozenset()  # released to the scheduler and not yet taken


class ExecutionStore:
    def __init__(self, client: redis.Redis) -> None:
        self._commit_segment = client.register_script(lua.COMMIT_SEGMENT)
        self._commit_chunk = client.register_script(lua.COMMIT_CHUNK)
        self._sample_progress = client.register_script(lua.SAMPLE_PROGRESS)
        self._reset_progress = client.register_script(lua.RESET_PROGRESS)
        self._bitmap_hex = client.register_script(lua.BITMAP_HEX)
        self._renew_lease = client.register_script(lua.RENEW_LEASE)
        self._release_lease = client.register_script(lua.RELEASE_LEASE)

    r: redis.Redis

    # ---- the plan ---------------------------------------------------------------------------------------------

    def save_plan(self, batch_id: str, chunks: list[ChunkSpec], fields: dict[str, str]) -> None:
        bk = keys.BatchKeys(batch_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(bk.plan)
        if chunks:
            pipe.rpush(bk.plan, *(c.encode() for c in chunks))
        pipe.hset(bk.record, mapping={**fields, "n_chunks": str(len(chunks))})
        pipe.execute()

    def plan(self, batch_id: str) -> list[ChunkSpec]:
        return [ChunkSpec.decode(i, raw) for i, raw in enumerate(self.r.lrange(keys.BatchKeys(batch_id).plan, 0, -1))]

    def chunk(self, batch_id: str, index: int) -> ChunkSpec | None:
        raw = self.r.lindex(keys.BatchKeys(batch_id).plan, index)
        return ChunkSpec.decode(index, raw) if raw is not None else None

    def done_chunks(self, batch_id: str) -> set[int]:
        return {int(x) for x in self.r.smembers(keys.BatchKeys(batch_id).done)}

    def chunk_commits(self, batch_id: str) -> dict[int, ChunkCommit]:
        raw = self.r.hgetall(keys.BatchKeys(batch_id).counts)
        return {int(k): ChunkCommit.decode(v) for k, v in raw.items()}

    def chunk_attempt(self, batch_id: str, index: int) -> int:
        return int(self.r.hincrby(keys.BatchKeys(batch_id).attempts, str(index), 1))

    # ---- leases -----------------------------------------------------------------------------------------------

    def acquire_lease(self, batch_id: str, index: int, token: str, ttl_s: float) -> bool:
        return bool(self.r.set(keys.BatchKeys(batch_id).lease(index), token, nx=True, px=int(ttl_s * 1000)))

    def renew_lease(self, batch_id: str, index: int, token: str, ttl_s: float) -> bool:
        return bool(self._renew_lease(keys=[keys.BatchKeys(batch_id).lease(index)], args=[token, int(ttl_s * 1000)]))

    def release_lease(self, batch_id: str, index: int, token: str) -> None:
        self._release_lease(keys=[keys.BatchKeys(batch_id).lease(index)], args=[token])

    def acquire_finalize_lease(self, batch_id: str, token: str, ttl_s: float) -> bool:
        return bool(self.r.set(keys.BatchKeys(batch_id).finalize_lease, token, nx=True, px=int(ttl_s * 1000)))

    def renew_finalize_lease(self, batch_id: str, token: str, ttl_s: float) -> bool:
        return bool(self._renew_lease(keys=[keys.BatchKeys(batch_id).finalize_lease], args=[token, int(ttl_s * 1000)]))

    def release_finalize_lease(self, batch_id: str, token: str) -> None:
        self._release_lease(keys=[keys.BatchKeys(batch_id).finalize_lease], args=[token])

    # ---- durable results --------------------------------------------------------------------------------------

    def finished_positions(self, batch_id: str, index: int, n_lines: int) -> set[int]:
        """Positions of the chunk whose lines are durable already."""
        data = bytes.fromhex(self._bitmap_hex(keys=[keys.BatchKeys(batch_id).finished(index)]) or "")
        return {pos for pos in range(min(n_lines, len(data) * 8)) if data[pos >> 3] & (0x80 >> (pos & 7))}

    def segments(self, batch_id: str, index: int) -> list[Segment]:
        return [Segment.decode(raw) for raw in self.r.lrange(keys.BatchKeys(batch_id).segments(index), 0, -1)]

    def begin_run(self, batch_id: str, index: int, token: str) -> list[Segment]:
        """A run that holds the lease: the segments earlier runs made durable, with live progress set to match them."""
        segments = self.segments(batch_id, index)
        bk = keys.BatchKeys(batch_id)
        self._reset_progress(keys=[bk.lease(index), bk.progress, bk.done],
                             args=[token, index, sum(s.out for s in segments), sum(s.err for s in segments)])
        return segments

    def commit_segment(self, batch_id: str, index: int, token: str, segment: Segment, lease_s: float) -> None:
        """Record a segment whose blobs are written; renews the lease. Raises SegmentRejected when fenced off."""
        bk = keys.BatchKeys(batch_id)
        pipe = self.r.pipeline(transaction=False)
        self._commit_segment(
            keys=[bk.lease(index), bk.finished(index), bk.segments(index), bk.progress, bk.done],
            args=[token, index, segment.encode(), segment.out, segment.err, int(lease_s * 1000), *segment.pos],
            client=pipe,
        )
        self.queue_progress_sample(pipe, batch_id)
        result, _ = pipe.execute()
        if int(result) != 1:
            raise SegmentRejected(f"{batch_id} chunk {index}: segment refused ({result})")

    def commit_chunk(self, batch_id: str, index: int, token: str, commit: ChunkCommit, n_chunks: int
                     ) -> tuple[bool, bool]:
        """Record a chunk's final counts once, fenced by the lease. Returns (this call committed it, every chunk
        is now committed)."""
        bk = keys.BatchKeys(batch_id)
        pipe = self.r.pipeline(transaction=False)
        self._commit_chunk(keys=[bk.lease(index), bk.done, bk.counts, bk.progress],
                           args=[token, index, commit.encode(), n_chunks], client=pipe)
        self.queue_progress_sample(pipe, batch_id, n_chunks)
        (committed, done, total), _ = pipe.execute()
        return int(committed) == 1, int(done) >= int(total)

    # ---- progress history -------------------------------------------------------------------------------------

    def queue_progress_sample(self, pipe, batch_id: str, n_chunks: int = 0, *, gap_ms: int = SAMPLE_GAP_MS,
                              max_samples: int = SAMPLES_MAX) -> None:
        """Queue a throttled sample of the batch's live counts on a pipeline (always taken once every chunk of
        `n_chunks` has committed)."""
        bk = keys.BatchKeys(batch_id)
        self._sample_progress(keys=[bk.history, bk.counts, bk.progress, bk.done],
                              args=[gap_ms, max_samples, n_chunks], client=pipe)

    def sample_progress(self, batch_id: str, **kwargs) -> bool:
        pipe = self.r.pipeline(transaction=False)
        self.queue_progress_sample(pipe, batch_id, **kwargs)
        return bool(pipe.execute()[0])

    def progress_samples(self, batch_id: str) -> list[tuple[float, int, int]]:
        """The batch's history: (unix time, completed, failed), oldest first."""
        out = []
        for raw in self.r.lrange(keys.BatchKeys(batch_id).history, 0, -1):
            t_ms, completed, failed = raw.split(":")
            out.append((int(t_ms) / 1000, int(completed), int(failed)))
        return out

    # ---- what the sweeper reads -------------------------------------------------------------------------------

    def execution_facts(self, batch_id: str, n_chunks: int) -> ExecutionFacts:
        bk = keys.BatchKeys(batch_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.smembers(bk.done)
        pipe.hgetall(bk.attempts)
        pipe.hgetall(bk.redriven)
        pipe.exists(bk.finalize_lease, bk.finalize_lock_v1)
        pipe.lrange(bk.ready, 0, -1)
        for i in range(n_chunks):
            pipe.exists(bk.lease(i))
        done, attempts, redriven, finalize_leased, ready, *leases = pipe.execute()
        return ExecutionFacts(
            done={int(x) for x in done},
            leased={i for i, held in enumerate(leases) if held},
            started={int(x) for x in attempts},
            redriven={int(k): float(v) for k, v in redriven.items()},
            finalize_leased=bool(finalize_leased),
            ready=frozenset(int(x) for x in ready),
        )

    def mark_redriven(self, batch_id: str, index: int, now: float) -> None:
        self.r.hset(keys.BatchKeys(batch_id).redriven, str(index), str(int(now)))

    def delete_working_state(self, batch_id: str, n_chunks: int) -> None:
        names = keys.BatchKeys(batch_id).working(n_chunks)
        for start in range(0, len(names), 500):
            self.r.delete(*names[start:start + 500])
