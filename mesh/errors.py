"""The one error hierarchy of EdgeMesh.

Each error knows how it is shown to a caller: an HTTP status for the gateway and a
gRPC status code name for nodes, so the edges translate errors in one place.
"""

from __future__ import annotations


class EdgeMeshError(Exception):
    """Base of every error EdgeMesh raises on purpose."""

    http_status = 500
    grpc_code = "INTERNAL"
    kind = "internal_error"


class ConfigError(EdgeMeshError):
    """A flag, environment variable or file makes no sense; raised before anything starts."""

    kind = "config_error"


class InvalidInput(EdgeMeshError):
    """The caller sent something malformed or out of range."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    kind = "invalid_request_error"


class PayloadTooLarge(InvalidInput):
    """A request body larger than the gateway accepts (refused before it is read or parsed)."""

    http_status = 413


class RequestTimeout(InvalidInput):
    """The client did not send its whole request in time."""

    http_status = 408


class NotFound(EdgeMeshError):
    """A model, session or route that does not exist."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    kind = "not_found_error"


class Unauthenticated(EdgeMeshError):
    """Missing or wrong API key or cluster key."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    kind = "authentication_error"


class CapacityExhausted(EdgeMeshError):
    """Every node that could serve is busy; retrying later can succeed."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    kind = "capacity_error"


class Unavailable(EdgeMeshError):
    """Nothing can serve the request right now (no nodes, nodes down, draining)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    kind = "unavailable_error"


class NotClaimHolder(EdgeMeshError):
    """Another placement controller holds this node's claim for the model: only it may load
    or release (see mesh.placement.controller)."""

    http_status = 409
    grpc_code = "FAILED_PRECONDITION"
    kind = "conflict_error"


class ModelError(EdgeMeshError):
    """A model file is missing, corrupt or cannot be loaded."""

    kind = "model_error"


class UnsafeChatTemplate(ModelError):
    """A model's chat template reaches for something a chat template has no use for (Python
    internals, an unknown global or filter, another template), or is too big or too deep to
    check: refused when the model loads, before anything compiles or renders it."""


class PeerError(EdgeMeshError):
    """A peer answered with an error or broke the stream; the request may be retried elsewhere."""

    http_status = 502
    grpc_code = "UNAVAILABLE"
    kind = "upstream_error"

    def __init__(self, message: str, *, retryable: bool = True, code: str = "UNAVAILABLE",
                 node_id: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code
        self.node_id = node_id  # which node failed, when the caller knows (a pipeline stage)


class ModelNotAllowed(EdgeMeshError):
    """A model whose sha256 is not on this process's --allow-model list: refused, never retried."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    kind = "permission_error"
