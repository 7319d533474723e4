"""EdgeMesh: what spans devices (discovery, scheduling, gateway, transport, metrics)."""

__version__ = "0.1.0"

# Bumped when the wire changes incompatibly; nodes of another version are not planned onto.
# 2: nodes hold nothing until a placement controller loads them (LoadModel, ReleaseHolding, Claim).
PROTOCOL_VERSION = 2
