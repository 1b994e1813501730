"""Validating a batch's input file in one streamed pass, and planning its chunks as byte ranges.

Each line is decoded into the typed `InputLine` of shared/lines.py. Two bounds keep any input within the documented
limits harmless to the processes that read it: a line may hold at most `max_line_bytes` (read with that limit, never
whole), and its body may nest at most `MAX_NESTING` levels deep.
"""

from __future__ import annotations

import math
import re
from array import array
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import msgspec

from shared.lines import InputLine, decode_body_head, decode_input
from shared.store_exec import ChunkSpec

MAX_ERRORS = 100
MAX_NESTING = 64
BOM = b"\xef\xbb\xbf"
_SKIP_PIECE = 1024 * 1024

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


@dataclass
class LineError:
    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass
class ScanResult:
    errors: list[LineError] = field(default_factory=list)
    model: str | None = None
    starts: array = field(default_factory=lambda: array("q"))  # byte offset of each request line
    ends: array = field(default_factory=lambda: array("q"))
    line_numbers: array = field(default_factory=lambda: array("q"))
    custom_ids: list[str] = field(default_factory=list)  # of each request line, in order (the per-request index)

    @property
    def total(self) -> int:
        return len(self.starts)


def nesting_depth(raw: bytes, limit: int) -> int:
    """How deep a JSON text nests (counting at most to `limit + 1`), without building it."""
    brackets = _STRINGS.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if len(brackets) <= 2 * limit:
        return min(limit, len(brackets) // 2)  # too few brackets to go past the limit
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


_FIELD_ERRORS = {
    "custom_id": ("invalid_custom_id", "The custom_id must be a non-empty string."),
    "method": ("invalid_method", "Only the POST method is supported."),
    "url": ("invalid_url", "The url must be a string naming the batch endpoint."),
}


def _shape_error(exc: msgspec.ValidationError, line_no: int) -> LineError:
    """The line's error, from the typed decoder's complaint about it."""
    text = str(exc)
    missing = re.match(r"Object missing required field `(\w+)`", text)
    if missing:
        name = missing.group(1)
        return LineError("missing_required_parameter", f"Missing required parameter: '{name}'.", line_no, name)
    at = re.search(r"at `\$\.(\w+)`", text)
    if at is None:
        return LineError("invalid_json_line", "This line is not a JSON object.", line_no)
    name = at.group(1)
    if "got `null`" in text:
        return LineError("missing_required_parameter", f"Missing required parameter: '{name}'.", line_no, name)
    code, message = _FIELD_ERRORS.get(name, ("invalid_value", f"Invalid '{name}'."))
    return LineError(code, message, line_no, name)


def check_line(raw: bytes, line_no: int, endpoint: str, result: ScanResult, seen: set[str]) -> LineError | None:
    try:
        line = decode_input(raw)
    except msgspec.ValidationError as exc:
        return _shape_error(exc, line_no)
    except msgspec.DecodeError:
        return LineError("invalid_json_line", "This line is not parseable as valid JSON.", line_no)
    if not line.custom_id:
        return LineError("invalid_custom_id", "The custom_id must be a non-empty string.", line_no, "custom_id")
    if line.custom_id in seen:
        return LineError(
            "duplicate_custom_id",
            "The custom_id for this request is a duplicate of another request. "
            "The custom_id parameter must be unique for each request in a batch.",
            line_no,
            "custom_id",
        )
    seen.add(line.custom_id)
    if line.method != "POST":
        return LineError("invalid_method", "Only the POST method is supported.", line_no, "method")
    if line.url != endpoint:
        return LineError("invalid_url", f"The url '{line.url[:200]}' does not match the batch endpoint '{endpoint}'.",
                         line_no, "url")
    body = bytes(line.body)
    if nesting_depth(body, MAX_NESTING) > MAX_NESTING:
        return LineError("invalid_body", f"The body nests more than {MAX_NESTING} levels deep.", line_no, "body")
    try:
        head = decode_body_head(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return LineError("invalid_body", "The body must be a JSON object.", line_no, "body")
    model = head.model
    if model is None:
        return LineError("missing_required_parameter", "Missing required parameter: 'body.model'.", line_no, "body.model")
    if not isinstance(model, str) or not model:
        return LineError("invalid_body", "The body's 'model' must be a non-empty string.", line_no, "body.model")
    if result.model is None:
        result.model = model
    elif model != result.model:
        return LineError(
            "mismatched_model",
            f"The model '{model[:200]}' for this request does not match the rest of the batch. "
            "Each batch must contain requests for a single model.",
            line_no,
            "body.model",
        )
    result.custom_ids.append(line.custom_id)
    return None


def _lines(source: BinaryIO, max_line_bytes: int) -> Iterator[tuple[bytes, int, bool]]:
    """(line, its length in the file, whether it was cut at the limit); a cut line's rest is skipped, not held."""
    while True:
        raw = source.readline(max_line_bytes + 1)
        if not raw:
            return
        if len(raw) <= max_line_bytes or raw.endswith(b"\n"):
            yield raw, len(raw), False
            continue
        length = len(raw)
        while not raw.endswith(b"\n"):
            raw = source.readline(_SKIP_PIECE)
            if not raw:
                break
            length += len(raw)
        yield b"", length, True


def scan_input(source: BinaryIO, endpoint: str, *, max_lines: int, max_line_bytes: int = 8 * 1024 * 1024
               ) -> ScanResult:
    """Read the input once, line by line: its errors (first 100) and the byte range of every request line."""
    result = ScanResult()
    seen: set[str] = set()
    offset = 0
    line_no = 0
    for raw, length, cut in _lines(source, max_line_bytes):
        start = offset
        offset += length
        line_no += 1
        if cut:
            error: LineError | None = LineError(
                "line_too_large", f"This line is longer than the {max_line_bytes} byte limit for one request.", line_no)
        else:
            text = raw
            if line_no == 1 and text.startswith(BOM):
                text = text[len(BOM):]
                start += len(BOM)
            if not text.strip():
                continue
            if result.total >= max_lines:
                result.errors.append(
                    LineError("too_many_requests", f"The input file has more than the maximum of {max_lines} requests.")
                )
                break
            error = check_line(text, line_no, endpoint, result, seen)
        if error is not None:
            result.errors.append(error)
            if len(result.errors) >= MAX_ERRORS:
                break
            continue
        result.starts.append(start)
        result.ends.append(offset)
        result.line_numbers.append(line_no)
    if not result.errors and result.total == 0:
        result.errors.append(LineError("empty_file", "The input file contains no requests."))
    return result


def chunk_size_for(total: int, *, minimum: int, maximum: int, concurrency: int = 1, waves: int = 1,
                   processes: int = 0) -> int:
    """Requests per chunk: about `waves` x the senders of a process, within [minimum, maximum].

    A chunk is the scheduler's unit: a batch released after another waits at most about one chunk's time (`waves`
    upstream latencies) for a process, however big the other's backlog. A process starts its next chunk while
    one's last wave is in flight, so short chunks waste no sender. A batch of fewer chunks than the pool has
    processes is cut into one per process (when each keeps `minimum`), so all of them work on it; chunks are of
    equal size, so none is left running a short last one alone.
    """
    size = max(minimum, min(maximum, waves * concurrency))
    count = math.ceil(max(1, total) / size)
    if processes > count and total // processes >= minimum:
        count = processes
    return max(1, math.ceil(total / count))


def plan_chunks(scan: ScanResult, size: int, max_bytes: int = 0) -> list[ChunkSpec]:
    """Chunks of `size` requests, cut sooner where a chunk would pass `max_bytes` of input (0: no byte bound)."""
    chunks: list[ChunkSpec] = []
    first = 0
    while first < scan.total:
        last = min(first + size, scan.total) - 1
        if max_bytes:
            while last > first and scan.ends[last] - scan.starts[first] > max_bytes:
                last = first + (last - first) // 2
        chunks.append(ChunkSpec(index=len(chunks), start=scan.starts[first], end=scan.ends[last],
                                first_line=scan.line_numbers[first], n_lines=last - first + 1))
        first = last + 1
    return chunks


def iter_chunk_lines(data: bytes, first_line: int) -> Iterator[tuple[int, InputLine]]:
    """The request lines of a chunk's bytes as (line number, typed line); blank lines are skipped."""
    line_no = first_line
    for raw in data.split(b"\n"):
        if raw.strip():
            if line_no == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            yield line_no, decode_input(raw)
        line_no += 1
