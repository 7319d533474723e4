"""The gateway: OpenAI-compatible HTTP API in front of the mesh."""
