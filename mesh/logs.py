"""Logging set-up shared by every EdgeMesh process."""

from __future__ import annotations

import logging
import os


def setup_logging(verbose: bool = False, *, process: str = "") -> None:
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("EDGEMESH_LOG_LEVEL", "INFO").upper(),
                                                  logging.INFO)
    tag = f"{process} " if process else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # gRPC and zeroconf are chatty at INFO about things a user cannot act on.
    for noisy in ("zeroconf", "grpc", "asyncio", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
