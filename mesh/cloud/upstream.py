"""The cloud upstream client: one OpenAI-compatible API, streamed over SSE, with deadlines.

`CloudUpstream.stream()` turns a streamed chat or text completion into `CloudDelta`s and
every way it can fail into one `CloudError` that says why (`reason`) and how much of the
answer had already arrived (`text_so_far`), so that the gateway can let the mesh carry on
from exactly there. Each attempt tells the circuit breaker its outcome; the caller asks
`breaker.allow()` before calling `stream()`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx

from mesh.cloud.breaker import BreakerConfig, BreakerState, CircuitBreaker
from mesh.errors import ConfigError, PeerError

log = logging.getLogger(__name__)

T = TypeVar("T")

# CloudError.reason values ("http_<status>" besides these).
CONNECT = "connect"  # the cloud could not be reached (refused, unresolvable, connect timeout)
TIMEOUT = "timeout"  # first-token or idle deadline passed, or a read timed out
BROKEN = "broken"  # the stream ended or broke before [DONE] / a finish_reason, or was not SSE/JSON
UPSTREAM_ERROR = "upstream_error"  # the cloud reported an error inside the stream

# Statuses that say the cloud is unusable for everyone, not that this request was wrong:
# they count against the breaker. Other 4xx (400, 404, 413, 422, ...) are this request's
# own problem and leave the breaker alone.
_BREAKER_STATUSES = frozenset({401, 403, 408, 429})

_ERROR_SNIPPET = 300  # characters of an upstream error message kept in CloudError's message


@dataclass(frozen=True)
class CloudConfig:
    # Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:9000/v1 (no trailing slash).
    url: str
    # Model name sent upstream; "" passes on the client's.
    model: str = ""
    # Sent as "Authorization: Bearer ..." when set. repr=False: configs get logged, keys must not.
    api_key: str = field(default="", repr=False)
    # Deadline to open a TCP (and TLS) connection; also the whole budget of a health probe.
    connect_timeout_s: float = 3.0
    # From sending the request to the first content delta (covers the cloud's queueing and prefill).
    first_token_timeout_s: float = 10.0
    # Longest silence between two stream events once the answer has started.
    idle_timeout_s: float = 30.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"the cloud URL must look like http://HOST[:PORT]/v1, not {self.url!r}")
        for name in ("connect_timeout_s", "first_token_timeout_s", "idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"cloud {name} must be positive, not {getattr(self, name)}")

    @classmethod
    def from_flags(cls, url: str, model: str, key_env: str) -> CloudConfig:
        """From --cloud-url, --cloud-model and --cloud-key-env. The key itself never travels in a
        flag (it would show in `ps`), only the name of the variable that holds it."""
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--cloud-url must start with http:// or https://, not {url!r}")
        key = ""
        if key_env:
            # Strip: a key read into a variable from a file often ends in a newline, which
            # would make an invalid header rather than a clear error.
            key = os.environ.get(key_env, "").strip()
            if not key:
                raise ConfigError(f"--cloud-key-env names {key_env}, but that environment variable is not "
                                  "set (or is empty); export it with the cloud API key, or drop --cloud-key-env")
        return cls(url=url.rstrip("/"), model=model, api_key=key)


class CloudError(PeerError):
    """The cloud failed this request.

    A PeerError rather than Unavailable: the failure belongs to one upstream and the request
    can be served elsewhere (the mesh), which is PeerError's contract; were it ever shown to a
    client, 502 Bad Gateway is the truthful status. Unavailable (503) means nothing at all can
    serve, a verdict only the gateway can make after trying the mesh too.
    """

    def __init__(self, message: str, reason: str, text_so_far: str = "", *, status: int | None = None) -> None:
        super().__init__(message, retryable=True, code="UNAVAILABLE")
        self.reason = reason  # "connect" | "timeout" | "http_<status>" | "broken" | "upstream_error"
        self.text_so_far = text_so_far  # every CloudDelta.text yielded before the failure, joined
        self.status = status  # the HTTP status, for "http_<status>"


@dataclass(frozen=True)
class CloudDelta:
    text: str
    finish_reason: str | None = None
    # Token counts the cloud reported; only on the last delta, and only if the cloud sent any.
    usage: dict[str, int] | None = None
    # The choice's own `logprobs` object (when the client asked for them), passed on unchanged.
    logprobs: dict[str, Any] | None = None


class _Attempt:
    """One request's bookkeeping: the text yielded so far and its single verdict on the breaker."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.pieces: list[str] = []
        self.answered = False  # a content delta (text or finish_reason) has arrived
        self.finished = False  # a finish_reason has arrived: the answer is whole
        self.usage: dict[str, int] | None = None
        self.settled = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def succeed(self) -> None:
        if not self.settled:
            self.settled = True
            self.breaker.record_success()

    def fail(self) -> None:
        if not self.settled:
            self.settled = True
            self.breaker.record_failure()

    def release(self) -> None:
        if not self.settled:
            self.settled = True
            self.breaker.release()


