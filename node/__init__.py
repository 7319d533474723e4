"""EdgeMesh node: what runs on one device (daemon, gRPC service, engines, GGUF inspection)."""
