"""The wire shape of a batch file's lines: the input request line, and the output and error result lines.

msgspec Structs, not pydantic models: measured on this machine over 50,000 lines, msgspec decodes a typed input line
faster than `orjson.loads` alone builds a dict (0.49 s against 0.56 s; pydantic 1.19 s) and encodes a result line
about 5x faster than orjson over the equivalent dicts (0.15 s against 0.75 s; pydantic 1.18 s). An input line keeps
its `body` as raw JSON bytes: it is sent upstream as written, never parsed into Python objects in the hot path.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.ids import batch_request_id


class InputLine(msgspec.Struct):
    """`{custom_id, method, url, body}`: one request of a batch input file."""

    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


class RequestBodyHead(msgspec.Struct):
    """What validation reads of a request body: it must be an object; `model` picks the provider."""

    model: Any = None


class LineResponse(msgspec.Struct):
    status_code: int
    request_id: str
    body: Any


class LineError(msgspec.Struct):
    code: str
    message: str


class ResultLine(msgspec.Struct, omit_defaults=True):
    """`{id, custom_id, response, error}`: a line of the output file (2xx) or of the error file (anything else).

    `provider`, an extension, names the provider that answered (after any fallback); it is left out of lines of
    requests never sent (cancelled, expired, given up)."""

    id: str
    custom_id: str
    response: LineResponse | None
    error: LineError | None
    provider: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the line belongs to the output file rather than the error file."""
        return self.response is not None and 200 <= self.response.status_code < 300

    @property
    def code(self) -> str | None:
        """What an error-file line counts as in `errors_by_code`: its error's code, else `http_<status>` for an
        upstream answer that was not 2xx; None for an output line."""
        if self.ok:
            return None
        if self.error is not None:
            return self.error.code
        return f"http_{self.response.status_code}" if self.response is not None else "unknown"


_input_decoder = msgspec.json.Decoder(InputLine)
_body_decoder = msgspec.json.Decoder(RequestBodyHead)
_result_decoder = msgspec.json.Decoder(ResultLine)
_encoder = msgspec.json.Encoder()


def decode_input(raw: bytes) -> InputLine:
    """Raises msgspec.DecodeError (not JSON) or msgspec.ValidationError (JSON of the wrong shape)."""
    return _input_decoder.decode(raw)


def decode_body_head(raw: bytes | msgspec.Raw) -> RequestBodyHead:
    return _body_decoder.decode(raw)


def decode_result(raw: bytes) -> ResultLine:
    return _result_decoder.decode(raw)


def encode(line: ResultLine) -> bytes:
    return _encoder.encode(line)


def response_line(batch_id: str, line_no: int, custom_id: str, status_code: int, request_id: str, body: Any,
                  provider: str | None = None) -> ResultLine:
    return ResultLine(batch_request_id(batch_id, line_no), custom_id, LineResponse(status_code, request_id, body), None,
                      provider)


def error_line(batch_id: str, line_no: int, custom_id: str, code: str, message: str, provider: str | None = None
               ) -> ResultLine:
    return ResultLine(batch_request_id(batch_id, line_no), custom_id, None, LineError(code, message), provider)
