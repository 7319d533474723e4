"""EdgeMesh: what spans devices (discovery, scheduling, gateway, transport, metrics)."""

__version__ = "0.1.0"

# Bumped when the wire changes incompatibly; nodes of another version are not planned onto.
# 2: nodes hold nothing until a placement controller loads them (LoadModel, ReleaseHolding, Claim).
# 3: call signatures bind a nonce and the request body (a node of version 2 would see "wrong key").
PROTOCOL_VERSION = 3
