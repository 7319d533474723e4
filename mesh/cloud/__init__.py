"""The cloud upstream: an OpenAI-compatible API the gateway can route to, guarded by a
circuit breaker so that a cloud outage costs a few failed attempts, not a timeout per request.

    breaker = CircuitBreaker(config.breaker, on_change=lambda old, new: ...)
    cloud = CloudUpstream(config, breaker)
    if breaker.allow():
        try:
            async for delta in cloud.stream("chat", body): ...
        except CloudError as exc:  # exc.reason, exc.text_so_far: where the mesh takes over
            ...
"""

from mesh.cloud.breaker import BreakerConfig, BreakerState, CircuitBreaker
from mesh.cloud.upstream import (
    BROKEN,
    CONNECT,
    TIMEOUT,
    UPSTREAM_ERROR,
    CloudConfig,
    CloudDelta,
    CloudError,
    CloudUpstream,
)

__all__ = [
    "BROKEN",
    "CONNECT",
    "TIMEOUT",
    "UPSTREAM_ERROR",
    "BreakerConfig",
    "BreakerState",
    "CircuitBreaker",
    "CloudConfig",
    "CloudDelta",
    "CloudError",
    "CloudUpstream",
]
