"""Validating a batch's input file in one streamed pass, and planning its chunks as byte ranges."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import BinaryIO

import orjson

from shared.store import ChunkSpec

MAX_ERRORS = 100
BOM = b"\xef\xbb\xbf"


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

    @property
    def total(self) -> int:
        return len(self.starts)


def _check_line(obj: object, line_no: int, endpoint: str, result: ScanResult, seen: set[str]) -> LineError | None:
    if not isinstance(obj, dict):
        return LineError("invalid_json_line", "This line is not parseable as valid JSON.", line_no)
    for name in ("custom_id", "method", "url", "body"):
        if name not in obj or obj[name] is None:
            return LineError("missing_required_parameter", f"Missing required parameter: '{name}'.", line_no, name)
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return LineError("invalid_custom_id", "The custom_id must be a non-empty string.", line_no, "custom_id")
    if custom_id in seen:
        return LineError(
            "duplicate_custom_id",
            "The custom_id for this request is a duplicate of another request. "
            "The custom_id parameter must be unique for each request in a batch.",
            line_no,
            "custom_id",
        )
    seen.add(custom_id)
    if obj["method"] != "POST":
        return LineError("invalid_method", "Only the POST method is supported.", line_no, "method")
    if obj["url"] != endpoint:
        return LineError(
            "invalid_url",
            f"The url '{str(obj['url'])[:200]}' does not match the batch endpoint '{endpoint}'.",
            line_no,
            "url",
        )
    body = obj["body"]
    if not isinstance(body, dict):
        return LineError("invalid_body", "The body must be a JSON object.", line_no, "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return LineError("missing_required_parameter", "Missing required parameter: 'body.model'.", line_no, "body.model")
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
    return None


def scan_input(source: BinaryIO, endpoint: str, *, max_lines: int) -> ScanResult:
    """Read the input once, line by line: its errors (first 100) and the byte range of every request line."""
    result = ScanResult()
    seen: set[str] = set()
    offset = 0
    line_no = 0
    for raw in source:
        start = offset
        offset += len(raw)
        line_no += 1
        text = raw
        if line_no == 1 and text.startswith(BOM):
            text = text[len(BOM) :]
            start += len(BOM)
        if not text.strip():
            continue
        if result.total >= max_lines:
            result.errors.append(
                LineError("too_many_requests", f"The input file has more than the maximum of {max_lines} requests.")
            )
            break
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            obj = None
        error = _check_line(obj, line_no, endpoint, result, seen)
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


def chunk_size_for(total: int, *, target_chunks: int, minimum: int, maximum: int, concurrency: int = 1,
                   waves: int = 0, processes: int = 0) -> int:
    """Requests per chunk: enough chunks to spread the batch, each at least `waves` x the senders of a process.

    A chunk's last wave drains with fewer requests in flight than the process could hold, so a chunk of only a few
    waves wastes a large share of its time; ten waves waste about 5% of it. The batch is then
    cut into chunks of equal size, their number a multiple of the pool's `processes` when that keeps them big enough.
    """
    size = max(minimum, min(maximum, max(math.ceil(total / max(1, target_chunks)), waves * concurrency)))
    count = math.ceil(max(1, total) / size)
    if processes > 1 and count > 1:
        # Whole rounds of the pool's processes, so none is left running a last chunk while the others idle.
        rounded = math.ceil(count / processes) * processes
        if math.ceil(total / rounded) >= minimum:
            count = rounded
    # Equal chunks: a short last chunk would leave the processes that drew full ones finishing after the rest.
    return max(1, math.ceil(total / count))


def plan_chunks(scan: ScanResult, size: int) -> list[ChunkSpec]:
    chunks = []
    for index, first in enumerate(range(0, scan.total, size)):
        last = min(first + size, scan.total) - 1
        chunks.append(
            ChunkSpec(
                index=index,
                start=scan.starts[first],
                end=scan.ends[last],
                first_line=scan.line_numbers[first],
                n_lines=last - first + 1,
            )
        )
    return chunks


def iter_chunk_lines(data: bytes, first_line: int):
    """The request lines of a chunk's bytes as (line number, parsed object); blank lines are skipped."""
    line_no = first_line
    for raw in data.split(b"\n"):
        if raw.strip():
            yield line_no, orjson.loads(raw)
        line_no += 1
