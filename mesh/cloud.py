"""The cloud upstream: an OpenAI-compatible API the gateway can route to, guarded by a
circuit breaker so that a cloud outage costs one failed attempt, not a timeout per request.

The breaker opens after `failure_threshold` consecutive failures (connect errors, HTTP
errors, connect or first-token timeouts, streams broken mid-answer). While open it lets
nothing through until `open_s` has passed; then exactly one request (or probe) goes
through half-open, and its outcome closes or re-opens the breaker.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from mesh.errors import ConfigError, PeerError

log = logging.getLogger(__name__)


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 3
    open_s: float = 5.0


class CircuitBreaker:
    def __init__(self, config: BreakerConfig,
                 on_change: Callable[[BreakerState | None, BreakerState], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._on_change = on_change
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        self._lock = threading.Lock()

    @property
    def state(self) -> BreakerState:
        return self._state

    def _set(self, state: BreakerState) -> None:
        old, self._state = self._state, state
        if old != state and self._on_change is not None:
            self._on_change(old, state)

    def allow(self) -> bool:
        """May a request go to the cloud now? In half-open, only one at a time (the probe)."""
        with self._lock:
            if self._state == BreakerState.CLOSED:
                return True
            if self._state == BreakerState.OPEN:
                if self._clock() - self._opened_at < self._config.open_s:
                    return False
                self._set(BreakerState.HALF_OPEN)
                self._probe_out = False
            if self._probe_out:
                return False
            self._probe_out = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._probe_out = False
            self._set(BreakerState.CLOSED)

    def abandon(self) -> None:
        """A request that was let through ended with no verdict (the client left): free the
        half-open probe slot so the next request can probe."""
        with self._lock:
            self._probe_out = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._probe_out = False
            if self._state == BreakerState.HALF_OPEN or self._failures >= self._config.failure_threshold:
                self._opened_at = self._clock()
                self._set(BreakerState.OPEN)


@dataclass(frozen=True)
class CloudConfig:
    url: str  # base URL of the API, e.g. http://127.0.0.1:9000/v1
    model: str = ""  # model name sent upstream ("" = the client's)
    api_key: str = field(default="", repr=False)
    connect_timeout_s: float = 3.0
    first_token_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    @classmethod
    def from_flags(cls, url: str, model: str, key_env: str) -> CloudConfig:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--cloud-url must start with http:// or https://, not {url!r}")
        key = ""
        if key_env:
            key = os.environ.get(key_env, "")
            if not key:
                raise ConfigError(f"--cloud-key-env names {key_env}, but that environment variable is not set")
        return cls(url=url.rstrip("/"), model=model, api_key=key)


CloudReason = Literal["connect", "timeout", "broken", "upstream_error"] | str


class CloudError(PeerError):
    """The cloud failed; `text_so_far` is what it had already sent, so the mesh can go on."""

    def __init__(self, message: str, reason: CloudReason, text_so_far: str = "") -> None:
        super().__init__(message, code="UNAVAILABLE")
        self.reason = reason
        self.text_so_far = text_so_far


@dataclass(frozen=True)
class CloudDelta:
    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


class CloudUpstream:
    def __init__(self, config: CloudConfig, breaker: CircuitBreaker) -> None:
        self.config = config
        self.breaker = breaker
        timeout = httpx.Timeout(connect=config.connect_timeout_s, read=config.idle_timeout_s,
                                write=config.connect_timeout_s, pool=config.connect_timeout_s)
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        # trust_env=False: a proxy from the environment must not capture LAN or loopback traffic.
        self._client = httpx.AsyncClient(timeout=timeout, headers=headers, trust_env=False)

    async def stream(self, kind: Literal["chat", "text"], body: dict[str, Any]) -> AsyncIterator[CloudDelta]:
        """Text deltas of one streamed answer; raises CloudError when the cloud fails (and
        tells the breaker either way)."""
        path = "/chat/completions" if kind == "chat" else "/completions"
        payload = {**body, "stream": True}
        if self.config.model:
            payload["model"] = self.config.model
        sent: list[str] = []
        started = time.monotonic()
        verdict = False
        try:
            async with self._client.stream("POST", self.config.url + path, json=payload) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise CloudError(f"cloud answered HTTP {response.status_code}", f"http_{response.status_code}")
                async for delta in self._deltas(response, kind, started, sent):
                    yield delta
            verdict = True
            self.breaker.record_success()
        except CloudError as exc:
            exc.text_so_far = "".join(sent)
            verdict = True
            self.breaker.record_failure()
            raise
        except httpx.ConnectError as exc:
            verdict = True
            self.breaker.record_failure()
            raise CloudError(f"cannot reach the cloud: {exc}", "connect") from exc
        except httpx.TimeoutException as exc:
            verdict = True
            self.breaker.record_failure()
            raise CloudError("the cloud timed out", "timeout", "".join(sent)) from exc
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            verdict = True
            self.breaker.record_failure()
            raise CloudError(f"the cloud stream broke: {exc}", "broken", "".join(sent)) from exc
        finally:
            if not verdict:
                self.breaker.abandon()

    async def _deltas(self, response: httpx.Response, kind: str, started: float,
                      sent: list[str]) -> AsyncIterator[CloudDelta]:
        import asyncio

        lines = response.aiter_lines()
        done = False
        while not done:
            deadline = self.config.first_token_timeout_s - (time.monotonic() - started) if not sent \
                else self.config.idle_timeout_s
            try:
                line = await asyncio.wait_for(lines.__anext__(), timeout=max(deadline, 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                what = "first token" if not sent else "next token"
                raise CloudError(f"no {what} from the cloud in time", "timeout") from None
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                message = event["error"].get("message", "error") if isinstance(event["error"], dict) else event
                raise CloudError(f"the cloud reported an error: {message}", "upstream_error")
            usage = event.get("usage")
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
                finish = choice.get("finish_reason")
                if text:
                    sent.append(text)
                if text or finish:
                    yield CloudDelta(text or "", finish)
            if usage:
                yield CloudDelta("", None, {k: int(v) for k, v in usage.items() if isinstance(v, int)})
        if not done:
            raise CloudError("the cloud stream ended without [DONE]", "broken")

    async def probe(self) -> bool:
        """A cheap health check (GET /models); does not touch the breaker."""
        try:
            response = await self._client.get(self.config.url + "/models", timeout=self.config.connect_timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def close(self) -> None:
        await self._client.aclose()
