"""The web dashboard at /ui, driven in a real headless Chromium against a running deployment."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
from stack import API_KEY, OTHER_API_KEY, chat_lines, submit, wait_terminal

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("BATCHGATE_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")
SLOW_REQUESTS = 1500
FAILING_REQUESTS = 12
NOT_MARKUP = "<img id=injected src=x onerror=alert(1)>"
MODEL = "gpt-4o-mini-2024-07-18"  # a real model name: as long as they come
WIDTH = 1400  # the batch table must fit a window this wide, every column visible


@pytest.fixture
def page():
    """A fresh page in headless Chromium; skipped without a browser unless BATCHGATE_REQUIRE_BROWSER=1."""
    missing = None if CHROMIUM.exists() else f"{CHROMIUM} is not installed"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = missing or "playwright is not installed"
    if missing:
        if os.environ.get("BATCHGATE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{missing}, and BATCHGATE_REQUIRE_BROWSER=1")
        pytest.skip(missing)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": WIDTH, "height": 900}, accept_downloads=True)
        context.set_default_timeout(15_000)
        yield context.new_page()
        browser.close()


def test_dashboard_shows_live_progress_errors_and_downloads(make_stack, page):
    from playwright.sync_api import expect

    dep = make_stack(sim_latency_ms=200, upstream_max_concurrency=8, upstream_max_retries=0)
    dep.start(workers=1, concurrency=2)
    client = dep.client()

    # Finished batches first, with no latency: one whose every request fails, one that succeeds,
    # one refused at validation, and one of tenant B's.
    dep.sim_config(latency_ms=0, error_rate=1.0)
    failing = wait_terminal(client, submit(client, chat_lines(FAILING_REQUESTS, prefix="bad", model=MODEL)).id)
    dep.sim_config(error_rate=0)
    done = wait_terminal(client, submit(client, chat_lines(5, prefix="ok", model=MODEL), metadata={"note": NOT_MARKUP}).id)
    invalid = wait_terminal(client, submit(client, chat_lines(1) + b"{not json\n").id)
    other_tenant = submit(dep.client(api_key=OTHER_API_KEY), chat_lines(3))
    assert failing.request_counts.failed == FAILING_REQUESTS and failing.error_file_id
    assert done.status == "completed" and done.output_file_id
    assert invalid.status == "failed"
    # One cancelled before it could run: its lines are cancelled, not failures.
    dep.sim_config(latency_ms=200)
    cancelled = submit(client, chat_lines(40, prefix="cx", model=MODEL))
    client.batches.cancel(cancelled.id)
    cancelled = wait_terminal(client, cancelled.id)
    assert cancelled.status == "cancelled" and cancelled.request_counts.model_extra["cancelled"] > 0
    # And one slow enough to watch: 1,500 requests at 200 ms, at most 2 x 8 in flight.
    dep.sim_config(latency_ms=200)
    running = submit(client, chat_lines(SLOW_REQUESTS, model=MODEL))

    # The server's root is the dashboard, and it has an icon (linked by the page, and where browsers look).
    base = f"http://127.0.0.1:{dep.api_port}"
    root = httpx.get(f"{base}/")
    assert root.status_code == 302 and root.headers["location"] == "/ui"
    icon = httpx.get(f"{base}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.content.lstrip().startswith(b"<svg")

    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    ui = f"{base}/ui"
    page.goto(base)
    assert page.url == ui
    linked = page.locator('link[rel="icon"]').get_attribute("href")
    linked_icon = page.request.get(f"{base}{linked}")
    assert linked_icon.ok and linked_icon.headers["content-type"].startswith("image/svg+xml")
    page.fill("#api-key", "sk-not-a-real-key-000")
    page.click("#sign-in-button")
    expect(page.locator("#error")).to_contain_text("Incorrect API key provided")
    expect(page.locator("#sign-in")).to_be_visible()

    page.fill("#api-key", API_KEY)
    page.click("#sign-in-button")
    row = page.locator(f'tr[data-batch-id="{running.id}"]')
    expect(row).to_have_attribute("data-status", "in_progress", timeout=20_000)
    expect(page.locator("tr.batch-row")).to_have_count(5)
    assert page.locator(f'[data-batch-id="{other_tenant.id}"]').count() == 0
    assert page.locator("tr.batch-row").first.get_attribute("data-batch-id") == running.id  # newest first

    # Two captures a moment apart: the progress read from the page must have moved on.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    progress = row.locator(".progress")

    def capture(name: str) -> tuple[int, int]:
        done_now, total = int(progress.get_attribute("data-done")), int(progress.get_attribute("data-total"))
        page.screenshot(path=ARTIFACTS / name, full_page=True)
        return done_now, total

    # The running batch shows its rate and the time left, from the history the server keeps.
    rate = row.locator(".progress .rate")
    expect(rate).to_contain_text(re.compile(r"\d+(\.\d)? req/s · ETA (\d+m )?\d+s"))
    assert float(rate.get_attribute("data-rate")) > 0 and float(rate.get_attribute("data-eta")) > 0

    first, total = capture("dashboard-1.png")
    page.wait_for_timeout(2500)
    second, _ = capture("dashboard-2.png")
    assert total == SLOW_REQUESTS
    assert 0 <= first < second <= total, (first, second)

    # Cancelled lines are counted apart, never coloured as failures; a refused batch says why in the list.
    cancelled_progress = page.locator(f'tr[data-batch-id="{cancelled.id}"] .progress')
    assert int(cancelled_progress.get_attribute("data-cancelled")) == cancelled.request_counts.model_extra["cancelled"]
    assert cancelled_progress.get_attribute("data-failed") == "0"
    expect(cancelled_progress.locator(".cancelled")).to_be_visible()
    assert cancelled_progress.locator(".bad").count() == 0
    expect(page.locator(f'tr[data-batch-id="{invalid.id}"] td.status .reason')).to_have_text(
        "invalid_json_line (line 2)")
    assert page.locator(f'tr[data-batch-id="{failing.id}"] .progress .bad').count() == 1

    # The running batch's page draws its progress over time from the start, with its rate and ETA.
    page.goto(f"{ui}#/batches/{running.id}")
    expect(page.locator("#batch-view")).to_have_attribute("data-batch-id", running.id)
    expect(page.locator("#progress-svg")).to_be_visible()
    page.wait_for_function("Number(document.querySelector('#progress-svg')?.dataset.points) >= 4", timeout=10_000)
    completed_line = page.locator("#progress-svg polyline.series-completed")
    xs = [float(pair.split(",")[0]) for pair in completed_line.get_attribute("points").split()]
    ys = [float(pair.split(",")[1]) for pair in completed_line.get_attribute("points").split()]
    assert xs == sorted(xs) and ys[0] > ys[-1], (xs, ys)  # left to right in time, rising (SVG's y points down)
    expect(page.locator("#batch-summary .rate")).to_contain_text("req/s")
    expect(page.locator("#batch-summary")).not_to_contain_text("null")
    expect(page.locator("#batch-view")).to_have_attribute("data-status", "in_progress")
    page.screenshot(path=ARTIFACTS / "batch-running.png", full_page=True)
    page.goto(ui)
    expect(page.locator("tr.batch-row")).to_have_count(5)

    # At 1400 px the whole table fits: nothing scrolls sideways, and the last column's links are on screen.
    wrap = page.locator(".table-wrap")
    assert wrap.evaluate("node => node.scrollWidth <= node.clientWidth"), wrap.evaluate(
        "node => [node.scrollWidth, node.clientWidth]")
    errors_link = page.locator(f'tr[data-batch-id="{failing.id}"] [data-kind="error"]')
    expect(errors_link).to_be_visible()
    expect(errors_link).to_be_in_viewport(ratio=1)
    box = errors_link.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= WIDTH, box

    # The failed batch's page lists its error lines; the refused one its validation errors.
    page.click(f'tr[data-batch-id="{failing.id}"] a.batch-link')
    expect(page.locator("#batch-view")).to_have_attribute("data-batch-id", failing.id)
    lines = page.locator("#error-lines tr.error-line")
    expect(lines).to_have_count(FAILING_REQUESTS)
    assert {lines.nth(i).get_attribute("data-custom-id") for i in range(FAILING_REQUESTS)} == {
        f"bad-{i}" for i in range(FAILING_REQUESTS)
    }
    expect(lines.first.locator("td").nth(1)).to_have_text("500")
    page.screenshot(path=ARTIFACTS / "batch-errors.png", full_page=True)

    page.goto(f"{ui}#/batches/{invalid.id}")
    problems = page.locator("#validation-errors tr.validation-error")
    expect(problems).to_have_count(1)
    expect(problems.first).to_contain_text("invalid_json_line")

    # Another tenant's batch, even by its id, is only the API's 404.
    page.goto(f"{ui}#/batches/{other_tenant.id}")
    expect(page.locator("#error")).to_contain_text(other_tenant.id)
    expect(page.locator("#batch-view")).to_be_hidden()

    # The output file downloads with the key, byte for byte.
    page.goto(f"{ui}#/batches/{done.id}")
    expect(page.locator("#batch-fields")).to_contain_text(NOT_MARKUP)  # shown as text, never parsed
    expect(page.locator("#batch-fields")).to_be_hidden()  # the raw fields wait behind their toggle
    page.click("#batch-details > summary")
    expect(page.locator("#batch-fields")).to_be_visible()
    assert page.locator("#injected").count() == 0
    with page.expect_download() as download_info:
        page.click('#batch-summary [data-kind="output"]')
    download = download_info.value
    assert download.suggested_filename == f"{done.id}_output.jsonl"
    assert Path(download.path()).read_bytes() == client.files.content(done.output_file_id).read()

    page.click("#sign-out")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    expect(page.locator("#batches tbody tr")).to_have_count(0)

    assert script_errors == []
    for name in ("dashboard-1.png", "dashboard-2.png", "batch-running.png", "batch-errors.png"):
        assert (ARTIFACTS / name).stat().st_size > 0
