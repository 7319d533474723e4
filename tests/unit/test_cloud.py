"""The cloud upstream: the circuit breaker on an injected clock, and the client against a real
OpenAI-compatible stand-in server on loopback with its faults switched on at run time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, TypeVar

import pytest

from mesh.cloud import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CloudConfig,
    CloudDelta,
    CloudError,
    CloudUpstream,
)
from mesh.errors import ConfigError, PeerError
from tests.fixtures.openai_standin import ANSWER, CHUNKS, StandIn, answer_prefix, run_standin

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
CHAT = {"model": "client-model", "messages": [{"role": "user", "content": "Say something."}]}
TEXT = {"model": "client-model", "prompt": "Say something."}
T = TypeVar("T")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_breaker(threshold: int = 3, open_s: float = 5.0) -> tuple[CircuitBreaker, FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=threshold, open_s=open_s),
                             on_change=lambda old, new: changes.append((old.value, new.value)), clock=clock)
    return breaker, clock, changes


# ---------------------------------------------------------------------- the breaker


def test_breaker_opens_after_threshold_consecutive_failures_only() -> None:
    breaker, _, changes = make_breaker(threshold=3)
    assert breaker.state is CLOSED and breaker.allow()
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # not consecutive any more: the count starts again
    assert breaker.failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED and breaker.allow() and changes == []
    breaker.record_failure()
    assert breaker.state is OPEN and not breaker.allow()
    assert changes == [("closed", "open")]


def test_open_breaker_refuses_until_open_s_then_lets_exactly_one_probe() -> None:
    breaker, clock, changes = make_breaker(threshold=1, open_s=5.0)
    breaker.record_failure()
    clock.advance(4.9)
    assert not breaker.allow() and breaker.state is OPEN
    assert breaker.seconds_until_probe() == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.allow()  # this caller is the probe
    assert breaker.state is HALF_OPEN
    assert [breaker.allow() for _ in range(5)] == [False] * 5  # concurrent callers wait for the verdict
    breaker.record_success()
    assert breaker.state is CLOSED and breaker.allow() and breaker.failures == 0
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_failed_probe_reopens_and_restarts_the_open_timer() -> None:
    breaker, clock, changes = make_breaker(threshold=2, open_s=5.0)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(5.0)
    assert breaker.allow()
    clock.advance(3.0)  # the probe takes its time, then fails
    breaker.record_failure()
    assert breaker.state is OPEN
    clock.advance(4.9)  # counted from the probe's failure, not from the first opening
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow() and breaker.state is HALF_OPEN
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "open"), ("open", "half_open")]


def test_a_released_probe_lets_the_next_caller_probe() -> None:
    breaker, clock, _ = make_breaker(threshold=1, open_s=1.0)
    breaker.record_failure()
    clock.advance(1.0)
    assert breaker.allow() and not breaker.allow()
    breaker.release()  # the probing client went away: no verdict
    assert breaker.state is HALF_OPEN and breaker.allow() and not breaker.allow()


def test_stragglers_do_not_move_an_open_breaker() -> None:
    breaker, clock, _ = make_breaker(threshold=1, open_s=5.0)
    breaker.record_failure()
    clock.advance(3.0)
    breaker.record_success()  # a stream that started before the outage finished fine
    assert breaker.state is OPEN
    breaker.record_failure()  # another old request failed: the probe is not pushed further out
    clock.advance(2.0)
    assert breaker.allow() and breaker.state is HALF_OPEN


def test_a_failing_on_change_callback_does_not_break_the_breaker() -> None:
    def explode(old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("metrics are down")

    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1), on_change=explode)
    breaker.record_failure()
    assert breaker.state is OPEN and str(breaker.state) == "open"


def test_breaker_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        BreakerConfig(failure_threshold=0)
    with pytest.raises(ConfigError):
        BreakerConfig(open_s=-1)


# ---------------------------------------------------------------------- configuration


def test_config_from_flags_reads_the_key_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEMESH_TEST_CLOUD_KEY", "sk-secret-123\n")
    config = CloudConfig.from_flags("http://127.0.0.1:9000/v1/", "gpt-x", "EDGEMESH_TEST_CLOUD_KEY")
    assert config.url == "http://127.0.0.1:9000/v1" and config.model == "gpt-x"
    assert config.api_key == "sk-secret-123"
    assert "sk-secret" not in repr(config)  # configs get logged; keys must not
    assert CloudConfig.from_flags("http://127.0.0.1:9000/v1", "", "").api_key == ""


def test_config_from_flags_refuses_a_named_but_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEMESH_TEST_NO_SUCH_VAR", raising=False)
    with pytest.raises(ConfigError, match="EDGEMESH_TEST_NO_SUCH_VAR"):
        CloudConfig.from_flags("http://127.0.0.1:9000/v1", "", "EDGEMESH_TEST_NO_SUCH_VAR")
    with pytest.raises(ConfigError, match="http"):
        CloudConfig.from_flags("127.0.0.1:9000/v1", "", "")
    with pytest.raises(ConfigError):
        CloudConfig(url="http://127.0.0.1:9000/v1", first_token_timeout_s=0)


def test_cloud_error_is_a_retryable_peer_error() -> None:
    error = CloudError("down", "connect", "so far")
    assert isinstance(error, PeerError) and error.retryable and error.http_status == 502
    assert (error.reason, error.text_so_far) == ("connect", "so far")


# ---------------------------------------------------------------------- the upstream, for real


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with run_standin() as server:
        yield server
    assert not any(t.name == "openai-standin" for t in threading.enumerate()), "the stand-in's thread leaked"


def upstream_for(standin: StandIn, *, key: str = "", model: str = "", first_token_s: float = 5.0,
                 idle_s: float = 5.0, threshold: int = 3, open_s: float = 5.0) -> CloudUpstream:
    config = CloudConfig(url=standin.url, model=model, api_key=key, connect_timeout_s=1.0,
                         first_token_timeout_s=first_token_s, idle_timeout_s=idle_s,
                         breaker=BreakerConfig(failure_threshold=threshold, open_s=open_s))
    return CloudUpstream(config, CircuitBreaker(config.breaker))


def run(make: Callable[[], Awaitable[T]], upstream: CloudUpstream) -> T:
    """Run one async scenario, closing the upstream's client on the same event loop."""
    async def scenario() -> T:
        try:
            return await make()
        finally:
            await upstream.close()

    return asyncio.run(scenario())


