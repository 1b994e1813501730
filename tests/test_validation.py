"""Input validation and chunk planning on in-memory files."""

from __future__ import annotations

import io

import orjson

from workers.validation import chunk_size_for, iter_chunk_lines, plan_chunks, scan_input

EP = "/v1/chat/completions"


def line(custom_id="a", model="m", **over) -> bytes:
    obj = {"custom_id": custom_id, "method": "POST", "url": EP, "body": {"model": model}}
    obj.update(over)
    return orjson.dumps(obj) + b"\n"


def test_bom_crlf_and_blank_lines_are_tolerated_and_line_numbers_are_physical():
    data = b"\xef\xbb\xbf" + line("a").replace(b"\n", b"\r\n") + b"\n   \n" + line("b")
    scan = scan_input(io.BytesIO(data), EP, max_lines=10)
    assert scan.errors == []
    assert scan.total == 2 and list(scan.line_numbers) == [1, 4]
    chunks = plan_chunks(scan, 1)
    got = [list(iter_chunk_lines(data[c.start:c.end], c.first_line)) for c in chunks]
    assert [[(n, o.custom_id) for n, o in g] for g in got] == [[(1, "a")], [(4, "b")]]


def test_chunks_cover_every_request_once():
    data = b"".join(line(str(i)) for i in range(103))
    scan = scan_input(io.BytesIO(data), EP, max_lines=1000)
    size = chunk_size_for(scan.total, target_chunks=4, minimum=10, maximum=500)
    chunks = plan_chunks(scan, size)
    ids = [o.custom_id for c in chunks for _, o in iter_chunk_lines(data[c.start:c.end], c.first_line)]
    assert ids == [str(i) for i in range(103)]
    assert sum(c.n_lines for c in chunks) == 103 and len(chunks) == 4


def test_chunk_size_spreads_the_batch_evenly():
    # 10 waves of 128 senders asks for 1,280; 20,000 requests then make 16 chunks of 1,250, not 15 full and one short.
    assert chunk_size_for(20_000, target_chunks=16, minimum=50, maximum=2000, concurrency=128, waves=10) == 1250
    assert chunk_size_for(100, target_chunks=16, minimum=50, maximum=2000, concurrency=64, waves=10) == 100
    assert chunk_size_for(4001, target_chunks=2, minimum=50, maximum=2000) == 1334
    assert chunk_size_for(0, target_chunks=16, minimum=50, maximum=2000) == 1


def test_chunk_count_is_whole_rounds_of_the_pool():
    # 8,000 requests in chunks of at least 640 make 13 chunks; two processes get 14 (7 each), four get 16.
    sizes = {p: chunk_size_for(8000, target_chunks=16, minimum=50, maximum=2000, concurrency=64, waves=10, processes=p)
             for p in (0, 1, 2, 4)}
    assert sizes == {0: 616, 1: 616, 2: 572, 4: 500}
    # Rounding never makes chunks smaller than the minimum.
    assert chunk_size_for(120, target_chunks=16, minimum=50, maximum=2000, concurrency=8, waves=10, processes=4) == 60


def test_first_hundred_errors_are_reported_with_lines():
    data = b"".join(b"not json\n" for _ in range(150))
    scan = scan_input(io.BytesIO(data), EP, max_lines=1000)
    assert len(scan.errors) == 100
    assert scan.errors[0].code == "invalid_json_line" and scan.errors[99].line == 100


def test_a_body_nested_past_the_limit_is_a_line_error_not_a_crash():
    from workers.validation import MAX_NESTING

    deep = {"model": "m", "x": []}
    inner = deep["x"]
    for _ in range(MAX_NESTING):
        inner.append([])
        inner = inner[0]
    ok = {"model": "m", "x": "[[[[[[" * 100}  # brackets inside strings do not count
    data = line("deep", body=deep) + line("ok", body=ok)
    scan = scan_input(io.BytesIO(data), EP, max_lines=10)
    assert [(e.code, e.line, e.param) for e in scan.errors] == [("invalid_body", 1, "body")]
    assert "64 levels" in scan.errors[0].message


def test_a_line_over_the_size_limit_is_skipped_without_being_held():
    big = line("big", body={"model": "m", "pad": "x" * 5000})
    data = line("a") + big + line("b")
    scan = scan_input(io.BytesIO(data), EP, max_lines=10, max_line_bytes=1000)
    assert [(e.code, e.line) for e in scan.errors] == [("line_too_large", 2)]
    assert "1000 byte limit" in scan.errors[0].message
