"""The web UI in a real browser (Debian's Chromium driven by Playwright) against a real
local mesh started with `edgemesh up`: streamed chat, stop, the cluster view, no console errors.

Screenshots go to test-artifacts/web-ui/*.png. Skips when Playwright or /usr/bin/chromium
is missing (`make test-tools` installs chromium; `pip install playwright`, never
`playwright install`).
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Launcher, gateway_url, wait_for_nodes

try:
    from playwright.sync_api import Browser, Page
except ImportError:  # the browser fixture (tests/browser/conftest.py) skips with a reason
    pass

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "test-artifacts" / "web-ui"
ANSWER_TIMEOUT_MS = 180_000  # a slow CI machine, a cold model, a pipeline of three stages
LAYERS_TEXT = re.compile("layers? (\\d+)(?:\u2013(\\d+))?")  # "layers 0\u20139": an en dash


SHA = "5" * 64
# Node ids as the gateway has them (16 hex digits): the page must show the names instead.
LAPTOP, DESKTOP, NAS, OLD_PC, STRANGER = "a1a1a1a1a1a1a1a1", "b2b2b2b2b2b2b2b2", "c3c3c3c3c3c3c3c3", \
    "d4d4d4d4d4d4d4d4", "e5e5e5e5e5e5e5e5"
NEW_NODE = "f6f6f6f6f6f6f6f6"  # only in a route header: its name comes from the view served later
FAILOVER_VIEW: dict[str, Any] = {
    "model": {"name": "tiny", "sha256": SHA},  # no n_layers: taken from the nodes' models
    "nodes": [
        {"id": NAS, "name": "nas", "address": "198.18.0.3:7000", "state": "ready", "memory_total": 8e9,
         "memory_free": 2e9, "models": [{"name": "tiny", "sha256": SHA, "n_layers": 30, "bytes": 9e7}],
         "role": "stage", "layers": [21, 30], "in_flight": 1, "capacity": 2, "version": "0.1.0",
         "decode_tokens_per_second": 21.5, "speed_source": "idle probe", "memory_budget": 1.5e9,
         "stage_only": False, "role_reason": "stage 3/3: layers [21, 30) at 21.5 tok/s, within its 1431 MiB budget"},
        {"id": STRANGER, "name": "stranger", "address": "198.18.0.9:7000", "state": "unauthenticated",
         "reason": "wrong cluster key", "role_reason": "wrong cluster key"},
        {"id": LAPTOP, "name": "laptop", "address": "198.18.0.1:7000", "state": "ready", "memory_total": 16e9,
         "memory_free": 9e9, "models": [{"name": "tiny", "sha256": SHA, "n_layers": 30, "bytes": 9e7}],
         "role": "stage", "layers": [0, 12], "in_flight": 1, "capacity": 2, "version": "0.1.0",
         "decode_tokens_per_second": 30.2, "speed_source": "start-up probe", "memory_budget": 6e9,
         "stage_only": False, "role_reason": "stage 1/3: layers [0, 12) at 30.2 tok/s, within its 5722 MiB budget"},
        {"id": OLD_PC, "name": "old-pc", "address": "198.18.0.4:7000", "state": "down", "memory_total": 4e9,
         "memory_free": None, "models": [], "role": "idle", "layers": None, "reason": "health check timed out",
         "role_reason": "health check timed out"},
        {"id": DESKTOP, "name": "desktop", "address": "198.18.0.2:7000", "state": "ready", "memory_total": 32e9,
         "memory_free": 20e9, "models": [], "role": "stage", "layers": None, "in_flight": 1, "capacity": 2,
         "decode_tokens_per_second": 18.0, "speed_source": "idle probe", "memory_budget": 2e9, "stage_only": True,
         "role_reason": f"stage 2/3: layers [12, 21) (took over from a node that failed) ({OLD_PC} is down)"},
    ],
    "placements": [{"kind": "pipeline", "model": "tiny", "stages": [
        {"node": LAPTOP, "name": "laptop", "layers": [0, 12]}, {"node": DESKTOP, "name": "desktop", "layers": [12, 21]},
        {"node": NAS, "name": "nas", "layers": [21, 30]}]}],
    "placement": {
        "controller": "gw-222222222222", "active": False, "rival": "gw-111111111111", "converged": False,
        "strategy": "auto", "change": "repair",
        "plan": [{"kind": "pipeline", "stages": [
            {"node": LAPTOP, "name": "laptop", "layers": [0, 12]},
            {"node": DESKTOP, "name": "desktop", "layers": [12, 21]},
            {"node": NAS, "name": "nas", "layers": [21, 30]}]}],
        "spares": [],
        "roles": {LAPTOP: "stage 1/3", DESKTOP: "stage 2/3", NAS: "stage 3/3"},
        "reasons": ["laptop: 5722 MiB cannot hold a replica", "pipeline: laptop[0-12), desktop[12-21), nas[21-30)"],
        "n_ctx": 2048,
        "history": [
            {"at": time.time() - 600, "change": "initial", "trigger": "membership changed", "seconds": 2.57,
             "loaded": True, "plan": ["pipeline: laptop [0, 12), old-pc [12, 21), nas [21, 30)"]},
            {"at": time.time() - 95, "change": "repair", "trigger": f"{OLD_PC} failed mid-stream", "seconds": 1.25,
             "loaded": True, "plan": ["pipeline: laptop [0, 12), desktop [12, 21), nas [21, 30)"]},
        ],
    },
    "routing": {"policy": "cloud-first", "cloud": {"url": "https://api.example.com/v1", "up": False,
                                                   "breaker": "open"}, "last_route": "cloud"},
    "last_failover": {"from": "pipeline", "to": "pipeline", "reason": "node_error",
                      "detail": f"{OLD_PC} failed after 12 tokens", "at": time.time() - 90},
}
ACTIVE_VIEW: dict[str, Any] = {  # this gateway places; two replicas and a spare, one of them joined later
    "model": {"name": "tiny", "sha256": SHA, "n_layers": 30},
    "nodes": [
        {"id": LAPTOP, "name": "laptop", "address": "198.18.0.1:7000", "state": "ready", "memory_total": 16e9,
         "memory_free": 9e9, "role": "replica", "layers": [0, 30], "in_flight": 0, "capacity": 2,
         "decode_tokens_per_second": 30.2, "speed_source": "idle probe", "memory_budget": 6e9,
         "role_reason": "replica: its 5722 MiB budget holds the whole model"},
        {"id": NEW_NODE, "name": "garage-pi", "address": "198.18.0.6:7000", "state": "ready", "memory_total": 8e9,
         "memory_free": 7e9, "role": "replica", "layers": [0, 30], "in_flight": 0, "capacity": 1,
         "decode_tokens_per_second": 9.0, "speed_source": "start-up probe", "memory_budget": 6e9,
         "role_reason": "replica: its 5722 MiB budget holds the whole model"},
        {"id": NAS, "name": "nas", "address": "198.18.0.3:7000", "state": "ready", "memory_total": 8e9,
         "memory_free": 7e9, "role": "spare", "layers": None, "in_flight": 0, "capacity": 2,
         "decode_tokens_per_second": 21.5, "speed_source": "idle probe", "memory_budget": 6e8,
         "role_reason": "spare: not needed by the placements; takes over when a node fails"},
    ],
    "placements": [{"kind": "replica", "model": "tiny", "stages": [{"node": LAPTOP, "name": "laptop",
                                                                    "layers": [0, 30]}]},
                   {"kind": "replica", "model": "tiny", "stages": [{"node": NEW_NODE, "name": "garage-pi",
                                                                    "layers": [0, 30]}]}],
    "placement": {
        "controller": "gw-111111111111", "active": True, "rival": None, "converged": True, "strategy": "auto",
        "change": "keep",
        "plan": [{"kind": "replica", "stages": [{"node": LAPTOP, "name": "laptop", "layers": [0, 30]}]},
                 {"kind": "replica", "stages": [{"node": NEW_NODE, "name": "garage-pi", "layers": [0, 30]}]}],
        "spares": [{"node": NAS, "name": "nas"}],
        "roles": {}, "reasons": [], "n_ctx": 2048,
        "history": [{"at": time.time() - 3600 + i, "change": "replan", "trigger": "periodic check", "seconds": 0.5,
                     "loaded": True, "plan": ["replica: laptop"]} for i in range(6)]
        + [{"at": time.time() - 20, "change": "extend", "trigger": "membership changed", "seconds": 4.5,
            "loaded": True, "plan": ["replica: laptop", "replica: garage-pi"]}],
    },
    "routing": {"policy": "local-only", "cloud": None, "last_route": "mesh"},
    "last_failover": None,
}


# ---------------------------------------------------------------------------- fixtures

@contextmanager
def local_mesh(workdir: Path, model: Path, nodes: int, *extra: str) -> Iterator[str]:
    """`edgemesh up --nodes N` on an ephemeral port; yields the gateway URL; SIGTERM at the end."""
    launcher = Launcher(workdir)
    try:
        up = launcher.start("up", ["up", "--nodes", str(nodes), "--port", "0", "--model", str(model), *extra])
        url = gateway_url(up)
        wait_for_nodes(url, nodes, timeout=120)
        yield url
    finally:
        launcher.stop_all()


@pytest.fixture(scope="class")
def mesh2(browser: Browser, tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Iterator[str]:
    with local_mesh(tmp_path_factory.mktemp("web-ui-2"), default_model, 2) as url:
        yield url


def pipeline_available() -> bool:
    result = subprocess.run([sys.executable, "-m", "mesh.cli", "up", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    return "pipeline" in result.stdout


@pytest.fixture(scope="class")
def mesh3_pipeline(browser: Browser, tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Iterator[str]:
    if not pipeline_available():
        pytest.skip("pipeline strategy not available")
    with local_mesh(tmp_path_factory.mktemp("web-ui-3"), default_model, 3, "--strategy", "pipeline") as url:
        yield url


class UiPage:
    """A page plus everything it said on the console, and the chat requests it sent."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.chat_bodies: list[dict[str, Any]] = []
        self.cluster_polls = 0
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("request", self._request)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console.error: {message.text} ({message.location})")

    def _request(self, request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.chat_bodies.append(json.loads(request.post_data or "{}"))
        elif request.url.endswith("/api/cluster"):
            self.cluster_polls += 1

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    def assert_no_errors(self) -> None:
        assert self.errors == [], "\n".join(self.errors)

    # -- chat helpers

    def answers(self) -> list[str]:
        return self.page.locator("[data-testid=assistant-message]").all_inner_texts()

    def set_max_tokens(self, value: int) -> None:
        self.page.get_by_test_id("settings-toggle").click()
        self.page.get_by_test_id("max-tokens").fill(str(value))
        self.page.get_by_test_id("settings-save").click()
        assert self.page.get_by_test_id("settings").is_hidden()

    def ask(self, text: str) -> None:
        """Type a message, click send, and start recording every length the answer passes through."""
        count = len(self.answers())
        self.page.evaluate("""count => {
            window.__lengths = [];
            const box = document.getElementById("messages");
            new MutationObserver(() => {
                const answer = box.querySelectorAll("[data-testid=assistant-message]")[count];
                if (answer) window.__lengths.push(answer.innerText.length);
            }).observe(box, {childList: true, subtree: true, characterData: true});
        }""", count)
        self.page.get_by_test_id("chat-input").fill(text)
        self.page.get_by_test_id("send").click()

    def wait_until_idle(self) -> None:
        self.page.get_by_test_id("send").wait_for(state="visible", timeout=ANSWER_TIMEOUT_MS)
        assert self.page.get_by_test_id("stop").is_hidden()

    def last_answer(self) -> str:
        return self.answers()[-1].strip()


@contextmanager
def open_page(browser: Browser, url: str, width: int = 1280, height: int = 860) -> Iterator[UiPage]:
    context = browser.new_context(viewport={"width": width, "height": height})
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        ui = UiPage(page)
        page.goto(url)
        page.locator("[data-testid=node]").first.wait_for(state="attached")
        yield ui
    finally:
        context.close()


def texts(page: Page, testid: str) -> list[str]:
    """Inner texts of every element with this test id, spaces normalised (chips use no-break spaces)."""
    return [" ".join(t.split()) for t in page.get_by_test_id(testid).all_inner_texts()]


def assert_no_ids(page: Page, ids: Any) -> None:
    """People read names: no node id is left in the text of the page (tooltips may keep them)."""
    text = page.locator("body").inner_text()
    shown = [i for i in ids if i and i in text]
    assert not shown, f"node ids {shown} are shown on the page:\n{text}"


def layer_ranges(texts: list[str]) -> list[tuple[int, int]]:
    """Node layer texts such as "layers 0-9 · 10 of 30" (inclusive, en dash) -> half-open (0, 10)."""
    ranges = []
    for text in texts:
        match = LAYERS_TEXT.search(text)
        assert match, f"no layer range in {text!r}"
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        ranges.append((first, last + 1))
    return sorted(ranges)


# ---------------------------------------------------------------------------- two replicas

class TestTwoNodeMesh:
    def test_chat_streams_a_markdown_answer_and_keeps_the_conversation(self, browser: Browser, mesh2: str) -> None:
        view = httpx.get(f"{mesh2}/api/cluster", timeout=10).json()
        names = {n["id"]: n["name"] for n in view["nodes"]}
        with open_page(browser, f"{mesh2}/") as ui:
            page = ui.page
            assert page.evaluate("document.body.dataset.view") == "chat"
            picker = page.get_by_test_id("model-picker")
            page.wait_for_function("document.querySelector('[data-testid=model-picker]').value !== ''")
            assert picker.input_value() == view["model"]["name"]

            ui.ask("Say hello and name three colours as a bulleted list.")
            ui.wait_until_idle()
            first = ui.last_answer()
            assert first, "the answer is empty"
            lengths = page.evaluate("window.__lengths")
            assert len({n for n in lengths if n > 0}) >= 2, f"the answer did not stream: {lengths}"
            route = page.get_by_test_id("route").last
            assert route.is_visible()
            served = route.inner_text()
            assert served.startswith("via ") and served[4:] in names.values(), served
            # The footer reads the node's name; the header with its id stays in the tooltip.
            header = route.get_attribute("title") or ""
            assert header.startswith("X-EdgeMesh-Route: ") and header.split(": ", 1)[1] in names, header
            assert_no_ids(page, names)
            assert ui.chat_bodies[0]["stream"] is True
            assert [m["role"] for m in ui.chat_bodies[0]["messages"]] == ["user"]
            assert ui.chat_bodies[0]["model"] == view["model"]["name"]
            # The cluster view (beside the chat at 1280 px) says where the answer went.
            page.wait_for_function(
                "document.querySelector('[data-testid=route-target]')?.innerText === 'Local mesh'")

            ui.ask("Thank you! Now say goodbye.")
            ui.wait_until_idle()
            assert len(ui.answers()) == 2 and ui.last_answer()
            second = ui.chat_bodies[1]["messages"]
            assert [m["role"] for m in second] == ["user", "assistant", "user"]
            assert second[1]["content"].strip(), "the first answer is missing from the conversation"
            ui.shot("chat")
            ui.assert_no_errors()

    def test_stop_ends_a_long_answer_and_the_ui_is_ready_again(self, browser: Browser, mesh2: str) -> None:
        with open_page(browser, f"{mesh2}/") as ui:
            page = ui.page
            ui.set_max_tokens(1500)
            ui.ask("Write a very long and detailed story, in many chapters, about a robot who learns to paint.")
            stop = page.get_by_test_id("stop")
            stop.wait_for(state="visible")
            page.wait_for_function(
                "document.querySelectorAll('[data-testid=assistant-message]')[0].innerText.length >= 40",
                timeout=ANSWER_TIMEOUT_MS)
            assert stop.is_visible(), "the answer ended before stop could be clicked"
            stop.click()
            ui.wait_until_idle()
            stopped_at = ui.last_answer()
            assert len(stopped_at) >= 40
            time.sleep(2.5)
            assert ui.last_answer() == stopped_at, "the answer kept growing after stop"
            assert "stopped" in page.locator(".msg.assistant .status").last.inner_text()
            assert ui.chat_bodies[0]["max_tokens"] == 1500
            assert page.get_by_test_id("send").is_enabled()
            ui.shot("stopped")

            # The gateway let go of the aborted request: nothing is in flight any more.
            deadline = time.monotonic() + 30
            while True:
                view = httpx.get(f"{mesh2}/api/cluster", timeout=10).json()
                in_flight = sum(n.get("in_flight") or 0 for n in view["nodes"])
                if in_flight == 0:
                    break
                assert time.monotonic() < deadline, f"{in_flight} requests still in flight after stop"
                time.sleep(0.5)

            # Ready again: the next question is answered, with the stopped turn in its history.
            ui.set_max_tokens(24)
            ui.ask("Now answer in one short sentence: what is a robot?")
            ui.wait_until_idle()
            assert ui.last_answer()
            assert [m["role"] for m in ui.chat_bodies[-1]["messages"]] == ["user", "assistant", "user"]
            ui.assert_no_errors()

    def test_cluster_view_shows_both_nodes_with_their_layers(self, browser: Browser, mesh2: str) -> None:
        view = httpx.get(f"{mesh2}/api/cluster", timeout=10).json()
        n_layers = view["model"]["n_layers"]
        with open_page(browser, f"{mesh2}/cluster") as ui:
            page = ui.page
            assert page.evaluate("document.body.dataset.view") == "cluster"
            nodes = page.get_by_test_id("node")
            assert nodes.count() == 2
            assert sorted(nodes.get_by_test_id("node-name").all_inner_texts()) == ["node-1", "node-2"]
            assert nodes.get_by_test_id("node-state").all_inner_texts() == ["ready", "ready"]
            assert layer_ranges(nodes.get_by_test_id("node-layers").all_inner_texts()) == [(0, n_layers)] * 2
            for memory in nodes.get_by_test_id("node-memory").all_inner_texts():
                assert re.search(r"\d(\.\d)? (MB|GB|TB) free of \d", memory), memory
            assert nodes.get_by_test_id("node-role").all_inner_texts() == ["replica", "replica"]
            # Why each node has its role, and its measured speed with where the figure comes from.
            reasons = texts(page, "node-role-reason")
            assert len(reasons) == 2 and all(r.startswith("Why: replica") for r in reasons), reasons
            speeds = texts(page, "node-speed")
            assert len(speeds) == 2 and all(re.fullmatch(r"[\d.]+ tok/s · (start-up|idle) probe", t)
                                            for t in speeds), speeds
            placements = page.get_by_test_id("placement")
            assert placements.count() == 2
            assert page.get_by_test_id("placement-stage").count() == 2
            assert page.get_by_test_id("mesh-status").inner_text().strip() == "2/2 nodes ready"
            # The controller's plan: this gateway places, two replicas, the changes that made them.
            panel = page.get_by_test_id("placement-panel")
            assert panel.get_attribute("data-active") == "true"
            assert page.get_by_test_id("plan-mode").inner_text().startswith("This gateway places the model")
            assert sorted(texts(page, "plan-line")) == [f"Replica: {n} serves all {n_layers} layers"
                                                        for n in ("node-1", "node-2")]
            history = panel.get_by_test_id("plan-history-entry")
            assert history.count() >= 1
            assert "initial" in [history.nth(i).get_attribute("data-change") for i in range(history.count())] \
                or len(view["placement"]["history"]) > 5
            assert re.search(r"after \S.* · [\d.]+ s", history.first.inner_text()), history.first.inner_text()
            assert_no_ids(page, [n["id"] for n in view["nodes"]])
            ui.shot("cluster")

            # The view polls the gateway every ~2 s.
            polls = ui.cluster_polls
            deadline = time.monotonic() + 7
            while ui.cluster_polls < polls + 2:
                assert time.monotonic() < deadline, "the cluster view stopped polling"
                page.wait_for_timeout(250)

            # The tab switches to the chat without a reload, and back.
            page.get_by_test_id("nav-chat").click()
            assert page.evaluate("location.pathname") == "/"
            assert page.get_by_test_id("chat-input").is_visible()
            page.get_by_test_id("nav-cluster").click()
            assert page.evaluate("location.pathname") == "/cluster"
            ui.assert_no_errors()

    def test_cluster_view_draws_failover_routing_and_odd_views(self, browser: Browser, mesh2: str) -> None:
        """The page as served by the gateway, fed crafted views: a pipeline with a down and an
        unauthenticated node, cloud routing, a failover; then views with keys missing."""
        views = [FAILOVER_VIEW, {"nodes": [{"name": "bare", "state": "joining"}]}, {}]
        served: list[int] = []

        def fulfill(route: Any) -> None:
            served.append(1)
            route.fulfill(status=200, content_type="application/json", body=json.dumps(views[0]))

        context = browser.new_context(viewport={"width": 1280, "height": 1300})
        try:
            page = context.new_page()
            ui = UiPage(page)
            page.route("**/api/cluster", fulfill)
            page.goto(f"{mesh2}/cluster")
            nodes = page.get_by_test_id("node")
            nodes.first.wait_for()
            assert nodes.count() == 5
            # Ordered by the layers they serve, then by name.
            assert nodes.get_by_test_id("node-name").all_inner_texts() == [
                "laptop", "desktop", "nas", "old-pc", "stranger"]
            assert nodes.get_by_test_id("node-layers").all_inner_texts()[:3] == [
                "layers 0\u201311 · 12 of 30", "layers 12\u201320 · 9 of 30", "layers 21\u201329 · 9 of 30"]
            assert nodes.get_by_test_id("node-layers").all_inner_texts()[3:] == ["no layers", "no layers"]
            assert nodes.get_by_test_id("node-state").all_inner_texts() == [
                "ready", "ready", "ready", "down", "unauthenticated"]
            assert page.get_by_test_id("placement-stage").all_inner_texts() == [
                "laptop · 0\u201311", "desktop · 12\u201320", "nas · 21\u201329"]
            # Every card says why it has its role (ids in the reasons read as names).
            assert texts(page, "node-role-reason") == [
                "Why: stage 1/3: layers [0, 12) at 30.2 tok/s, within its 5722 MiB budget",
                "Why: stage 2/3: layers [12, 21) (took over from a node that failed) (old-pc is down)",
                "Why: stage 3/3: layers [21, 30) at 21.5 tok/s, within its 1431 MiB budget",
                "Why: health check timed out", "Why: wrong cluster key"]
            assert texts(page, "node-speed") == ["30.2 tok/s · start-up probe", "18 tok/s · idle probe",
                                                 "21.5 tok/s · idle probe"]
            assert texts(page, "node-stage-only") == ["layer ranges only"]  # desktop
            assert texts(page, "node-budget")[:3] == ["budget for the model: 6.0 GB", "budget for the model: 2.0 GB",
                                                      "budget for the model: 1.5 GB"]
            # The failover box names the node that failed, not its id.
            failover = page.get_by_test_id("last-failover")
            assert "old-pc failed after 12 tokens" in failover.inner_text(), failover.inner_text()
            assert "node_error" in failover.inner_text()
            # The plan: another gateway places it (this one routes), the plan, the latest changes first.
            panel = page.get_by_test_id("placement-panel")
            assert panel.get_attribute("data-active") == "false"
            mode = page.get_by_test_id("plan-mode").inner_text()
            assert "only routes" in mode and "gw-111111111111" in mode, mode
            assert texts(page, "plan-line") == [
                "Pipeline of 3 stages: laptop (layers 0\u201311) \u2192 desktop (layers 12\u201320) "
                "\u2192 nas (layers 21\u201329)"]
            assert page.get_by_test_id("plan-spares").count() == 0
            assert page.get_by_test_id("plan-converged").count() == 0  # only the placing gateway converges
            assert "repaired after a failure" in page.get_by_test_id("plan-change").inner_text()
            history = texts(page, "plan-history-entry")
            assert len(history) == 2
            assert "repaired after a failure after old-pc failed mid-stream · 1.25 s" in history[0], history
            assert "desktop [12, 21)" in history[0] and "first placement" in history[1], history
            assert_no_ids(page, [LAPTOP, DESKTOP, NAS, OLD_PC, STRANGER])
            assert page.get_by_test_id("route-target").inner_text() == "Cloud"
            assert "breaker open" in page.get_by_test_id("routing").inner_text()
            assert page.get_by_test_id("mesh-status").inner_text().strip() == "3/5 nodes ready"
            ui.shot("cluster-failover")

            for view in views[1:]:
                views[0] = view
                count = len(served)
                deadline = time.monotonic() + 7
                while len(served) < count + 1:
                    assert time.monotonic() < deadline, "the cluster view stopped polling"
                    page.wait_for_timeout(200)
                page.wait_for_timeout(300)
            assert nodes.count() == 0
            assert "No nodes yet" in page.get_by_test_id("cluster-view").inner_text()
            ui.assert_no_errors()
        finally:
            context.close()

    def test_chat_footers_and_the_plan_name_the_nodes(self, browser: Browser, mesh2: str) -> None:
        """Route headers carry node ids: the chat footer shows names, also of a node that joined
        after the page last polled; the placing gateway's plan lists replicas, spares and its
        latest changes."""
        views = [FAILOVER_VIEW]
        routes = [NEW_NODE, f"{LAPTOP},{DESKTOP},{NAS}", "cloud"]
        sse = "".join(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': word}}]})}\n\n"
                      for word in ("Hello", " there.")) + "data: [DONE]\n\n"

        def cluster(route: Any) -> None:
            route.fulfill(status=200, content_type="application/json", body=json.dumps(views[0]))

        def chat(route: Any) -> None:
            route.fulfill(status=200, content_type="text/event-stream", body=sse,
                          headers={"X-EdgeMesh-Route": routes.pop(0)})

        context = browser.new_context(viewport={"width": 1280, "height": 1300})
        try:
            page = context.new_page()
            ui = UiPage(page)
            page.route("**/api/cluster", cluster)
            page.route("**/v1/chat/completions", chat)
            page.goto(f"{mesh2}/")
            page.get_by_test_id("node").first.wait_for()
            views[0] = ACTIVE_VIEW  # garage-pi joined: the page has not seen its name yet
            ui.ask("Hi!")
            ui.wait_until_idle()
            footer = page.get_by_test_id("route")
            page.wait_for_function(
                "document.querySelectorAll('[data-testid=route]')[0].innerText === 'via garage-pi'")
            assert footer.first.get_attribute("title") == f"X-EdgeMesh-Route: {NEW_NODE}"
            ui.ask("Again, through the pipeline.")
            ui.wait_until_idle()
            assert footer.nth(1).inner_text() == "via laptop \u2192 desktop \u2192 nas"
            ui.ask("And from the cloud.")
            ui.wait_until_idle()
            assert footer.nth(2).inner_text() == "via cloud"

            page.wait_for_function("document.querySelectorAll('[data-testid=node]').length === 3")
            assert page.get_by_test_id("node-name").all_inner_texts() == ["garage-pi", "laptop", "nas"]
            panel = page.get_by_test_id("placement-panel")
            assert panel.get_attribute("data-active") == "true"
            assert page.get_by_test_id("plan-mode").inner_text().startswith("This gateway places the model")
            assert page.get_by_test_id("plan-converged").inner_text() == "converged"
            assert texts(page, "plan-line") == ["Replica: laptop serves all 30 layers",
                                                "Replica: garage-pi serves all 30 layers"]
            assert texts(page, "plan-spares") == ["Spares, standing by to take over: nas"]
            assert texts(page, "placements-count") == ["PLACEMENTS 2 2 replicas · 1 spare"]
            assert texts(page, "node-role-reason") == [
                "Why: replica: its 5722 MiB budget holds the whole model"] * 2 + [
                "Why: spare: not needed by the placements; takes over when a node fails"]
            history = texts(page, "plan-history-entry")
            assert len(history) == 5, history  # the last five, newest first
            assert "new nodes put to use after membership changed · 4.50 s" in history[0], history
            assert "replica: laptop; replica: garage-pi" in history[0], history
            assert all("re-planned after periodic check · 0.50 s" in h for h in history[1:]), history
            assert_no_ids(page, [LAPTOP, DESKTOP, NAS, NEW_NODE])
            ui.shot("plan-and-footers")
            ui.assert_no_errors()
        finally:
            context.close()

    def test_api_key_is_asked_for_kept_and_sent(self, browser: Browser, mesh2: str) -> None:
        """A gateway that wants a key (simulated in front of the real one): the page says so,
        the key from Settings goes out as a Bearer header and survives a reload."""
        key = "s3cret-key"
        seen: list[str] = []

        def guard(route: Any) -> None:
            given = route.request.headers.get("authorization", "")
            seen.append(given)
            if given != f"Bearer {key}":
                route.fulfill(status=401, content_type="application/json",
                              body=json.dumps({"error": {"message": "missing or wrong API key"}}))
            else:
                route.continue_()

        context = browser.new_context(viewport={"width": 1280, "height": 860})
        try:
            page = context.new_page()
            ui = UiPage(page)
            page.route(re.compile(r".*/(v1|api)/.*"), guard)
            page.goto(f"{mesh2}/")
            notice = page.get_by_test_id("notice")
            notice.wait_for()
            assert "API key" in notice.inner_text()
            page.get_by_test_id("settings-toggle").click()
            page.get_by_test_id("api-key").fill(key)
            page.get_by_test_id("settings-save").click()
            page.get_by_test_id("node").first.wait_for()
            assert notice.is_hidden()
            ui.set_max_tokens(16)
            ui.ask("Say hi.")
            ui.wait_until_idle()
            assert ui.last_answer()
            page.reload()
            page.get_by_test_id("node").first.wait_for()
            assert page.evaluate("localStorage.getItem('edgemesh.apiKey')") == key
            assert seen[-1] == f"Bearer {key}"
            # Only the refused requests themselves may show up on the console.
            others = [e for e in ui.errors if "status of 401" not in e]
            assert others == [], "\n".join(others)
        finally:
            context.close()

    def test_narrow_screen_shows_one_view_at_a_time(self, browser: Browser, mesh2: str) -> None:
        with open_page(browser, f"{mesh2}/cluster", width=390, height=844) as ui:
            page = ui.page
            assert page.get_by_test_id("node").first.is_visible()
            assert page.get_by_test_id("chat-input").is_hidden()
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            ui.shot("cluster-narrow")
            page.get_by_test_id("nav-chat").click()
            assert page.get_by_test_id("chat-input").is_visible()
            assert page.get_by_test_id("node").first.is_hidden()
            ui.shot("chat-narrow")
            ui.assert_no_errors()


# ---------------------------------------------------------------------------- a 3-stage pipeline

class TestPipelineMesh:
    def test_pipeline_stages_split_the_layers_and_answer_together(self, browser: Browser,
                                                                 mesh3_pipeline: str) -> None:
        view = httpx.get(f"{mesh3_pipeline}/api/cluster", timeout=10).json()
        n_layers = view["model"]["n_layers"]
        with open_page(browser, f"{mesh3_pipeline}/cluster") as ui:
            page = ui.page
            nodes = page.get_by_test_id("node")
            assert nodes.count() == 3
            ranges = layer_ranges(nodes.get_by_test_id("node-layers").all_inner_texts())
            assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), ranges
            assert nodes.get_by_test_id("node-role").all_inner_texts() == ["stage"] * 3
            names = nodes.get_by_test_id("node-name").all_inner_texts()  # in the order of their layers
            assert sorted(names) == ["node-1", "node-2", "node-3"]
            pipeline = page.locator("[data-testid=placement][data-kind=pipeline]")
            assert pipeline.count() == 1
            assert pipeline.get_by_test_id("placement-stage").count() == 3
            # The controller placed it (`up` only starts processes): its plan, and each stage's reason.
            assert page.get_by_test_id("placement-panel").get_attribute("data-active") == "true"
            stages = " \u2192 ".join(f"{name} (layers {first}\u2013{last - 1})"
                                     for name, (first, last) in zip(names, ranges, strict=True))
            assert texts(page, "plan-line") == [f"Pipeline of 3 stages: {stages}"]
            reasons = texts(page, "node-role-reason")
            assert [r.split(":")[1].strip() for r in reasons] == ["stage 1/3", "stage 2/3", "stage 3/3"], reasons
            for reason, (first, last) in zip(reasons, ranges, strict=True):
                assert f"layers [{first}, {last})" in reason, reason
            assert_no_ids(page, [n["id"] for n in view["nodes"]])
            ui.shot("pipeline-cluster")

            ui.set_max_tokens(32)
            ui.ask("Name one planet.")
            ui.wait_until_idle()
            assert ui.last_answer()
            route = page.get_by_test_id("route").last.inner_text()
            assert route == "via " + " \u2192 ".join(names), route
            assert_no_ids(page, [n["id"] for n in view["nodes"]])
            ui.shot("pipeline-chat")
            ui.assert_no_errors()