async def collect(upstream: CloudUpstream, kind: Literal["chat", "text"] = "chat",
                  body: dict[str, Any] | None = None) -> tuple[list[CloudDelta], CloudError | None, float]:
    """Every delta of one stream, the CloudError that ended it (if any) and how long it took."""
    deltas: list[CloudDelta] = []
    started = time.monotonic()
    try:
        async for delta in upstream.stream(kind, body if body is not None else (CHAT if kind == "chat" else TEXT)):
            deltas.append(delta)
    except CloudError as exc:
        return deltas, exc, time.monotonic() - started
    return deltas, None, time.monotonic() - started


def test_a_normal_chat_stream_yields_the_whole_answer_and_keeps_the_breaker_closed(standin: StandIn) -> None:
    upstream = upstream_for(standin, model="cloud-model")
    upstream.breaker.record_failure()  # an earlier failure, forgiven by this success
    deltas, error, _ = run(lambda: collect(upstream), upstream)
    assert error is None
    assert "".join(d.text for d in deltas) == ANSWER
    assert len([d for d in deltas if d.text]) == len(CHUNKS)  # one delta per streamed word
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
    assert upstream.breaker.state is CLOSED and upstream.breaker.failures == 0
    sent = standin.last
    assert sent.path == "/v1/chat/completions" and sent.body is not None
    assert sent.body["stream"] is True and sent.body["model"] == "cloud-model"  # the configured model wins
    assert sent.body["messages"] == CHAT["messages"]
    assert "authorization" not in sent.headers  # no key configured, none sent


