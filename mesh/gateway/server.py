"""The gateway's HTTP server: the runtime's app (mesh.gateway.app) served by uvicorn.

Apart from the runtime so that the app, which is built from a runtime, and the runtime,
which knows nothing of HTTP routes, do not import each other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import uvicorn

from mesh.errors import ConfigError
from mesh.gateway.app import build_app
from mesh.gateway.connections import guarded_protocol
from mesh.gateway.runtime import GatewayRuntime
from mesh.ready_file import GatewayReady, write_ready

log = logging.getLogger(__name__)


async def serve(runtime: GatewayRuntime, stop: asyncio.Event,
                on_listening: Callable[[int], None] | None = None) -> None:
    """Serve HTTP until `stop` is set; once listening, writes the ready file and calls
    `on_listening(port)` (which `edgemesh up` uses to wait for its nodes)."""
    await runtime.start()
    cap = runtime.limits.max_http_connections
    protocol = guarded_protocol(runtime.timeouts.http_header_s, cap,
                                lambda reason: runtime.metrics.rejected.labels(reason).inc())
    server = uvicorn.Server(uvicorn.Config(
        build_app(runtime), host=runtime.config.host, port=runtime.config.port, log_level="warning",
        lifespan="off", access_log=False, timeout_graceful_shutdown=5,
        # One past the cap: uvicorn answers 503 to a request when this many connections are open.
        http=protocol, limit_concurrency=cap + 1))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise ConfigError(f"gateway could not listen on {runtime.config.host}:{runtime.config.port}")
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        log.info("gateway listening on http://%s:%d", runtime.config.host, port)
        if runtime.config.ready_file:
            write_ready(runtime.config.ready_file, GatewayReady(runtime.config.host, port))
        if on_listening is not None:
            on_listening(port)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        await runtime.stop()
