"""HTTP routes of the gateway: OpenAI API, cluster view, health, metrics, web UI."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.errors import EdgeMeshError, NotFound, PayloadTooLarge, RequestTimeout, Unauthenticated
from mesh.gateway import ollama
from mesh.gateway.api_keys import ApiKeys
from mesh.gateway.completions import error_response, rejection_reason
from mesh.gateway.embeddings import EmbeddingRequest
from mesh.gateway.flavors import CHAT, TEXT
from mesh.gateway.schemas import ChatRequest, CompletionRequest, check_limits, parse

if TYPE_CHECKING:
    from mesh.gateway.runtime import GatewayRuntime

log = logging.getLogger(__name__)

PROTECTED_PREFIXES = ("/v1/", "/api/")
KEY_NAME = "edgemesh_key_name"  # where the middleware leaves the name of the request's key, in scope["state"]


def key_name(request: Request) -> str:
    return str(request.scope.get("state", {}).get(KEY_NAME, ""))


class ApiKeyMiddleware:
    """Bearer-key check on the API; the page, health and metrics stay open. Plain ASGI, so
    streaming responses and client disconnects pass through untouched."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self._app = app
        self._keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._keys.required and scope["type"] == "http" and str(scope["path"]).startswith(PROTECTED_PREFIXES):
            given = Headers(scope=scope).get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            name = self._keys.identify(token)
            if name is None:
                response = error_response(
                    Unauthenticated("missing or wrong API key (send 'Authorization: Bearer KEY')"))
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})[KEY_NAME] = name
        await self._app(scope, receive, send)


async def _read_body(request: Request, limit: int, deadline_s: float) -> bytes:
    """The whole body, refused (413) as soon as it is known to be larger than `limit` (by its
    Content-Length, before a byte of it is read, or while it streams in) and refused (408)
    when it takes longer than `deadline_s` to arrive."""
    too_large = PayloadTooLarge(f"request body is larger than {limit} bytes; send a shorter prompt")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()

    async def collect() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise too_large

    try:
        await asyncio.wait_for(collect(), deadline_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {deadline_s:g} s") from None
    return bytes(body)


def build_app(runtime: GatewayRuntime) -> Starlette:
    limits = runtime.limits

    async def admitted(request: Request, read: Callable[[bytes], Any], admit: Callable[[Any], None]) -> Any:
        """The body of an API request, parsed by `read`, within the limits and the admin's policy
        (`admit`); the one gate of every API route (/v1 and Ollama's /api alike)."""
        key = key_name(request)
        if key:
            runtime.metrics.requests_by_key.labels(key).inc()
        try:
            body = read(await _read_body(request, limits.max_body_bytes, runtime.timeouts.http_body_s))
            if runtime.policy.rules:  # regexes over up to a million characters: off the event loop
                await asyncio.to_thread(admit, body)
            else:
                admit(body)
        except EdgeMeshError as exc:
            runtime.metrics.requests.labels("mesh", str(exc.http_status)).inc()
            runtime.metrics.rejected.labels(rejection_reason(exc) or "invalid").inc()
            return error_response(exc)
        return body

    def admit_completion(body: Any) -> None:
        check_limits(body, limits)
        runtime.policy.admit(body)

    async def completion(request: Request, schema: type[Any], flavor: Any) -> Response:
        body = await admitted(request, lambda raw: parse(schema, raw), admit_completion)
        if isinstance(body, Response):
            return body
        return await runtime.completions.handle(body, flavor, key_name=key_name(request))

    async def embeddings(request: Request) -> Response:
        body = await admitted(request, lambda raw: parse(EmbeddingRequest, raw),
                              lambda b: runtime.policy.admit_texts(b.texts()))
        if isinstance(body, Response):
            return body
        return await runtime.embeddings.handle(body, key_name=key_name(request))

    async def chat_completions(request: Request) -> Response:
        return await completion(request, ChatRequest, CHAT)

    async def text_completions(request: Request) -> Response:
        return await completion(request, CompletionRequest, TEXT)

    async def models(request: Request) -> Response:
        entry = {"object": "model", "created": int(runtime.started_at), "owned_by": "edgemesh",
                 "ready": bool(runtime.scheduler.placements()), "provenance": runtime.provenance.as_json()}
        aliases = [{"id": alias, **entry, "alias_of": runtime.model_name} for alias in sorted(runtime.model_aliases)]
        return JSONResponse({"object": "list", "data": [{"id": runtime.model_name, **entry}, *aliases]})

    async def cluster(request: Request) -> Response:
        return JSONResponse(runtime.cluster_view())

    async def prometheus_targets(request: Request) -> Response:
        # Prometheus http_sd_configs format: a list of {targets, labels} (see deploy/prometheus.yml).
        return JSONResponse(runtime.prometheus_targets())

    async def healthz(request: Request) -> Response:
        """Readiness: 200 while some placement serves the model, else 503 with the reason (a load
        balancer or supervisor sends traffic elsewhere). Liveness is /livez."""
        ready = len(runtime.membership.ready())
        placements = len(runtime.scheduler.placements())
        uptime = round(time.time() - runtime.started_at, 1)
        view = {"nodes_ready": ready, "placements": placements, "uptime_s": uptime}
        if placements:
            return JSONResponse({"status": "ok", **view})
        known = len(runtime.membership.members())
        reason = (f"no node serving {runtime.model_name} is ready: {ready} of {known} known node(s) ready, "
                  "none holds the model yet" if ready else
                  f"no node serving {runtime.model_name} is ready ({known} known, none ready); "
                  "start one with `edgemesh node`")
        return JSONResponse({"status": "unavailable", "reason": reason, **view}, status_code=503,
                            headers={"Retry-After": "1"})

    async def livez(request: Request) -> Response:
        """Liveness: the process answers HTTP, whatever the mesh behind it is doing."""
        return JSONResponse({"status": "ok", "uptime_s": round(time.time() - runtime.started_at, 1)})

    async def metrics(request: Request) -> Response:
        runtime.refresh_gauges()
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    static_dir = resources.files("mesh.gateway") / "static"

    async def index(request: Request) -> Response:
        page = static_dir / "index.html"
        if not page.is_file():
            return PlainTextResponse("EdgeMesh gateway: the web UI is not installed; the API is at /v1/")
        return FileResponse(str(page))

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(NotFound(f"no route {request.method} {request.url.path}"))

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": {"message": f"{request.method} is not allowed on {request.url.path}",
                                       "type": "invalid_request_error", "param": None, "code": 405}},
                            status_code=405)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        *ollama.routes(runtime, admitted, admit_completion, key_name),  # Ollama's API, through the same gate
        Route("/api/cluster", cluster, methods=["GET"]),
        Route("/api/prometheus/targets", prometheus_targets, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Route("/cluster", index, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=str(static_dir), check_dir=False), name="static"),
    ]
    return Starlette(
        routes=routes,
        # CORS outermost: a browser's preflight (OPTIONS, without the key) is answered before the
        # key check, and only for the origins the admin named; without --cors-origin, none.
        middleware=[*([Middleware(CORSMiddleware, allow_origins=list(runtime.cors_origins),
                                  allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                                  expose_headers=["X-EdgeMesh-Route"], max_age=600)] if runtime.cors_origins else []),
                    Middleware(ApiKeyMiddleware, keys=runtime.api_keys)],
        exception_handlers={404: not_found, 405: method_not_allowed},
    )