def test_a_text_stream_passes_the_clients_model_and_exposes_usage(standin: StandIn) -> None:
    upstream = upstream_for(standin)
    body = {**TEXT, "max_tokens": 4, "stream_options": {"include_usage": True}}
    deltas, error, _ = run(lambda: collect(upstream, "text", body), upstream)
    assert error is None
    assert "".join(d.text for d in deltas) == answer_prefix(4)
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
    assert deltas[-1].text == "" and deltas[-1].usage == {"prompt_tokens": 2, "completion_tokens": 4,
                                                          "total_tokens": 6}
    assert standin.last.path == "/v1/completions"
    assert standin.last.body is not None and standin.last.body["model"] == "client-model"


def test_the_api_key_is_sent_as_a_bearer_token() -> None:
    with run_standin(api_key="sk-right") as standin:
        good = upstream_for(standin, key="sk-right")
        deltas, error, _ = run(lambda: collect(good), good)
        assert error is None and "".join(d.text for d in deltas) == ANSWER
        assert standin.last.headers["authorization"] == "Bearer sk-right"
        # A wrong key fails every request alike, so it counts against the breaker.
        bad = upstream_for(standin, key="sk-wrong")
        _, error, _ = run(lambda: collect(bad), bad)
        assert error is not None and error.reason == "http_401" and error.status == 401
        assert bad.breaker.failures == 1


def test_a_down_cloud_fails_fast_with_connect_and_three_failures_open_the_breaker(standin: StandIn) -> None:
    standin.down = True
    upstream = upstream_for(standin, threshold=3)

    async def three() -> list[tuple[CloudError | None, float]]:
        results = []
        for _ in range(3):
            assert upstream.breaker.allow()
            _, error, took = await collect(upstream)
            results.append((error, took))
        return results

    results = run(three, upstream)
    for error, took in results:
        assert error is not None and error.reason == "connect" and error.text_so_far == ""
        assert took < 1.0
    assert upstream.breaker.state is OPEN and not upstream.breaker.allow()
    assert standin.requests == 0


def test_http_503_is_a_failure_and_a_400_is_the_requests_own_problem(standin: StandIn) -> None:
    upstream = upstream_for(standin)

    async def both() -> tuple[CloudError | None, CloudError | None]:
        standin.http_status = 503
        _, unavailable, _ = await collect(upstream)
        failures_after_503 = upstream.breaker.failures
        standin.http_status = 400
        _, bad_request, _ = await collect(upstream)
        assert failures_after_503 == 1 and upstream.breaker.failures == 1
        return unavailable, bad_request

    unavailable, bad_request = run(both, upstream)
    assert unavailable is not None and unavailable.reason == "http_503"
    assert "failing with 503 on purpose" in str(unavailable)  # the cloud's own message, for the logs
    assert bad_request is not None and bad_request.reason == "http_400"


@pytest.mark.parametrize("switch", ["delay_first_token_s", "delay_response_s"])
def test_a_late_first_token_times_out_within_the_deadline(standin: StandIn, switch: str) -> None:
    """Whether the headers come at once and the words late (OpenAI) or the headers come only
    with the first word (an EdgeMesh gateway), the deadline runs from the request's start."""
    setattr(standin, switch, 5.0)
    upstream = upstream_for(standin, first_token_s=0.5)
    deltas, error, took = run(lambda: collect(upstream), upstream)
    assert deltas == [] and error is not None and error.reason == "timeout"
    assert 0.5 <= took < 1.5
    assert upstream.breaker.failures == 1


def test_a_stream_broken_mid_answer_reports_the_text_so_far(standin: StandIn) -> None:
    standin.break_after_words = 5
    upstream = upstream_for(standin, threshold=1)
    deltas, error, _ = run(lambda: collect(upstream), upstream)
    assert error is not None and error.reason == "broken"
    assert error.text_so_far == answer_prefix(5) == "".join(d.text for d in deltas)
    assert upstream.breaker.state is OPEN


