"""The real browser every web-page test drives: Debian's chromium through playwright, one per
test module, skipped with the reason when either is missing.

Playwright's sync API runs its own asyncio loop for the module; that loop starts its default
executor's threads lazily, in whichever test first needs one. The fixture gives the loop an
executor whose threads it starts itself, so the leak guards (tests/harness/guards.py) see
them as the fixture's, and joins them after the loop is closed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the tests skip with a reason below
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install playwright; its PyPI wheel ships the driver)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    manager = sync_playwright()
    executor = _started_executor(EXECUTOR_THREADS)
    try:
        with manager as pw:
            manager._loop.set_default_executor(executor)  # the loop it made (private: no API sets it)
            chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                yield chromium
            finally:
                chromium.close()
    finally:
        executor.shutdown(wait=True)


EXECUTOR_THREADS = 4  # the loop uses it for getaddrinfo and file reads: never more than a few at once


def _started_executor(threads: int) -> ThreadPoolExecutor:
    """A thread pool with all its threads running already (a pool starts one per submit that
    finds no idle thread: `threads` tasks that wait for each other start them all)."""
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="playwright-loop")
    barrier = threading.Barrier(threads)
    for future in [executor.submit(barrier.wait, 10) for _ in range(threads)]:
        future.result()
    return executor