class _Deadline(Exception):
    """Our own first-token or idle deadline passed (distinct from httpx's socket timeouts)."""


class CloudUpstream:
    def __init__(self, config: CloudConfig, breaker: CircuitBreaker | None = None) -> None:
        self.config = config
        self.breaker = breaker if breaker is not None else CircuitBreaker(config.breaker)
        self._base = config.url.rstrip("/")
        # httpx's read timeout is only a backstop here: the first-token and idle deadlines are
        # enforced around each read (below), because a per-read socket timeout is reset by
        # every keep-alive comment and cannot express "first token within N s of the request".
        backstop = max(config.first_token_timeout_s, config.idle_timeout_s) + 1.0
        timeout = httpx.Timeout(connect=config.connect_timeout_s, read=backstop, write=config.idle_timeout_s,
                                pool=config.connect_timeout_s)
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        # trust_env=False: an HTTP(S)_PROXY meant for the internet must not capture a loopback
        # or LAN cloud, and a ~/.netrc must not add credentials we did not configure.
        self._client = httpx.AsyncClient(timeout=timeout, headers=headers, trust_env=False, follow_redirects=False)

    async def __aenter__(self) -> CloudUpstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stream(self, kind: Literal["chat", "text"], body: dict[str, Any]) -> AsyncGenerator[CloudDelta, None]:
        """Stream one answer: a CloudDelta per content delta, the finish_reason on the delta that
        carries it, and (if the cloud sent usage) a last delta with empty text and `usage`.

        Raises CloudError on any failure; the breaker hears a failure for connect errors, HTTP
        5xx/429/401/403, deadlines, broken streams and in-band errors, a success once the answer
        is whole ([DONE] or a finish_reason), and nothing (`release`) if the consumer stops early
        or the cloud rejected this request's content (other 4xx). Call `breaker.allow()` first.
        Close the generator (`aclose()`) if you stop reading before it ends."""
        path = "/chat/completions" if kind == "chat" else "/completions"
        payload = dict(body)
        payload["stream"] = True
        if self.config.model:
            payload["model"] = self.config.model
        elif not payload.get("model"):
            log.warning("no model name for the cloud request: set --cloud-model or pass the client's model")
        attempt = _Attempt(self.breaker)
        started = time.monotonic()
        try:
            # aclosing everywhere below: when the consumer stops early, the HTTP response must be
            # closed now, not whenever the garbage collector finalizes a suspended generator.
            async with aclosing(self._attempt(self._base + path, payload, kind, attempt, started)) as deltas:
                async for delta in deltas:
                    yield delta
        except CloudError as exc:
            exc.text_so_far = attempt.text
            log.debug("cloud %s request failed after %.2f s (%s): %s", kind, time.monotonic() - started,
                      exc.reason, exc)
            if exc.status is not None and exc.status < 500 and exc.status not in _BREAKER_STATUSES:
                attempt.release()
            else:
                attempt.fail()
            raise
        finally:
            # Reached with no verdict only when the consumer stopped early or was cancelled.
            attempt.release()

    async def _attempt(self, url: str, payload: dict[str, Any], kind: str, attempt: _Attempt,
                       started: float) -> AsyncGenerator[CloudDelta, None]:
        """The request itself; every failure leaves here as a CloudError."""
        first_deadline = started + self.config.first_token_timeout_s
        try:
            request = self._client.build_request("POST", url, json=payload,
                                                 headers={"Accept": "text/event-stream"})
            # The whole wait for headers counts against the first-token deadline: some servers
            # (an EdgeMesh gateway among them) send headers only with the first token.
            response = await _before(first_deadline, self._client.send(request, stream=True))
            try:
                async with aclosing(self._answer(response, kind, attempt, first_deadline)) as deltas:
                    async for delta in deltas:
                        yield delta
            finally:
                await response.aclose()
        except CloudError:
            raise
        except _Deadline:
            what = "next event" if attempt.answered else "first token"
            raise CloudError(f"no {what} from the cloud in time", TIMEOUT) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise CloudError(f"cannot reach the cloud at {self._base}: {_describe(exc)}", CONNECT) from exc
        except httpx.TimeoutException as exc:
            raise CloudError(f"the cloud timed out: {_describe(exc)}", TIMEOUT) from exc
        except httpx.HTTPError as exc:  # RemoteProtocolError, ReadError, ...: the stream broke
            raise CloudError(f"the cloud stream broke: {_describe(exc)}", BROKEN) from exc

    async def _answer(self, response: httpx.Response, kind: str, attempt: _Attempt,
                      first_deadline: float) -> AsyncGenerator[CloudDelta, None]:
        if response.status_code != 200:
            raise await self._http_error(response)
        content_type = response.headers.get("content-type", "")
        # A server that ignores stream=true and answers in one JSON piece is still an answer.
        parse = self._whole if content_type.startswith("application/json") else self._events
        async with aclosing(parse(response, kind, attempt, first_deadline)) as deltas:
            async for delta in deltas:
                yield delta

    async def _http_error(self, response: httpx.Response) -> CloudError:
        status = response.status_code
        detail = ""
        try:
            raw = await asyncio.wait_for(response.aread(), self.config.connect_timeout_s)
            detail = _error_message(raw.decode("utf-8", "replace"))
        except (httpx.HTTPError, asyncio.TimeoutError):
            pass  # the status alone says enough; the body was a courtesy
        message = f"the cloud answered HTTP {status}" + (f": {detail}" if detail else "")
        return CloudError(message, f"http_{status}", status=status)

    async def _whole(self, response: httpx.Response, kind: str, attempt: _Attempt,
                     first_deadline: float) -> AsyncGenerator[CloudDelta, None]:
        raw = await _before(first_deadline, response.aread())
        event = _parse(raw.decode("utf-8", "replace"))
        delta = self._delta_of(event, kind, attempt)
        if delta is None or not attempt.finished:
            raise CloudError("the cloud's JSON answer has no finished choice", BROKEN)
        attempt.succeed()
        yield delta
        if attempt.usage is not None:
            yield CloudDelta("", None, attempt.usage)

    async def _events(self, response: httpx.Response, kind: str, attempt: _Attempt,
                      first_deadline: float) -> AsyncGenerator[CloudDelta, None]:
        """Parse SSE (data lines joined until a blank line, ':' comments ignored) and yield the
        content deltas, enforcing the first-token deadline and then the idle gap."""
        lines = response.aiter_lines()
        data: list[str] = []
        event_name = ""
        last_event = resumed = time.monotonic()
        done = False
        while not done:
            # The idle gap is the cloud's silence: time the consumer spent between our yields
            # (a slow client downstream) must not count, keep-alive comments must not reset it.
            idle_deadline = max(last_event, resumed) + self.config.idle_timeout_s
            deadline = idle_deadline if attempt.answered else first_deadline
            try:
                line: str | None = await _before(deadline, anext(lines))
            except StopAsyncIteration:
                line = None
            except (_Deadline, httpx.HTTPError):
                if attempt.finished:
                    # The answer is whole; only the trailing usage or [DONE] went missing.
                    log.debug("the cloud stream ended untidily after its finish_reason")
                    break
                raise
            if line is None or line == "":  # end of an event (or of the stream): dispatch it
                if data:
                    payload, name = "\n".join(data), event_name
                    data, event_name = [], ""
                    last_event = time.monotonic()
                    if payload.strip() == "[DONE]":
                        done = True
                    else:
                        try:
                            event = _parse(payload, name)
                        except CloudError as exc:
                            if not attempt.finished:
                                raise
                            log.debug("ignoring the cloud's complaint after a finished answer: %s", exc)
                            break
                        delta = self._delta_of(event, kind, attempt)
                        if delta is not None:
                            if attempt.finished:
                                # The answer is whole: tell the breaker now, not when (or if)
                                # the consumer reads on to the end.
                                attempt.succeed()
                            yield delta
                            resumed = time.monotonic()
                if line is None:
                    break
                continue
            if line.startswith(":"):
                continue  # an SSE comment (keep-alive); does not count as progress
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "event":
                event_name = value
        if not done and not attempt.finished:
            raise CloudError("the cloud stream ended before [DONE] or a finish_reason", BROKEN)
        attempt.succeed()
        if attempt.usage is not None:
            yield CloudDelta("", None, attempt.usage)

    @staticmethod
    def _delta_of(event: dict[str, Any], kind: str, attempt: _Attempt) -> CloudDelta | None:
        """The content of one completion (chunk) object; None when it carries no content (the
        chat role announcement, a usage-only chunk)."""
        usage = event.get("usage")
        if isinstance(usage, dict):
            attempt.usage = {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}
        choices = event.get("choices")
        if not isinstance(choices, list):
            return None
        # Only the first choice: the gateway asks for one answer (n > 1 is not supported).
        choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), None)
        if choice is None:
            return None
        if kind == "chat":
            part = choice.get("delta")
            if not isinstance(part, dict):  # a non-streamed chat answer has "message" instead
                part = choice.get("message")
            text = part.get("content") if isinstance(part, dict) else None
        else:
            text = choice.get("text")
        text = text if isinstance(text, str) else ""
        finish = choice.get("finish_reason")
        finish = finish if isinstance(finish, str) and finish else None
        logprobs = choice.get("logprobs")
        logprobs = logprobs if isinstance(logprobs, dict) else None
        if not text and finish is None:
            return None
        attempt.answered = True
        attempt.pieces.append(text)
        if finish is not None:
            attempt.finished = True
        return CloudDelta(text, finish, logprobs=logprobs)

    async def probe(self) -> bool:
        """Is the cloud healthy? A GET {url}/models within the connect timeout.

        While the breaker is closed this only reports (a reachable /models says nothing about
        completions, so it must not reset the failure count). While it is open and due for a
        probe, and no request has taken that turn, this check *is* the half-open probe: its
        outcome closes or re-opens the breaker, so an idle gateway notices a recovered cloud."""
        counts = self.breaker.state is not BreakerState.CLOSED and self.breaker.allow()
        try:
            healthy = await self._models_ok()
        except BaseException:  # cancelled (the gateway is stopping): no verdict
            if counts:
                self.breaker.release()
            raise
        if counts:
            if healthy:
                self.breaker.record_success()
            else:
                self.breaker.record_failure()
        return healthy

    async def _models_ok(self) -> bool:
        try:
            response = await asyncio.wait_for(
                self._client.get(self._base + "/models", timeout=self.config.connect_timeout_s),
                self.config.connect_timeout_s * 2)  # connect + read, each within the connect timeout
        except (httpx.HTTPError, asyncio.TimeoutError) as exc:
            log.debug("cloud probe failed: %s", _describe(exc))
            return False
        if not 200 <= response.status_code < 300:
            log.debug("cloud probe: GET /models answered HTTP %d", response.status_code)
            return False
        return True

    async def close(self) -> None:
        await self._client.aclose()


