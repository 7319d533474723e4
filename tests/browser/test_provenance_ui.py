"""The model's provenance beside the web page's model picker, in a real browser (Debian's
Chromium driven by Playwright) against a real gateway serving a tiny GGUF with provenance
metadata: name, organization, licence and a short sha256 are shown, and values a hostile
file could hold (HTML, very long text) are shown as text, cut short, never run or parsed.
Skips when Playwright or /usr/bin/chromium is missing, as tests/browser/test_web_ui.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from node.gguf import file_sha256
from tests.conftest import Launcher, gateway_url
from tests.fixtures.tiny_gguf import PROVENANCE, SPECS, write_tiny_gguf

pytestmark = pytest.mark.slow

HOSTILE = '<img src=x onerror="window.__pwned=1">' + "y" * 500


@pytest.fixture(scope="module")
def page_url(module_launcher: Launcher, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    model = write_tiny_gguf(tmp_path_factory.mktemp("ui-provenance") / "tiny-ui.gguf", SPECS[1],
                            metadata=PROVENANCE, name="Tiny UI Model")
    gateway = module_launcher.start("ui-gateway", ["gateway", "--model", str(model), "--port", "0", "--no-discovery"])
    yield gateway_url(gateway), file_sha256(model)


def test_the_models_provenance_is_shown_beside_the_picker(browser: Any, page_url: tuple[str, str]) -> None:
    url, sha = page_url
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        page = context.new_page()
        page.goto(f"{url}/")
        line = page.get_by_test_id("model-provenance")
        line.wait_for(state="visible", timeout=30_000)
        assert line.inner_text() == f"Tiny UI Model · by EdgeMesh Tests · licence apache-2.0 · sha256 {sha[:12]}"
    finally:
        context.close()


def test_hostile_provenance_is_text_cut_short(browser: Any, page_url: tuple[str, str]) -> None:
    url, sha = page_url
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        page = context.new_page()

        def models(route: Any) -> None:  # what a gateway would send for a file with hostile metadata
            body = {"object": "list", "data": [{"id": "tiny-ui", "object": "model", "ready": True, "provenance": {
                "name": HOSTILE, "organization": "<b>bold</b>", "license": "", "sha256": sha}}]}
            route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

        page.route("**/v1/models", models)
        page.goto(f"{url}/")
        line = page.get_by_test_id("model-provenance")
        line.wait_for(state="visible", timeout=30_000)
        text = line.inner_text()
        assert text.startswith('<img src=x onerror="window.__pwned=1">')
        assert "by <b>bold</b> · licence not stated" in text
        assert len(text) < 200
        assert line.evaluate("el => el.children.length") == 0  # no element was made of the values
        assert page.evaluate("window.__pwned") is None
    finally:
        context.close()
