"""gRPC plumbing: channels, servers, cluster-key auth and proto <-> domain conversion.

Protobuf classes stay inside this package and node/service; callers get domain types.
"""