async def _before(deadline: float, awaitable: Awaitable[T]) -> T:
    """Await within an absolute monotonic deadline, raising _Deadline when it passes.
    (asyncio.timeout would read better but needs Python 3.11; the project supports 3.10.)"""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()  # never awaited: close it so that Python does not warn
        raise _Deadline
    try:
        return await asyncio.wait_for(awaitable, remaining)
    except asyncio.TimeoutError:
        raise _Deadline from None


def _parse(text: str, event_name: str = "") -> dict[str, Any]:
    """One JSON object from the cloud; an in-band error becomes CloudError(upstream_error)."""
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        raise CloudError(f"the cloud sent something that is not JSON: {text[:80]!r}", BROKEN) from None
    if not isinstance(event, dict):
        raise CloudError(f"the cloud sent JSON that is not an object: {text[:80]!r}", BROKEN)
    if event_name == "error" or event.get("error"):
        raise CloudError(f"the cloud reported an error: {_error_message(text)}", UPSTREAM_ERROR)
    return event


def _error_message(text: str) -> str:
    """The human part of an OpenAI-style error body ({"error": {"message": ...}}), shortened."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:_ERROR_SNIPPET]
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:_ERROR_SNIPPET]
    return json.dumps(error)[:_ERROR_SNIPPET]


def _describe(exc: BaseException) -> str:
    """httpx errors often have an empty str(); the class name is better than nothing."""
    return str(exc) or type(exc).__name__
