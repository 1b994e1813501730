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
    size = chunk_size_for(scan.total, minimum=10, maximum=500, concurrency=13, waves=2)
    chunks = plan_chunks(scan, size)
    ids = [o.custom_id for c in chunks for _, o in iter_chunk_lines(data[c.start:c.end], c.first_line)]
    assert ids == [str(i) for i in range(103)]
    assert sum(c.n_lines for c in chunks) == 103 and len(chunks) == 4


def test_chunk_size_is_a_few_waves_of_a_process_spread_evenly():
    # 4 waves of 64 senders asks for 256; 20,000 requests then make 79 chunks of 254, not 78 full and one short.
    assert chunk_size_for(20_000, minimum=50, maximum=2000, concurrency=64, waves=4) == 254
    assert chunk_size_for(100, minimum=50, maximum=2000, concurrency=64, waves=4) == 100
    assert chunk_size_for(4001, minimum=50, maximum=2000, concurrency=1000, waves=4) == 1334
    assert chunk_size_for(0, minimum=50, maximum=2000) == 1
    assert chunk_size_for(1000, minimum=300, maximum=2000, concurrency=8, waves=4) == 250  # 4 equal chunks


def test_a_small_batch_is_cut_for_every_process_of_the_pool():
    assert chunk_size_for(300, minimum=50, maximum=2000, concurrency=64, waves=4, processes=2) == 150
    assert chunk_size_for(300, minimum=50, maximum=2000, concurrency=64, waves=4, processes=6) == 50
    # Never below the minimum.
    assert chunk_size_for(120, minimum=50, maximum=2000, concurrency=8, waves=10, processes=4) == 60
    assert chunk_size_for(60, minimum=50, maximum=2000, concurrency=8, waves=10, processes=4) == 60


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