def test_an_outage_mid_answer_breaks_the_stream(standin: StandIn) -> None:
    standin.slow_chunk_s = 0.3
    upstream = upstream_for(standin)

    async def cut() -> tuple[list[str], CloudError | None]:
        texts: list[str] = []
        try:
            async for delta in upstream.stream("chat", CHAT):
                texts.append(delta.text)
                if len(texts) == 3:
                    await asyncio.to_thread(setattr, standin, "down", True)
        except CloudError as exc:
            return texts, exc
        return texts, None

    texts, error = run(cut, upstream)
    assert error is not None and error.reason == "broken"
    # The outage lands between two of the stand-in's words; on a loaded box one more word
    # can leave before it does, so the check is that the stream ends early and the text
    # carried by the error is exactly what the caller saw.
    assert 3 <= len(texts) <= 4
    assert error.text_so_far == "".join(texts) == answer_prefix(len(texts))


def test_a_stall_between_words_trips_the_idle_deadline(standin: StandIn) -> None:
    standin.slow_chunk_s = 3.0
    upstream = upstream_for(standin, idle_s=0.4)
    deltas, error, took = run(lambda: collect(upstream), upstream)
    assert error is not None and error.reason == "timeout"
    assert error.text_so_far == answer_prefix(1) == "".join(d.text for d in deltas)
    assert took < 1.5


def test_an_error_event_inside_the_stream_is_an_upstream_error(standin: StandIn) -> None:
    standin.error_after_words = 2
    upstream = upstream_for(standin)
    _, error, _ = run(lambda: collect(upstream, "text"), upstream)
    assert error is not None and error.reason == "upstream_error"
    assert "mid-answer on purpose" in str(error) and error.text_so_far == answer_prefix(2)
    assert upstream.breaker.failures == 1


def test_a_consumer_that_stops_early_frees_the_half_open_probe(standin: StandIn) -> None:
    upstream = upstream_for(standin, threshold=1, open_s=0.0)
    upstream.breaker.record_failure()
    assert upstream.breaker.allow() and upstream.breaker.state is HALF_OPEN

    async def first_only() -> str:
        stream = upstream.stream("chat", CHAT)
        first = await anext(stream)
        await stream.aclose()  # the client went away: no verdict on the cloud
        return first.text

    assert run(first_only, upstream) == CHUNKS[0]
    assert upstream.breaker.state is HALF_OPEN and upstream.breaker.allow()


def test_probe_reports_health_and_closes_an_open_breaker_when_the_cloud_is_back(standin: StandIn) -> None:
    upstream = upstream_for(standin, threshold=1, open_s=0.2)

    async def scenario() -> list[Any]:
        seen: list[Any] = [await upstream.probe(), upstream.breaker.state]  # healthy; closed untouched
        standin.down = True
        assert upstream.breaker.allow()
        await collect(upstream)  # connect error: the breaker opens
        seen += [upstream.breaker.state, await upstream.probe(), upstream.breaker.state]  # not due yet
        await asyncio.sleep(0.25)
        seen += [await upstream.probe(), upstream.breaker.state]  # due: the probe failed, re-opened
        standin.down = False
        await asyncio.sleep(0.25)
        seen += [await upstream.probe(), upstream.breaker.state]  # due: the probe closes it
        return seen

    assert run(scenario, upstream) == [True, CLOSED, OPEN, False, OPEN, False, OPEN, True, CLOSED]
    assert standin.requests_by_path["/v1/models"] == 2


def test_a_slow_consumer_is_not_mistaken_for_an_idle_cloud(standin: StandIn) -> None:
    upstream = upstream_for(standin, idle_s=0.3)

    async def slow_reader() -> str:
        texts = []
        async for delta in upstream.stream("chat", CHAT):
            texts.append(delta.text)
            if len(texts) == 1:
                await asyncio.sleep(0.5)  # a slow client downstream; the cloud's words wait in buffers
        return "".join(texts)

    assert run(slow_reader, upstream) == ANSWER


def test_a_cloud_that_ignores_stream_true_still_answers(standin: StandIn) -> None:
    standin.ignore_stream = True
    upstream = upstream_for(standin)
    deltas, error, _ = run(lambda: collect(upstream), upstream)
    assert error is None and [d.text for d in deltas if d.text] == [ANSWER]
    assert deltas[0].finish_reason == "stop" and deltas[-1].usage is not None
    assert upstream.breaker.state is CLOSED
